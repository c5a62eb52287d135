"""Measured speed of the block at every tower count (medians of interleaved repeats)."""

from __future__ import annotations

import statistics

import pandas as pd
import torch

from towerspace.block import TowerConv2d, divisors


def _step(block: TowerConv2d, x: torch.Tensor, backward: bool) -> None:
    out = block(x)
    if backward:
        out.sum().backward()


def block_speed(
    channels: int,
    size: int,
    *,
    batch: int = 32,
    towers: list[int] | None = None,
    backward: bool = True,
    repeats: int = 5,
    min_run_time: float = 0.05,
    device: str = "cpu",
    threads: int | None = None,
) -> pd.DataFrame:
    """Time of TowerConv2d(channels, channels) per tower count, forward (+ backward).

    Repeats are interleaved across tower counts, so a slow moment of a shared machine hits every
    count alike; each row reports the median over repeats and the spread (max/min).
    """
    from torch.utils import benchmark  # imported here: its import probes for a CUDA toolkit

    counts = towers or divisors(channels)
    blocks = {t: TowerConv2d(channels, channels, towers=t).to(device) for t in counts}
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=backward)
    times: dict[int, list[float]] = {t: [] for t in counts}
    for _ in range(repeats):
        for t, block in blocks.items():
            timer = benchmark.Timer(
                stmt="step(block, x, backward)",
                globals={"step": _step, "block": block, "x": x, "backward": backward},
                num_threads=threads or torch.get_num_threads(),
            )
            times[t].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    rows = []
    for t in counts:
        cost = blocks[t].complexity(size, size)
        median = statistics.median(times[t])
        flops = batch * (cost.training_flops if backward else cost.flops)
        rows.append({"towers": t, "group_width": channels // t, "time_ms": 1e3 * median,
                     "spread": max(times[t]) / min(times[t]), "images_per_s": batch / median,
                     "gflops_per_s": flops / median / 1e9})  # fmt: skip
    return pd.DataFrame(rows)
