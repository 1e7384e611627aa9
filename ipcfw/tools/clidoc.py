"""docs/cli-reference.md, made from the argparse parsers themselves: every command of ``ipcfw``,
every option, its help and its default. ``python -m ipcfw.tools.clidoc > docs/cli-reference.md``
writes it; tests/test_docs.py fails when the page and the parsers disagree.

The parsers are read through argparse's public surface only: each parser's help is formatted
once with a formatter that keeps the actions it is handed (``HelpFormatter.add_arguments``), and
a command's help is its parser's ``description`` (``ipcfw.tools.cli`` sets both to the same
text). What depends on the machine (the default endpoint, under ``$XDG_RUNTIME_DIR``) is written
as its rule, so the page is the same everywhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator

from ..endpoint import default_endpoint
from .bench.driver import build_parser as bench_parser
from .cli import build_parser

COMMAND = "python -m ipcfw.tools.clidoc > docs/cli-reference.md"
ENDPOINT_RULE = "ipc://$XDG_RUNTIME_DIR/ipcfw/kernel"


def actions_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """`parser`'s arguments in the order ``--help`` shows them, without the hidden ones."""
    found: list[argparse.Action] = []

    class Keeper(argparse.HelpFormatter):
        def add_arguments(self, actions: Iterable[argparse.Action]) -> None:
            found.extend(actions)

    shown = parser.formatter_class
    parser.formatter_class = Keeper
    try:
        parser.format_help()
    finally:
        parser.formatter_class = shown
    return [action for action in found if action.help is not argparse.SUPPRESS]


def commands_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """`parser`'s commands (its subparsers), by name, in the order they were added."""
    for action in actions_of(parser):
        if isinstance(action.choices, dict) and not action.option_strings:
            return dict(action.choices)
    return {}


def _help(action: argparse.Action, prog: str) -> str:
    """The action's help, with ``%(default)s`` and the like filled in as argparse does."""
    text = action.help or ""
    if "%" not in text:
        return text
    values = {name: value for name, value in vars(action).items()
              if value is not argparse.SUPPRESS}
    if action.choices is not None:
        values["choices"] = ", ".join(map(str, action.choices))
    values["prog"] = prog
    return text % values


def _name(action: argparse.Action) -> str:
    """How the action is written: ``--timeout SECONDS``, ``--path {direct,kernel}``, ``NAME``."""
    if action.metavar is not None:
        metavar = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        metavar = action.dest.upper()
    if not action.option_strings:
        return f"{metavar} ..." if action.nargs in ("*", "+") else metavar
    option = ", ".join(action.option_strings)
    return option if action.nargs == 0 else f"{option} {metavar}"


def _default(action: argparse.Action) -> str:
    default = action.default
    if (not action.option_strings or action.nargs == 0 or default is None
            or default is argparse.SUPPRESS or default == []):
        return ""
    return f"`{default}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


HELP = frozenset({"-h", "--help"})


def _table(parser: argparse.ArgumentParser, skip: frozenset[str] = HELP) -> Iterator[str]:
    """One row per argument of `parser` but those named in `skip` and its commands."""
    rows = [action for action in actions_of(parser)
            if not set(action.option_strings) & skip and not isinstance(action.choices, dict)]
    if not rows:
        yield "No options."
        return
    yield "| argument | default | what it is |"
    yield "|---|---|---|"
    for action in rows:
        yield (f"| `{_cell(_name(action))}` | {_cell(_default(action))} | "
               f"{_cell(_help(action, parser.prog))} |")


def render(parser: argparse.ArgumentParser | None = None,
           bench: argparse.ArgumentParser | None = None) -> str:
    """The reference page for `parser` (default: ``ipcfw``'s) and the bench's own options."""
    parser = parser if parser is not None else build_parser()
    bench = bench if bench is not None else bench_parser()
    own = HELP | {"--version"}
    common = frozenset(option for action in actions_of(parser)
                       for option in action.option_strings if option not in own)
    lines = [
        "# `ipcfw` command reference",
        "",
        f"<!-- Generated from the argparse parsers by `{COMMAND}`: do not edit by hand. -->",
        "",
        f"Every command of `{parser.prog}`, every option, its help and its default, as "
        "`--help` gives them. [cli.md](cli.md) says what the commands are for, with examples.",
        "",
        f"`{parser.prog} [OPTIONS] COMMAND ...`: {parser.description} Each command's "
        f"`--help` (`{parser.prog} COMMAND --help`) lists its own arguments.",
        "",
        f"## `{parser.prog}` options",
        "",
        f"`{'`, `'.join(sorted(common))}` may also follow the command (there, they win); the "
        "bench takes them only before it.",
        "",
        *_table(parser),
    ]
    for name, command in commands_of(parser).items():
        lines += ["", f"## `{parser.prog} {name}`", "", _sentence(command.description), ""]
        if name == "bench":
            lines += ["Its options are its own (`ipcfw bench --help`):", "", *_table(bench)]
        else:
            lines += list(_table(command, HELP | common))
    text = "\n".join(lines) + "\n"
    return text.replace(default_endpoint(), ENDPOINT_RULE)


def _sentence(text: str | None) -> str:
    text = (text or "").strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
