"""Shared fixtures: one real local Ray, and one real tiny sweep, for the whole session."""

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
def tiny_sweep(local_ray, tmp_path_factory):
    """A real sweep: digits, 3 parameter-matched points x 2 seeds, 1 epoch each."""
    from towerspace import config
    from towerspace.sweep import run_sweep

    sets = ("train.epochs=1", "model.width=0.125", "model.middle_blocks=1", "seeds=[0, 1]",
            "space.params={model.towers: {grid: [1, 4, depthwise]}}")  # fmt: skip
    cfg = config.load_experiment(REPO / "experiments/digits_continuum.yaml", sets)
    return run_sweep(cfg, storage=tmp_path_factory.mktemp("runs"))
