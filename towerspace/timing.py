"""Wall-clock timing of functions in interleaved rounds, so that noise hits every one alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int = 5,
    min_time: float = 0.05,
) -> dict[str, list[float]]:
    """Seconds per call of each function, in rounds that visit every function in turn.

    Each measurement calls its function at least once and for at least min_time. A noisy
    moment of a shared machine then slows every candidate alike, instead of one.
    """
    for fn in fns.values():  # warm-up: allocations, kernel selection, lazy init
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                sync(device)
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            times[name].append(elapsed / calls)
    return times
