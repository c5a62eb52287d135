"""Shared fixtures: one real local Ray, and one real tiny sweep, for the whole session."""

import contextlib
import pickle
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray with this machine's CPUs, started once and shut down at the end."""
    from towerspace.sweep import init_ray

    init_ray(None)
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sweep(local_ray, tmp_path_factory, worker_id):
    """A real sweep: digits, 3 parameter-matched points x 2 seeds, 1 epoch each. Run once for
    the whole run: under pytest-xdist the first process to ask runs it and the others read it
    (the tests only read it; those that change a sweep copy it first)."""
    if worker_id == "master":
        return _tiny_sweep(tmp_path_factory.mktemp("runs"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above each process's
    saved = shared / "tiny_sweep.pickle"
    with FileLock(str(shared / "tiny_sweep.lock")):
        if not saved.is_file():
            saved.write_bytes(pickle.dumps(_tiny_sweep(shared / "tiny_sweep")))
    return pickle.loads(saved.read_bytes())


def _tiny_sweep(storage: Path):
    from towerspace import config
    from towerspace.sweep import run_sweep

    sets = ("train.epochs=1", "model.width=0.125", "model.middle_blocks=1", "seeds=[0, 1]",
            "space.params={model.towers: {grid: [1, 4, depthwise]}}")  # fmt: skip
    cfg = config.load_experiment(REPO / "experiments/digits_continuum.yaml", sets)
    return run_sweep(cfg, storage=storage)


@contextlib.contextmanager
def _mounted(mount: Path, size: str):
    """A tmpfs of its own at mount (a full or read-only disk to test on); skips the test where
    mounting is not permitted (it needs root and mount permission)."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def tmpfs():
    """Mount a tmpfs: `with tmpfs(folder, "16m") as mount:` (the test skips where not allowed)."""
    return _mounted


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with the real search spaces and an experiments/ folder, as the cwd."""
    shutil.copytree(REPO / "search_spaces", tmp_path / "search_spaces")
    (tmp_path / "experiments").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _records_now(sweep_dir: Path) -> list[dict]:
    from towerspace import results

    with warnings.catch_warnings():  # trials that started but have written no record yet
        warnings.simplefilter("ignore", results.DamagedRecord)
        return results.read_records(sweep_dir)


@pytest.fixture
def records_now():
    """Read a running sweep's records as they are now (each is written whole, by a rename)."""
    return _records_now


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each test process and what it starts (drivers, notebook kernels, the
    device check) computes on its share of the cores: make test runs as many processes as this
    machine has cores, and thread pools each as wide as the machine spin against each other
    (measured: the in-process tests took twice the CPU time). Trials on Ray set their own."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
        torch.set_num_threads(share)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first: run in two processes (make test), the long ones start at once and the
    short ones fill the gaps at the end. GPU tests skip, saying why, where no GPU is visible."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(
                reason=f"needs a CUDA device; none is visible here (torch "
                f"{torch.__version__}, CUDA {torch.version.cuda})"
            )
            for item in gpu:
                item.add_marker(skip)
