"""The package as a user installs it: a wheel built offline carries the shipped search spaces and
experiments, and, installed in a fresh venv, runs a shipped experiment by name from a folder
outside the checkout."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a wheel build, a venv, a real sweep in its own process

REPO = Path(__file__).resolve().parent.parent
# what a checkout holds beside the sources: never part of a build
NOT_SOURCES = (".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__",
               ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints")  # fmt: skip
PIP_OFFLINE = ("--no-index", "--disable-pip-version-check", "--quiet")


def _run(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (so the build leaves nothing in it), offline,
    with the setuptools of this environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    _ok(_run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             *PIP_OFFLINE, "-w", tmp / "dist", source, cwd=tmp))  # fmt: skip
    (built,) = (tmp / "dist").glob("towerspace-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed. The dependencies (torch, Ray, ...) come from this
    environment's site-packages through a .pth file: `venv --system-site-packages` would give
    the base interpreter's, not this venv's."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    _ok(_run(sys.executable, "-m", "venv", "--without-pip", root, cwd=root.parent))
    python = root / "bin" / "python"
    site = Path(_ok(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                         cwd=root)).strip())  # fmt: skip
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "towerspace_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    _ok(_run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
             *PIP_OFFLINE, wheel, cwd=root))  # fmt: skip
    return root


def test_the_wheel_carries_the_shipped_files(wheel):
    with zipfile.ZipFile(wheel) as archive:
        for kind in ("search_spaces", "experiments"):
            files = sorted((REPO / kind).glob("*.yaml"))
            assert len(files) >= 6
            for path in files:  # the same bytes as the repository's folders
                assert archive.read(f"towerspace/shipped/{kind}/{path.name}") == path.read_bytes()
            inside = [n for n in archive.namelist() if n.startswith(f"towerspace/shipped/{kind}/")]
            assert len(inside) == len(files)


def test_the_installed_wheel_runs_a_shipped_experiment_by_name(venv, tmp_path):
    bin_ = venv / "bin"
    where = _ok(_run(bin_ / "python", "-c", "import towerspace; print(towerspace.__file__)",
                     cwd=tmp_path))  # fmt: skip
    assert Path(where.strip()).is_relative_to(venv)  # the installed copy, not the checkout
    assert _ok(_run(bin_ / "towerspace", "--version", cwd=tmp_path)).startswith("towerspace ")
    listed = _ok(_run(bin_ / "towerspace", "experiments", cwd=tmp_path)).splitlines()
    assert ["digits_continuum", "package"] in [line.split()[:2] for line in listed]
    assert "continuum" in _ok(_run(bin_ / "towerspace", "spaces", cwd=tmp_path))
    _ok(_run(bin_ / "towerspace", "sweep", "digits_continuum", "--smoke", "--storage",
             tmp_path / "runs", cwd=tmp_path))  # fmt: skip
    assert (tmp_path / "runs/digits_continuum/results.parquet").is_file()
