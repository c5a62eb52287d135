"""Measured cost of the block and models per tower count: interleaved repeats, medians, spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch
import torch.nn.functional as F

from towerspace.block import TowerConv2d, divisors
from towerspace.impls import IMPLS, Chooser, candidates


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int = 5,
    min_time: float = 0.05,
) -> dict[str, list[float]]:
    """Seconds per call of each function, in rounds that visit every function in turn.

    A noisy moment of a shared machine then slows every candidate alike, instead of one.
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
                _sync(device)
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            times[name].append(elapsed / calls)
    return times


def _layer_step(block: TowerConv2d, x: torch.Tensor, backward: bool) -> Callable[[], object]:
    def step() -> object:
        out = block(x)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    return step


def block_speed(
    channels: int,
    size: int,
    *,
    batch: int = 32,
    towers: list[int] | None = None,
    impls: list[str] | None = None,
    stride: int = 1,
    backward: bool = True,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    repeats: int = 5,
    min_time: float = 0.05,
) -> pd.DataFrame:
    """Time of TowerConv2d(channels, channels) per tower count and implementation.

    One row per (towers, impl): the median time per batch over interleaved repeats, the spread
    (max/min), throughput and achieved FLOP/s (FLOPs by formula: forward, or 3× for training).
    impls=None times native and the candidates worth trying at each count.
    """
    dev = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, size, size, device=dev, dtype=dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_(backward)
    fns, meta = {}, {}
    for t in towers or divisors(channels):
        for impl in impls or candidates(channels, t):
            if impl not in ("auto", *IMPLS) or (impl != "native" and t == 1):
                continue
            block = TowerConv2d(channels, channels, stride=stride, towers=t, impl=impl)
            block = block.to(dev, dtype, memory_format=fmt)
            fns[f"{t}/{impl}"] = _layer_step(block, x, backward)
            meta[f"{t}/{impl}"] = (t, impl, block.complexity(size, size))
    times = time_interleaved(fns, dev, repeats, min_time)
    peaks = {key: _peak_mb(fn, dev) for key, fn in fns.items()}
    rows = []
    for key, (t, impl, cost) in meta.items():
        median = statistics.median(times[key])
        flops = batch * (cost.training_flops if backward else cost.flops)
        rows.append({"towers": t, "group_width": channels // t, "impl": impl,
                     "time_ms": 1e3 * median, "spread": max(times[key]) / min(times[key]),
                     "images_per_s": batch / median, "gflops_per_s": flops / median / 1e9,
                     "peak_mb": peaks[key], "flops": flops,
                     "bytes": _bytes(x, cost, backward)})  # fmt: skip
    table = pd.DataFrame(rows)
    table["fastest"] = table["time_ms"] == table.groupby("towers")["time_ms"].transform("min")
    return table


def _peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call on CUDA (allocator statistics); NaN on the CPU, which has none."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _bytes(x: torch.Tensor, cost, backward: bool) -> int:
    """Memory traffic estimate: input, intermediate and output read and written once, weights
    once (3× for a training step, which reads them again for both gradients)."""
    n, c = x.shape[0], x.shape[1]
    activations = n * c * (x.shape[2] * x.shape[3] + 2 * cost.height * cost.width)
    return (3 if backward else 1) * 2 * (activations + cost.params) * x.element_size()


def auto_choices(
    channels: int, size: int, *, batch: int = 32, towers: list[int] | None = None,
    backward: bool = True, device: str = "cpu", repeats: int = 3,
) -> dict[int, str]:  # fmt: skip
    """What impl='auto' picks at each tower count for this layer shape."""
    chooser = Chooser(repeats=repeats)
    dev = torch.device(device)
    x = torch.randn(batch, channels, size, size, device=dev)
    picks = {}
    for t in towers or divisors(channels):
        block = TowerConv2d(channels, channels, towers=t, impl="auto").to(dev).train(backward)
        picks[t] = "native" if t == 1 else chooser.choose(block, x, backward)
    return picks


def machine_roofs(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Measured roofs: dense 3×3 convolution FLOP/s and memory copy bandwidth (GB/s)."""
    dev = torch.device(device)
    x = torch.randn(32, 256, 32, 32, device=dev, dtype=dtype)
    w = torch.randn(256, 256, 3, 3, device=dev, dtype=dtype)
    big = torch.empty(64 * 2**20 // x.element_size(), device=dev, dtype=dtype)
    out = torch.empty_like(big)
    times = time_interleaved(
        {"conv": lambda: F.conv2d(x, w, padding=1), "copy": lambda: out.copy_(big)}, dev, 3, 0.2
    )
    conv_flops = 2 * 32 * 256 * 256 * 9 * 32 * 32
    copied = 2 * big.numel() * big.element_size()  # read + write
    return {"dense_conv_gflops_per_s": conv_flops / min(times["conv"]) / 1e9,
            "bandwidth_gb_per_s": copied / min(times["copy"]) / 1e9}  # fmt: skip


def model_speed(
    towers: list, *, size: int, batch: int = 32, impl: str = "native", device: str = "cpu",
    repeats: int = 3, **model_kwargs,
) -> pd.DataFrame:  # fmt: skip
    """Training-step time of a whole Xception at each tower spec (forward + backward)."""
    from towerspace.models import xception

    dev = torch.device(device)
    fns, meta = {}, {}
    for spec in towers:
        model = xception(towers=spec, input_size=size, impl=impl, **model_kwargs).to(dev)
        x = torch.randn(batch, model.stem[0].in_channels, size, size, device=dev)
        fns[str(spec)] = lambda m=model, inp=x: m(inp).sum().backward()
        meta[str(spec)] = model.complexity(size)
    times = time_interleaved(fns, dev, repeats, 0.2)
    rows = []
    for key, cost in meta.items():
        median = statistics.median(times[key])
        rows.append({"towers": key, "params": cost.params, "training_flops": cost.training_flops,
                     "step_ms": 1e3 * median, "spread": max(times[key]) / min(times[key]),
                     "images_per_s": batch / median,
                     "gflops_per_s": batch * cost.training_flops / median / 1e9})  # fmt: skip
    return pd.DataFrame(rows)
