"""Shared fixtures: one real local Ray for the whole session."""

import pytest


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray with this machine's CPUs, started once and shut down at the end."""
    from towerspace.sweep import init_ray

    init_ray(None)
    yield
    import ray

    ray.shutdown()
