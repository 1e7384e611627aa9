"""Tests of the package's structure itself (STYLE.md 2.1, 2.3, 2.10; as trio's test_exports.py).

* The protocol codec and the kernel's state are pure: their source imports no I/O, clock,
  thread or OS module, directly or through the ipcfw modules they import.
* ``ipcfw.__all__`` is the public surface: every name exists, once, and is documented.
* ``protocol.py`` is the only place message kinds and the wire encoding exist.

The checks read source with `ast`, so they see imports inside functions too.
"""

from __future__ import annotations

import ast
import gc
import inspect
import re
from pathlib import Path

import pytest

import ipcfw
from ipcfw import protocol

PACKAGE = Path(ipcfw.__file__).resolve().parent
ROOT = PACKAGE.parent
PURE_MODULES = [
    "ipcfw/protocol.py", "ipcfw/kernel/state.py", "ipcfw/server/objectix.py",
    "ipcfw/server/state.py", "ipcfw/server/direct.py", "ipcfw/client/state.py",
    "ipcfw/client/args.py", "ipcfw/server/mapped.py", "ipcfw/_spin.py",
    "ipcfw/client/joining.py", "ipcfw/server/coroutines.py", "ipcfw/interface/codec.py",
    "ipcfw/interface/spec.py", "ipcfw/security.py", "ipcfw/server/policy.py",
    "ipcfw/tools/callargs.py", "ipcfw/events.py", "ipcfw/kernel/monitor.py",
    "ipcfw/server/traffic.py", "ipcfw/kernel/activation.py", "ipcfw/kernel/zap.py",
    "ipcfw/kernel/listing.py", "ipcfw/kernel/tables.py",
]
FORBIDDEN = frozenset(
    {"zmq", "os", "socket", "threading", "time", "psutil", "select", "subprocess"}
)
ALL_MODULES = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py"))


def _tree(relpath: str) -> ast.Module:
    # With the collector off: a finalizer that runs inside ast.parse (an RMessage an earlier
    # test let go of, logging) makes CPython 3.11 raise "AST constructor recursion depth
    # mismatch" (a SystemError seen in a full run).
    text = (ROOT / relpath).read_text(encoding="utf-8")
    gc.collect()
    gc.disable()
    try:
        return ast.parse(text, filename=relpath)
    finally:
        gc.enable()


def _module_name(relpath: str) -> str:
    parts = relpath[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(relpath: str) -> bool:
    return relpath.endswith("/__init__.py")


def _file_of(module: str) -> str | None:
    """The source file of an ipcfw module (not of a package's __init__), if there is one."""
    candidate = module.replace(".", "/") + ".py"
    return candidate if (ROOT / candidate).is_file() else None


def _imports(relpath: str) -> list[tuple[str, int]]:
    """Every module `relpath` imports, as absolute dotted names, with line numbers.

    Relative imports are resolved; ``from pkg import name`` also yields ``pkg.name`` when that
    is a module. Dynamic imports of a literal name (``__import__("x")``,
    ``importlib.import_module("x")``) count too.
    """
    package = (
        _module_name(relpath) if _is_package(relpath)
        else _module_name(relpath).rpartition(".")[0]
    )
    found: list[tuple[str, int]] = []
    for node in ast.walk(_tree(relpath)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names
                      if _file_of(f"{module}.{alias.name}")]
        elif isinstance(node, ast.Call):
            func = node.func
            name = (
                func.id if isinstance(func, ast.Name)
                else func.attr if isinstance(func, ast.Attribute)
                else ""
            )
            if name in ("__import__", "import_module") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((arg.value, node.lineno))
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


# -- (a) the pure modules --------------------------------------------------------------------


@pytest.mark.parametrize("relpath", PURE_MODULES)
def test_pure_module_imports_no_io(relpath: str) -> None:
    bad = [(m, line) for m, line in _imports(relpath) if _top(m) in FORBIDDEN]
    assert bad == [], f"{relpath} imports {bad}"


@pytest.mark.parametrize("relpath", PURE_MODULES)
def test_pure_module_is_pure_through_the_ipcfw_modules_it_imports(relpath: str) -> None:
    """Follow imports into other ipcfw modules (package __init__ files aside)."""
    seen: set[str] = set()
    todo = [relpath]
    bad = []
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for module, line in _imports(current):
            if _top(module) in FORBIDDEN:
                bad.append((current, line, module))
            elif _top(module) == "ipcfw":
                target = _file_of(module)
                if target is not None:
                    todo.append(target)
    assert bad == [], f"{relpath} reaches I/O modules: {bad}"
    if relpath == "ipcfw/kernel/state.py":  # (a guard on the walk itself)
        assert {"ipcfw/protocol.py", "ipcfw/naming.py", "ipcfw/errors.py"} <= seen


def test_no_import_cycle() -> None:
    """No ipcfw module imports itself through others (imports inside functions count). A
    package's __init__ is left out: importing a submodule runs it, but it only re-exports."""
    graph = {
        relpath: {target for module, _ in _imports(relpath)
                  if _top(module) == "ipcfw" and (target := _file_of(module)) is not None}
        for relpath in ALL_MODULES if not _is_package(relpath)
    }
    cycles = []
    for start in graph:
        path, todo = {start: None}, [start]  # a search from `start`, remembering the way back
        while todo:
            current = todo.pop()
            for target in graph.get(current, ()):
                if target == start:
                    cycle, at = [start], current
                    while at is not None and at != start:
                        cycle.insert(1, at)
                        at = path[at]
                    cycles.append(cycle)
                elif target not in path:
                    path[target] = current
                    todo.append(target)
    assert cycles == [], cycles


def test_import_resolution_sees_what_it_should() -> None:
    # A guard on the helper itself: it finds relative, absolute and dynamic imports.
    state_imports = {m for m, _ in _imports("ipcfw/kernel/state.py")}
    assert {"ipcfw.errors", "ipcfw.naming", "ipcfw.protocol", "enum", "itertools"} <= state_imports
    assert "msgpack" in {m for m, _ in _imports("ipcfw/protocol.py")}
    loop_imports = {_top(m) for m, _ in _imports("ipcfw/kernel/loop.py")}
    assert "zmq" in loop_imports


# -- (b) the public surface ------------------------------------------------------------------


def test_every_exported_name_exists_once() -> None:
    names = list(ipcfw.__all__)
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    missing = [name for name in names if not hasattr(ipcfw, name)]
    assert missing == []


def _undocumented(namespace: object, names: list[str]) -> list[str]:
    missing = []
    for name in names:
        obj = getattr(namespace, name)
        if inspect.isclass(obj):
            doc = vars(obj).get("__doc__")  # its own docstring, not an inherited one
        elif inspect.isfunction(obj) or inspect.ismodule(obj) or inspect.isbuiltin(obj):
            doc = obj.__doc__
        else:
            continue  # constants (error codes, sharing modes) carry no docstring of their own
        if not (doc and doc.strip()):
            missing.append(name)
    return missing


def test_nothing_but_the_public_surface_is_exported() -> None:
    """``ipcfw``'s public names are `__all__` and its submodules: no helper leaks in (a star
    import of a module whose `__all__` is too wide, a name imported for internal use)."""
    leaked = [
        name for name in dir(ipcfw)
        if not name.startswith("_") and name not in ipcfw.__all__
        and not inspect.ismodule(getattr(ipcfw, name))
    ]
    assert leaked == []
    for helper in ("check", "render_markdown", "all_codes", "exception_class", "ErrorInfo"):
        assert not hasattr(ipcfw, helper) and hasattr(ipcfw.errors, helper), helper


def test_every_exported_name_is_in_the_docs() -> None:
    """What ``from ipcfw import *`` gives a user is what the guides teach (the error codes and
    exceptions through docs/errors.md, generated from the same table)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*",
                           " ".join(p.read_text(encoding="utf-8") for p in pages)))
    assert [name for name in ipcfw.__all__ if name not in words] == []


def _literal(node: ast.expr) -> bool:
    """A value written out (``2**31 - 1``, ``64``, ``(0, 1)``), not taken from elsewhere."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp):
        return _literal(node.operand)
    if isinstance(node, ast.BinOp):
        return _literal(node.left) and _literal(node.right)
    if isinstance(node, ast.Tuple):
        return all(_literal(item) for item in node.elts)
    return False


def test_each_constant_has_one_definition() -> None:
    """The same constant (an upper-case name with the same written-out value) is defined in one
    module and imported by the others, so the two can never drift apart."""
    defined: dict[tuple[str, str], set[str]] = {}
    for relpath in ALL_MODULES:
        for node in _tree(relpath).body:
            if not isinstance(node, ast.Assign) or not _literal(node.value):
                continue
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for target in node.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                if len(names) != len(values):
                    names, values = [target], [node.value]
                for name, value in zip(names, values):
                    if isinstance(name, ast.Name) and name.id.lstrip("_").isupper():
                        key = (name.id.lstrip("_"), ast.dump(value))
                        defined.setdefault(key, set()).add(relpath)
    twice = {name: sorted(where) for (name, _), where in defined.items() if len(where) > 1}
    assert twice == {}


def test_every_exported_class_and_function_is_documented() -> None:
    assert _undocumented(ipcfw, list(ipcfw.__all__)) == []
    assert ipcfw.__doc__ and ipcfw.__doc__.strip()


def test_protocol_exports_exist_and_are_documented() -> None:
    assert len(protocol.__all__) == len(set(protocol.__all__))
    assert [n for n in protocol.__all__ if not hasattr(protocol, n)] == []
    assert _undocumented(protocol, list(protocol.__all__)) == []


# -- (c) one home for the wire format ----------------------------------------------------------


def _defines_kind(tree: ast.Module) -> list[int]:
    return [
        node.lineno for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name == "Kind"
    ]


def _uses_msgpack(relpath: str) -> list[int]:
    lines = [line for module, line in _imports(relpath) if _top(module) == "msgpack"]
    for node in ast.walk(_tree(relpath)):
        if isinstance(node, ast.Name) and node.id == "msgpack":
            lines.append(node.lineno)
    return lines


def test_the_module_list_is_real() -> None:
    assert "ipcfw/protocol.py" in ALL_MODULES and "ipcfw/kernel/state.py" in ALL_MODULES
    assert len(ALL_MODULES) >= 10


def test_only_protocol_defines_kind() -> None:
    defining = {
        relpath: lines for relpath in ALL_MODULES if (lines := _defines_kind(_tree(relpath)))
    }
    assert list(defining) == ["ipcfw/protocol.py"], defining


def test_only_protocol_uses_msgpack() -> None:
    using = {relpath: lines for relpath in ALL_MODULES if (lines := _uses_msgpack(relpath))}
    assert list(using) == ["ipcfw/protocol.py"], using


# -- (d) no module uses another's private names ------------------------------------------------

#: Underscore names that are public API elsewhere: namedtuple's methods and fields, os._exit.
PUBLIC_UNDERSCORE = frozenset(
    {"_fields", "_field_defaults", "_replace", "_asdict", "_make", "_exit"}
)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORE


def _private_names_defined(tree: ast.Module) -> set[str]:
    """Every private name the module defines: functions, classes, assignments (to names and
    attributes), parameters, and ``__slots__`` strings."""
    defined: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            defined.add(node.value)  # a __slots__ entry
    return {name for name in defined if _private(name)}


def _foreign_private_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """``obj._name`` where the module does not define ``_name`` itself, and ``from m import
    _name``: uses of a private name that belongs to another module."""
    own = _private_names_defined(tree)
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            uses.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            uses += [(node.lineno, f"from {node.module} import {alias.name}")
                     for alias in node.names if _private(alias.name)]
    return uses


def test_no_module_uses_another_modules_private_names() -> None:
    """A module's private names are its own (STYLE.md): what another module needs gets a public
    name and a docstring. The check is by name, so a module that defines ``_x`` itself may use
    ``obj._x`` on anything; keep private names distinct across modules that talk to each
    other."""
    uses = {relpath: _foreign_private_uses(_tree(relpath)) for relpath in ALL_MODULES}
    uses = {relpath: found for relpath, found in uses.items() if found}
    assert uses == {}


def test_the_private_name_check_sees_what_it_should() -> None:
    tree = ast.parse("class A:\n    __slots__ = ('_s',)\n    def _m(self):\n        self._a = 1\n")
    assert _private_names_defined(tree) == {"_s", "_m", "_a"}
    foreign = ast.parse("from m import _x\ndef f(o):\n    o._own = o._theirs\n    o._fields\n")
    assert _foreign_private_uses(foreign) == [(1, "from m import _x"), (3, "o._theirs")]
