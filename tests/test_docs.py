"""The docs stay true: links and anchors resolve, the ipcfw names exist, the guide's code runs.

Conventions for Markdown code blocks in ``docs/`` (the info string after the opening fence):

* ```` ```python file=NAME.py ```` is a complete file the reader saves as NAME.py; the tests save
  it in a temporary directory.
* ```` ```python run ```` (possibly with ``file=``) is a client program the reader runs while the
  guide's server is up; the tests run it with ``python`` in that directory against a real kernel
  and server. A line ending in ``# -> TEXT`` promises that the program prints TEXT: each TEXT
  must appear in its output, in order.
* ```` ```text ipcfw-ps ```` is sample ``ipcfw ps --counters`` output; its counter names must be the
  kernel's.

The walkthrough in docs/getting-started.md hosts ``hello_server:HelloServer`` with
``ipcfw serve`` from the directory holding the saved files (as the guide says to), and again
with the guide's ``host_hello.py``. Any other page with ``run`` blocks is run the same way: its
``file=`` blocks are saved in one directory, every ``ipcfw serve MODULE:CLASS`` line of its
```` ```sh ```` blocks is started there, and its ``run`` blocks are run in order.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import REPO, ManagedProcess, wait_until

DOCS = REPO / "docs"
MARKDOWN = sorted(DOCS.glob("*.md")) + [p for p in [REPO / "README.md"] if p.exists()]
GUIDE = DOCS / "getting-started.md"
PLUGIN = "hello_server:HelloServer"

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")
_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXPECT = re.compile(r"#\s*->\s*(.+?)\s*$")


class Block(NamedTuple):
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    options: frozenset  # words after the language, e.g. {"run", "file=client.py"}
    code: str

    @property
    def file(self) -> str | None:
        for option in self.options:
            if option.startswith("file="):
                return option[len("file="):]
        return None

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, words = match["fence"], match["info"].split()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        language = words[0] if words else ""
        blocks.append(
            Block(path, start + 1, language, frozenset(words[1:]), "\n".join(body) + "\n")
        )
    return blocks


def _outside_fences(path: Path) -> list[str]:
    kept, fence = [], None
    for line in path.read_text().splitlines():
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match["fence"]
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            kept.append(line)
    return kept


def prose(path: Path) -> str:
    """The text of a Markdown file outside fenced code blocks and inline code."""
    return "\n".join(re.sub(r"`+[^`]*`+", "", line) for line in _outside_fences(path))


def inline_code(path: Path) -> list[str]:
    """The inline code spans of a Markdown file, outside fenced code blocks."""
    return [m.group(1) for line in _outside_fences(path) for m in re.finditer(r"`([^`]+)`", line)]


# -- (a) links -------------------------------------------------------------------------------


def test_markdown_files_are_found():
    assert GUIDE in MARKDOWN
    for name in (
        "README.md", "concepts.md", "protocol.md", "architecture.md", "errors.md", "sharing.md"
    ):
        assert DOCS / name in MARKDOWN


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes for a Markdown file's headings."""
    slugs = set()
    for line in _outside_fences(path):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower().replace("`", "")
            slugs.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return slugs


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(path):
    broken = []
    for target in _LINK.findall(prose(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # a URL: http:, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part) if file_part else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    assert broken == [], f"{path.relative_to(REPO)} has broken links: {broken}"


# -- (b) ipcfw names -------------------------------------------------------------------------


def _imported_names(code: str) -> set[str]:
    """``module.name`` for every ``from ipcfw... import name`` and every ``ipcfw.x.y`` used."""
    names = {m.group(0).rstrip(".") for m in re.finditer(r"\bipcfw(?:\.[A-Za-z_]\w*)+", code)}
    for match in re.finditer(r"from\s+(ipcfw(?:\.\w+)*)\s+import\s+(\([^)]*\)|[^\n]+)", code):
        module, imported = match.group(1), match.group(2).strip("()")
        for item in imported.split(","):
            item = item.split("#")[0].split(" as ")[0].strip()
            if item.isidentifier():
                names.add(f"{module}.{item}")
    return names


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: index + 1]))
        except ImportError:
            return False
    return True


def _doc_names() -> list[tuple[str, str]]:
    found = []
    for path in sorted(DOCS.glob("*.md")):
        for block in code_blocks(path):
            for name in sorted(_imported_names(block.code)):
                found.append((block.where(), name))
        where = f"{path.relative_to(REPO)} (inline)"
        for name in sorted(set().union(*map(_imported_names, inline_code(path)))):
            found.append((where, name))
    return found


def test_docs_use_ipcfw_names():
    assert len(_doc_names()) > 20  # the extraction works


@pytest.mark.parametrize("where, name", _doc_names(), ids=lambda x: x)
def test_ipcfw_names_in_docs_exist(where, name):
    assert _resolves(name), f"{where}: {name} does not exist"


def test_python_blocks_are_valid_python():
    for path in sorted(DOCS.glob("*.md")):
        for block in code_blocks(path):
            if block.language == "python":
                try:
                    ast.parse(block.code)
                except SyntaxError as exc:
                    pytest.fail(f"{block.where()}: {exc}")


def test_ipcfw_ps_sample_matches_the_kernels_counters():
    from ipcfw.kernel import KernelState

    samples = [b for b in code_blocks(GUIDE) if "ipcfw-ps" in b.options]
    assert samples, "getting-started.md has no ```text ipcfw-ps block"
    for block in samples:
        shown = [line.split()[0] for line in block.code.splitlines() if line.strip()]
        assert shown == list(KernelState().statistics()), block.where()


# -- (c) the guide's code, run against real processes -----------------------------------------


def _ipcfw_command() -> list[str]:
    script = Path(sys.executable).with_name("ipcfw")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ipcfw"]


@pytest.fixture
def guide_dir(tmp_path):
    """The guide's `file=` blocks, saved as the reader would save them."""
    files = [b for b in code_blocks(GUIDE) if b.language == "python" and b.file]
    assert {"hello_server.py", "host_hello.py", "client.py"} <= {b.file for b in files}
    for block in files:
        (tmp_path / block.file).write_text(block.code)
    return tmp_path


def _env(kernel) -> dict[str, str]:
    # IPCFW_KERNEL points at the test kernel. PYTHONPATH holds only the repository (for an
    # uninstalled checkout): the guide's own files must be found the way the guide says, in the
    # current directory.
    return dict(os.environ, IPCFW_KERNEL=kernel.endpoint, PYTHONPATH=str(REPO))


def _start(kernel, workdir: Path, argv: list[str], label: str) -> ManagedProcess:
    child = ManagedProcess(argv, kernel.workdir / f"{label}.log", _env(kernel), str(workdir))
    kernel.children.append(child)  # stopped by the kernel fixture at teardown
    return child


def _wait_registered(kernel, child: ManagedProcess) -> None:
    wait_until(
        lambda: kernel.statistics()["servers"] == 1 or not child.alive(),
        what="the hello server to register",
    )
    assert child.alive(), f"{child.argv} exited:\n{child.log()}"


def _run_block(kernel, workdir: Path, block: Block, index: int) -> None:
    name = block.file or f"snippet_{index}.py"
    (workdir / name).write_text(block.code)
    result = subprocess.run(
        [sys.executable, name], cwd=str(workdir), env=_env(kernel), capture_output=True,
        text=True, timeout=30,
    )
    assert result.returncode == 0, f"{block.where()} failed:\n{result.stdout}\n{result.stderr}"
    output = result.stdout
    position = 0
    for line in block.code.splitlines():
        match = _EXPECT.search(line)
        if match is None:
            continue
        found = output.find(match.group(1), position)
        assert found >= 0, (
            f"{block.where()}: expected {match.group(1)!r} in the output, in order; got:\n{output}"
        )
        position = found + len(match.group(1))


def _run_blocks(kernel, workdir: Path) -> int:
    blocks = [b for b in code_blocks(GUIDE) if b.language == "python" and "run" in b.options]
    for index, block in enumerate(blocks):
        _run_block(kernel, workdir, block, index)
    return len(blocks)


def test_guide_serve_command_is_the_one_tested():
    commands = [b.code for b in code_blocks(GUIDE) if b.language == "sh"]
    assert any(f"ipcfw serve {PLUGIN}" in code for code in commands)


def test_guide_walkthrough_with_ipcfw_serve(kernel, guide_dir):
    server = _start(kernel, guide_dir, [*_ipcfw_command(), "serve", PLUGIN], "serve-hello")
    _wait_registered(kernel, server)
    assert _run_blocks(kernel, guide_dir) >= 3
    server.popen.send_signal(signal.SIGTERM)
    assert server.popen.wait(10) == 0, server.log()
    wait_until(lambda: kernel.statistics()["servers"] == 0, what="the name to be released")


def test_guide_host_from_python(kernel, guide_dir):
    host = _start(kernel, guide_dir, [sys.executable, "host_hello.py"], "host-hello")
    _wait_registered(kernel, host)
    client = next(b for b in code_blocks(GUIDE) if b.file == "client.py")
    _run_block(kernel, guide_dir, client, 0)
    host.popen.send_signal(signal.SIGINT)  # the guide's signal handler stops the host cleanly
    assert host.popen.wait(10) == 0, host.log()


# -- (d) other pages' code, run against real processes ----------------------------------------

_SERVE = re.compile(r"^\s*ipcfw serve (\S+:\S+)\s*$", re.MULTILINE)


def _runnable(path: Path) -> bool:
    return any(b.language == "python" and "run" in b.options for b in code_blocks(path))


RUNNABLE_PAGES = [p for p in sorted(DOCS.glob("*.md")) if p != GUIDE and _runnable(p)]


def test_pages_with_runnable_examples_are_found():
    assert DOCS / "sharing.md" in RUNNABLE_PAGES
    assert DOCS / "testing.md" in RUNNABLE_PAGES
    assert DOCS / "asyncio.md" in RUNNABLE_PAGES


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: p.name)
def test_page_examples_run(kernel, tmp_path, page):
    blocks = code_blocks(page)
    for block in blocks:
        if block.language == "python" and block.file:
            (tmp_path / block.file).write_text(block.code)
    plugins = [m for b in blocks if b.language == "sh" for m in _SERVE.findall(b.code)]
    servers = [
        _start(kernel, tmp_path, [*_ipcfw_command(), "serve", plugin], f"serve-{index}")
        for index, plugin in enumerate(plugins)
    ]
    wait_until(
        lambda: kernel.statistics()["servers"] == len(plugins)
        or not all(s.alive() for s in servers),
        what=f"{page.name}'s servers to register",
    )
    for server in servers:
        assert server.alive(), f"{server.argv} exited:\n{server.log()}"
    runs = [b for b in blocks if b.language == "python" and "run" in b.options]
    for index, block in enumerate(runs):
        _run_block(kernel, tmp_path, block, index)


# -- docs/cli-reference.md: generated from the argparse parsers ---------------------------------


def test_the_cli_reference_is_up_to_date():
    from ipcfw.tools import clidoc

    assert (DOCS / "cli-reference.md").read_text() == clidoc.render(), (
        f"docs/cli-reference.md is out of date; regenerate it with: {clidoc.COMMAND}"
    )


def test_the_cli_reference_names_every_command_and_option():
    from ipcfw.tools import clidoc
    from ipcfw.tools.bench.driver import build_parser as bench_parser
    from ipcfw.tools.cli import build_parser

    parser = build_parser()
    page = clidoc.render(parser)
    commands = clidoc.commands_of(parser)
    assert {"kernel", "serve", "wait", "demo", "bench", "terminate", "ps", "call"} <= set(commands)
    for name, command in [("", parser), *commands.items(), ("bench", bench_parser())]:
        if name:
            assert f"## `ipcfw {name}`" in page
        for action in clidoc.actions_of(command):
            if action.option_strings and action.help is not None and "--help" not in \
                    action.option_strings:
                assert f"`{action.option_strings[0]}" in page, (name, action.option_strings)
    call = clidoc.actions_of(commands["call"])
    assert [a.dest for a in call if not a.option_strings] == ["name", "function", "arguments"]
    assert "| `--timeout SECONDS` | `30.0` | give up on the connect" in page


def test_the_cli_reference_does_not_depend_on_the_machine(monkeypatch):
    from ipcfw.tools import clidoc

    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    page = clidoc.render()
    assert "/run/user/4242" not in page and clidoc.ENDPOINT_RULE in page
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert clidoc.render() == page
