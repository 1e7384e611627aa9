"""The wheel on its own: built from the project's files, installed (not editable) in a new
environment, and run from a directory that is not the checkout, its demo, bench, version and
example clients work; and the tests' own processes import the ipcfw the tests do (which is how
.ci/run's smoke run tests the installed wheel and not this checkout)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq

import ipcfw
from conftest import REPO

# What `pip wheel .` reads: pyproject.toml names the packages, README.md is the description.
SOURCES = ("pyproject.toml", "README.md", "ipcfw", "servers", "clients")
STEP_TIMEOUT = 60.0


@pytest.mark.smoke
def test_the_processes_the_tests_start_import_the_ipcfw_the_tests_do(kernel):
    result = kernel.client(["-c", "import ipcfw; print(ipcfw.__file__)"], timeout=STEP_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ipcfw.__file__


def test_the_wheel_lists_every_package_and_maps_the_examples():
    # pyproject.toml lists the packages (packages.find cannot see the mapped examples): a new
    # package under ipcfw/ must be listed, or the wheel would go without it.
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {"ipcfw.examples.servers": "servers", "ipcfw.examples.clients": "clients"}
    assert config["package-dir"] == mapped
    in_tree = {init.parent.relative_to(REPO).as_posix().replace("/", ".")
               for init in (REPO / "ipcfw").rglob("__init__.py")}
    assert sorted(config["packages"]) == sorted(in_tree | set(mapped))
    for directory in mapped.values():
        assert (REPO / directory / "__init__.py").is_file()


def test_the_changelog_s_top_version_is_the_version_and_nothing_else_writes_it():
    changelog = (REPO / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.MULTILINE)
    assert versions and versions[0] == ipcfw.__version__, (
        f"CHANGELOG.md's newest version is {versions[:1]}, ipcfw.__version__ is "
        f"{ipcfw.__version__}: add a section for it"
    )
    one_place = REPO / "ipcfw" / "__init__.py"
    files = [REPO / "pyproject.toml", REPO / "README.md", *(REPO / "docs").glob("*.md"),
             *(p for d in ("ipcfw", "servers", "clients") for p in (REPO / d).rglob("*.py"))]
    written = [str(path.relative_to(REPO)) for path in files
               if path != one_place and ipcfw.__version__ in path.read_text()]
    assert written == [], f"the version is written outside {one_place.name}: {written}"
    assert one_place.read_text().count(ipcfw.__version__) == 1


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stdout}\n" \
                                   f"{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The wheel built from a copy of the project's files and installed in a new environment
    without pip (this environment's pip installs into it), whose dependencies are this one's
    (a .pth file names their directory: no index is needed). Returns the new environment's
    python and the environment to run it with (no IPCFW_KERNEL, no PYTHONPATH)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", str(source), "-w", str(tmp / "dist"), "--no-deps"], tmp,
         timeout=120)
    wheels = list((tmp / "dist").glob("ipcfw-*.whl"))
    assert [w.name for w in wheels] == [f"ipcfw-{ipcfw.__version__}-py3-none-any.whl"]

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheels[0])],
         tmp)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    dependencies = {str(Path(module.__file__).resolve().parents[1])
                    for module in (zmq, msgpack, psutil)}
    (site / "ipcfw-test-dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("IPCFW_KERNEL", "PYTHONPATH", "IPCFW_PATH")}
    return python, env


@pytest.mark.process
@pytest.mark.timeout(240)
def test_the_installed_wheel_runs_the_demo_the_bench_and_its_version(installed, tmp_path):
    python, env = installed
    where = _run([str(python), "-c", "import ipcfw, ipcfw.examples.servers.echo as e; "
                                     "print(ipcfw.__file__); print(e.__file__)"], tmp_path, env)
    for path in where.stdout.split():
        assert Path(path).is_relative_to(python.parent.parent), where.stdout  # not the checkout

    version = _run([str(python), "-m", "ipcfw", "--version"], tmp_path, env)
    assert version.stdout.strip() == f"ipcfw {ipcfw.__version__}"

    demo = _run([str(python.parent / "ipcfw"), "demo"], tmp_path, env, timeout=120)
    for name in ("echo", "kv", "notifier"):
        assert f"  {name:<9} ok  (" in demo.stdout, demo.stdout
    assert demo.stdout.rstrip().endswith("stopped kernel and 3 servers"), demo.stdout
    assert demo.stderr == ""

    bench = _run([str(python), "-m", "ipcfw", "bench", "--quick", "--shared", "0", "--fleet",
                  "0", "--open-sessions", "0", "--descriptor-mib", "0", "--connections", "0",
                  "--churn", "0"], tmp_path, env, timeout=120)
    assert "ipcfw-direct " in bench.stdout and "ipcfw " in bench.stdout, bench.stdout


@pytest.mark.process
def test_an_installed_example_client_names_the_installed_plugin(installed, kernel, tmp_path):
    # No kv server registered: the client says how to start one, in the wheel's layout.
    python, env = installed
    result = subprocess.run(
        [str(python), "-m", "ipcfw.examples.clients.kv_client"], cwd=tmp_path,
        env={**env, "IPCFW_KERNEL": kernel.endpoint}, capture_output=True, text=True,
        timeout=STEP_TIMEOUT,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ipcfw serve ipcfw.examples.servers.kv:KvServer" in result.stderr
