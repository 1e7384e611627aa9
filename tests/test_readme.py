"""README.md gives the set-up commands; .ci/run must run exactly the test command it gives; and
README's start-up lines work pasted as one script."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_readme_gives_exactly_two_setup_commands():
    commands = readme_commands()
    assert len(commands) == 2, commands
    demo, tests = commands
    assert demo.endswith("ipcfw demo")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


# -- README's start-up lines, pasted as one script ------------------------------------------------


def readme_example() -> tuple[dict[str, str], str]:
    """The files of README's "A server and a client" (named by their first line's comment,
    ``# greeter.py``) and its start-up lines."""
    section = (REPO / "README.md").read_text().split("## A server and a client", 1)[1]
    section = section.split("\n## ", 1)[0]
    files = {}
    for code in re.findall(r"```python\n(.+?)\n```", section, re.DOTALL):
        name = re.match(r"# (\S+\.py)", code)
        assert name, f"a README python block without a '# NAME.py' first line:\n{code}"
        files[name[1]] = code + "\n"
    scripts = re.findall(r"```sh\n(.+?)\n```", section, re.DOTALL)
    assert len(scripts) == 1, scripts
    return files, scripts[0]


def test_readme_start_up_lines_are_three():
    files, script = readme_example()
    assert set(files) == {"greeter.py", "client.py"}
    lines = script.splitlines()
    assert len(lines) == 3 and lines[0].startswith("ipcfw kernel")
    assert "ipcfw serve" in lines[1] and lines[2].startswith("python client.py")


@pytest.mark.process
@pytest.mark.usefixtures("data_path")
def test_readme_start_up_lines_work_pasted_as_one_script(tmp_path):
    """The issue's report: pasted as a script, the client started before the kernel listened
    (KErrCouldNotConnect), 3 times in 3. Run here as a user would: the default endpoint (in a
    private XDG_RUNTIME_DIR), `ipcfw` and `python` from the environment's bin directory."""
    files, script = readme_example()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "startup.sh").write_text(script + "\n")
    runtime = Path(tempfile.mkdtemp(prefix="ipcfw-xdg-", dir="/tmp"))
    os.chmod(runtime, 0o700)
    env = {k: v for k, v in os.environ.items() if k not in ("IPCFW_KERNEL", "PYTHONPATH")}
    env.update(XDG_RUNTIME_DIR=str(runtime),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    log_path = tmp_path / "startup.log"
    with open(log_path, "wb") as log:
        # A session of its own: the kernel and the server it leaves in the background are in
        # its process group, which the test stops at the end.
        shell = subprocess.Popen(["bash", "startup.sh"], cwd=tmp_path, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    try:
        status = shell.wait(timeout=45)
        output = log_path.read_text(errors="replace")
        assert status == 0, output
        assert re.search(r"^hello, world - the server saw our pid: \d+$", output, re.MULTILINE), \
            output
    finally:
        _stop_group(shell.pid)
        shutil.rmtree(runtime, ignore_errors=True)


def _stop_group(pgid: int, timeout: float = 10.0) -> None:
    """SIGTERM process group `pgid`, wait up to `timeout` for it to be gone, then SIGKILL it."""
    deadline = time.monotonic() + timeout
    try:
        os.killpg(pgid, signal.SIGTERM)
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # raises once the group is empty
            time.sleep(0.05)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
