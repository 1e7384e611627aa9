"""Loading a class named on the command line (``package.module:ClassName``): a server plugin
and its overlays for ``ipcfw serve``, an interface for ``ipcfw call --interface``."""

from __future__ import annotations

import importlib
import os
import sys


class PluginError(ValueError):
    """A plugin spec that names no usable class; the message names the spec and the reason."""


def load_plugin(spec: str, base: type | None = None, what: str = "plugin") -> type:
    """The class named by ``package.module:ClassName``, importable from sys.path or the cwd,
    and a subclass of `base` if given. Raises `PluginError` naming the spec (a `what`) and
    the reason (the module's own exception, if importing it raised, is its ``__cause__``)."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        example = "ServerClass" if what == "plugin" else f"{what.capitalize()}Class"
        raise PluginError(f"{what} {spec!r} must look like package.module:{example}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # (whatever the module raised while importing)
        raise PluginError(f"cannot load {what} {spec!r}: {one_line(exc)}") from exc
    found = getattr(module, class_name, None)
    if found is None:
        raise PluginError(f"cannot load {what} {spec!r}: module {module_name!r} has no "
                          f"{class_name!r}")
    if not isinstance(found, type):
        raise PluginError(f"cannot load {what} {spec!r}: it is a {type(found).__name__}, not a "
                          "class")
    if base is not None and not issubclass(found, base):
        raise PluginError(f"cannot load {what} {spec!r}: {class_name} is not a subclass of "
                          f"ipcfw.{base.__name__}")
    return found


def one_line(exc: BaseException) -> str:
    """`exc` as ``Type: text`` on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
