"""Measured cost of the block and models per tower count: interleaved repeats, medians, spread."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from towerspace import memory
from towerspace.block import Complexity, TowerConv2d
from towerspace.impls import IMPLS, Chooser, candidates
from towerspace.timing import sync, time_interleaved
from towerspace.towers import divisors

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _layer_step(layer: nn.Module, x: torch.Tensor, backward: bool) -> Callable[[], object]:
    def step() -> object:
        out = layer(x)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    return step


def _impls_at(channels: int, towers: int, impls: list[str] | None) -> list[str]:
    """The implementations to time at one tower count (only native at one tower)."""
    names = impls or candidates(channels, towers)
    return [n for n in names if n in ("auto", *IMPLS) and (n == "native" or towers > 1)]


def block_speed(
    channels: int,
    size: int,
    *,
    batch: int = 32,
    towers: list[int] | None = None,
    impls: list[str] | None = None,
    stride: int = 1,
    mid: str = "none",
    folded: bool = False,
    backward: bool = True,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    repeats: int = 5,
    min_time: float = 0.05,
) -> pd.DataFrame:
    """Time of TowerConv2d(channels, channels) per tower count and implementation.

    One row per (towers, impl): the median time per batch over interleaved repeats, the spread
    (max/min), throughput, achieved FLOP/s (FLOPs by formula: forward, or 3× for training) and
    peak_mb, the memory one call adds (see _peak_mb; NaN where it cannot be measured).
    impls=None times native and the candidates worth trying at each count. folded=True (with
    mid='none') adds impl='as_conv2d': the block folded into one dense conv (as_conv2d()), timed
    once, since its cost does not depend on the tower count it came from, and repeated at every
    count as a reference. Its FLOP/s count the block's FLOPs (the same function), so it compares
    by time; `fastest` marks the fastest implementation of the block, never this reference.
    """
    dev = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, size, size, device=dev, dtype=dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_(backward)
    fns, costs, keys = {}, {}, []
    for t in towers or divisors(channels):
        block = TowerConv2d(channels, channels, stride=stride, towers=t, mid=mid)
        costs[t] = block.complexity(size, size)
        for impl in _impls_at(channels, t, impls):
            block.impl = impl
            fns[f"{t}/{impl}"] = _layer_step(copy.deepcopy(block).to(dev, dtype, memory_format=fmt),
                                             x, backward)  # fmt: skip
            keys.append((t, impl, f"{t}/{impl}"))
    if folded and mid == "none":
        fns["as_conv2d"] = _layer_step(block.as_conv2d().to(dev, dtype, memory_format=fmt), x,
                                       backward)  # fmt: skip
        keys += [(t, "as_conv2d", "as_conv2d") for t in costs]
    times = time_interleaved(fns, dev, repeats, min_time)
    peaks = {key: _peak_mb(fn, dev) for key, fn in fns.items()}
    rows = [_speed_row(t, impl, times[key], peaks[key], costs[t], x, backward)
            for t, impl, key in keys]  # fmt: skip
    return _mark_fastest(pd.DataFrame(rows).sort_values("towers", kind="stable", ignore_index=True))


def _speed_row(
    towers: int, impl: str, times: list[float], peak: float, cost: Complexity, x: torch.Tensor,
    backward: bool,
) -> dict:  # fmt: skip
    """One row of block_speed's table."""
    batch, channels = x.shape[0], x.shape[1]
    median = statistics.median(times)
    flops = batch * (cost.training_flops if backward else cost.flops)
    return {"towers": towers, "group_width": channels // towers, "impl": impl,
            "time_ms": 1e3 * median, "spread": max(times) / min(times),
            "images_per_s": batch / median, "gflops_per_s": flops / median / 1e9,
            "peak_mb": peak, "flops": flops, "bytes": _bytes(x, cost, backward)}  # fmt: skip


def _mark_fastest(table: pd.DataFrame) -> pd.DataFrame:
    """Flag the fastest implementation of the block at each tower count (not as_conv2d)."""
    own = table["impl"] != "as_conv2d"
    best = table[own].groupby("towers")["time_ms"].min()
    table["fastest"] = own & (table["time_ms"] == table["towers"].map(best))
    return table


def _peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Memory one call adds at its peak, MiB: CUDA allocator statistics, or on a CPU the rise of
    the process's peak RSS (Linux /proc); NaN where neither is available."""
    sync(device)
    memory.reset_peak(device)
    base = memory.now_mb(device)
    fn()
    sync(device)
    return memory.peak_mb(device) - base


def _bytes(x: torch.Tensor, cost, backward: bool) -> int:
    """Memory traffic estimate: input, intermediate and output read and written once, weights
    once (3× for a training step, which reads them again for both gradients)."""
    n, c = x.shape[0], x.shape[1]
    activations = n * c * (x.shape[2] * x.shape[3] + 2 * cost.height * cost.width)
    return (3 if backward else 1) * 2 * (activations + cost.params) * x.element_size()


def auto_choices(
    channels: int, size: int, *, batch: int = 32, towers: list[int] | None = None,
    backward: bool = True, device: str = "cpu", repeats: int = 3,
    dtype: torch.dtype = torch.float32, channels_last: bool = False,
) -> dict[int, str]:  # fmt: skip
    """What impl='auto' picks at each tower count for this layer shape."""
    chooser = Chooser(repeats=repeats)
    dev = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, size, size, device=dev, dtype=dtype).contiguous(
        memory_format=fmt)  # fmt: skip
    picks = {}
    for t in towers or divisors(channels):
        block = TowerConv2d(channels, channels, towers=t, impl="auto")
        block = block.to(dev, dtype, memory_format=fmt).train(backward)
        picks[t] = "native" if t == 1 else chooser.choose(block, x, backward)
    return picks


def machine_roofs(
    device: str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 32
) -> dict[str, float]:
    """Measured roofs: dense 3×3 convolution FLOP/s and memory copy bandwidth (GB/s)."""
    dev = torch.device(device)
    x = torch.randn(batch, 256, 32, 32, device=dev, dtype=dtype)
    w = torch.randn(256, 256, 3, 3, device=dev, dtype=dtype)
    big = torch.empty(64 * 2**20 // x.element_size(), device=dev, dtype=dtype)
    out = torch.empty_like(big)
    times = time_interleaved(
        {"conv": lambda: F.conv2d(x, w, padding=1), "copy": lambda: out.copy_(big)}, dev, 3, 0.2
    )
    conv_flops = 2 * batch * 256 * 256 * 9 * 32 * 32
    copied = 2 * big.numel() * big.element_size()  # read + write
    return {"dense_conv_gflops_per_s": conv_flops / min(times["conv"]) / 1e9,
            "bandwidth_gb_per_s": copied / min(times["copy"]) / 1e9}  # fmt: skip


def with_roof_efficiency(table: pd.DataFrame, roofs: dict[str, float]) -> pd.DataFrame:
    """The table with roof_efficiency: the time its FLOPs take at the measured dense-conv rate,
    or its bytes at the measured bandwidth, whichever is longer, over the time it took (1: at
    the roof)."""
    seconds = table["time_ms" if "time_ms" in table else "step_ms"] / 1e3
    at_roof = pd.concat(
        [
            table["flops"] / (roofs["dense_conv_gflops_per_s"] * 1e9),
            table["bytes"] / (roofs["bandwidth_gb_per_s"] * 1e9),
        ],
        axis=1,
    ).max(axis=1)
    return table.assign(roof_efficiency=at_roof / seconds)


def model_speed(
    towers: list, *, size: int, batch: int = 32, impl: str = "native", device: str = "cpu",
    repeats: int = 3, **model_kwargs,
) -> pd.DataFrame:  # fmt: skip
    """Training-step time of a whole Xception at each tower spec (forward + backward).

    One row per spec, with the columns of block_speed where they apply: step_ms (median),
    spread, throughput, achieved FLOP/s, peak_mb, and the flops and bytes (memory traffic
    estimate, _model_bytes) of one step for the bandwidth roof.
    """
    from towerspace.models import xception

    dev = torch.device(device)
    fns, meta = {}, {}
    for spec in towers:
        model = xception(towers=spec, input_size=size, impl=impl, **model_kwargs).to(dev)
        x = torch.randn(batch, model.stem[0].in_channels, size, size, device=dev)
        fns[str(spec)] = lambda m=model, inp=x: m(inp).sum().backward()
        meta[str(spec)] = (model.complexity(size), _model_bytes(model, x))
    times = time_interleaved(fns, dev, repeats, 0.2)
    rows = []
    for key, (cost, traffic) in meta.items():
        median, flops = statistics.median(times[key]), batch * cost.training_flops
        rows.append({"towers": key, "impl": impl, "params": cost.params,
                     "training_flops": cost.training_flops, "step_ms": 1e3 * median,
                     "spread": max(times[key]) / min(times[key]), "images_per_s": batch / median,
                     "gflops_per_s": flops / median / 1e9, "peak_mb": _peak_mb(fns[key], dev),
                     "flops": flops, "bytes": traffic})  # fmt: skip
    return pd.DataFrame(rows)


def _model_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Memory traffic estimate of a training step: each leaf module reads its inputs and
    parameters and writes its output once in the forward; 3× that for forward + backward."""
    counted = [0]

    def count(module: nn.Module, inputs: tuple, output: object) -> None:
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        counted[0] += sum(t.numel() for t in (*tensors, *module.parameters(recurse=False)))

    leaves = [
        m for m in model.modules() if not list(m.children()) and not isinstance(m, nn.Identity)
    ]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return 3 * counted[0] * x.element_size()


def model_speed_figure(
    table: pd.DataFrame,
    roofs: dict[str, float] | None = None,
    title: str = "Xception training step per tower spec",
) -> Figure:
    """Step time and achieved FLOP/s per tower spec (model_speed tables), with the machine's
    measured dense-conv FLOP/s and bandwidth roof (copy bandwidth × flops / bytes)."""
    from matplotlib.figure import Figure

    from towerspace.plots import one_legend

    specs = list(dict.fromkeys(table["towers"]))
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for impl, rows in table.groupby("impl", sort=False):
        at = rows["towers"].map(specs.index)
        left.plot(at, rows["step_ms"], marker="o", label=impl)
        right.plot(at, rows["gflops_per_s"], marker="o", label=impl)
    if roofs:
        right.axhline(roofs["dense_conv_gflops_per_s"], color="#555555", ls="--",
                      label="dense conv (measured)")  # fmt: skip
        first = table.drop_duplicates("towers")
        right.plot(first["towers"].map(specs.index),
                   roofs["bandwidth_gb_per_s"] * first["flops"] / first["bytes"], color="#555555",
                   ls=":", label="bandwidth roof")  # fmt: skip
    for ax, label in ((left, "time per step (ms, median)"), (right, "achieved GFLOP/s")):
        ax.set_xticks(range(len(specs)), specs, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("tower spec")
        ax.set_ylabel(label)
    one_legend(fig, loc="outside right upper", fontsize=8,
               title="implementation / roof" if roofs else "implementation")  # fmt: skip
    fig.suptitle(title, fontsize=10)
    return fig
