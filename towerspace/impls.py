"""Ways to compute a grouped k×k convolution; each equals F.conv2d(x, w, groups=g)."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from towerspace.files import write_json
from towerspace.timing import time_interleaved

Conv = Callable[[Tensor, Tensor, int, int, int, int], Tensor]  # x, weight, groups, stride, pad, dil


def native(x: Tensor, w: Tensor, groups: int, stride: int, padding: int, dilation: int) -> Tensor:
    """PyTorch's grouped convolution on the input as it comes."""
    return F.conv2d(x, w, None, stride, padding, dilation, groups)


def channels_last(x: Tensor, w: Tensor, groups: int, stride: int, padding: int, dilation: int):
    """The native convolution in NHWC, where depthwise and grouped kernels are often faster."""
    x = x.contiguous(memory_format=torch.channels_last)
    w = w.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, w, None, stride, padding, dilation, groups)


def dense(x: Tensor, w: Tensor, groups: int, stride: int, padding: int, dilation: int) -> Tensor:
    """One dense convolution with a block-diagonal kernel: g× the FLOPs, the fastest kernels."""
    return F.conv2d(x, expand_grouped(w, groups), None, stride, padding, dilation)


def per_tower(x: Tensor, w: Tensor, groups: int, stride: int, padding: int, dilation: int):
    """One dense convolution per tower, concatenated (few, wide towers)."""
    xs, ws = x.chunk(groups, dim=1), w.chunk(groups, dim=0)
    outs = [F.conv2d(a, b, None, stride, padding, dilation) for a, b in zip(xs, ws, strict=True)]
    return torch.cat(outs, dim=1)


def depthwise_sum(x: Tensor, w: Tensor, groups: int, stride: int, padding: int, dilation: int):
    """A sum of group-width depthwise convolutions over gathered inputs (narrow towers).

    Output channel o of tower t reads input channel t·w + j through kernel w[o, j]; for each j,
    gathering those inputs lines them up with their outputs, and a depthwise conv does the rest.
    """
    c_out, width = w.shape[0], w.shape[1]
    per_group = c_out // groups
    tower = torch.arange(c_out, device=x.device) // per_group
    out = None
    for j in range(width):
        gathered = x.index_select(1, tower * width + j)
        y = F.conv2d(gathered, w[:, j : j + 1], None, stride, padding, dilation, c_out)
        out = y if out is None else out + y
    return out


def unfold_bmm(x: Tensor, w: Tensor, groups: int, stride: int, padding: int, dilation: int):
    """im2col and one batched matrix product per tower."""
    n, _, h, wd = x.shape
    c_out, width, k = w.shape[0], w.shape[1], w.shape[2]
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)  # (n, c·k², L)
    out_h = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    out_w = (wd + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    cols = cols.view(n, groups, width * k * k, out_h * out_w)
    kernel = w.reshape(groups, c_out // groups, width * k * k)  # NHWC weights: a copy
    out = torch.einsum("gok,ngkl->ngol", kernel, cols)
    return out.reshape(n, c_out, out_h, out_w)


def expand_grouped(weight: Tensor, groups: int, coarser: int = 1) -> Tensor:
    """A grouped kernel (C, C/g, k, k) as the kernel of a convolution with `coarser` groups
    (a divisor of g; 1: dense), block-diagonal within each: zero where towers do not meet."""
    m = groups // coarser  # towers per coarse group
    channels, width = weight.shape[0], weight.shape[1]
    per_group = channels // groups
    blocks = weight.reshape(coarser, m, per_group, width, *weight.shape[2:])
    expanded = weight.new_zeros(coarser, m, per_group, m, width, *weight.shape[2:])
    index = torch.arange(m, device=weight.device)
    expanded[:, index, :, index] = blocks.transpose(0, 1)  # advanced indices come first
    return expanded.reshape(channels, m * width, *weight.shape[2:])


def regroup(factor: int) -> Conv:
    """The native convolution at 1/factor of the towers, with a block-diagonal kernel: the cost
    of fewer towers (factor× the FLOPs), where more towers hit a slow kernel."""

    def conv(x: Tensor, w: Tensor, groups: int, stride: int, padding: int, dilation: int):
        coarser = math.gcd(groups, max(1, groups // factor))  # a divisor of groups
        kernel = expand_grouped(w, groups, coarser)
        return F.conv2d(x, kernel, None, stride, padding, dilation, coarser)

    conv.__doc__ = f"The native convolution at 1/{factor} of the towers (block-diagonal kernel)."
    return conv


REGROUP_FACTORS = (2, 4, 8)  # regroupF: towers/F groups, for a tower count with a slow kernel
IMPLS: dict[str, Conv] = {
    "native": native,
    "channels_last": channels_last,
    "dense": dense,
    "per_tower": per_tower,
    "depthwise_sum": depthwise_sum,
    "unfold_bmm": unfold_bmm,
    **{f"regroup{f}": regroup(f) for f in REGROUP_FACTORS},
}


def candidates(channels: int, groups: int) -> list[str]:
    """The implementations worth timing for a shape: skip the ones that cannot win."""
    width = channels // groups
    names = ["native", "channels_last"]
    if groups <= 8 and groups > 1:
        names += ["dense", "per_tower"]
    if 1 < width <= 8:
        names.append("depthwise_sum")
    if groups > 1:
        names.append("unfold_bmm")
    names += [f"regroup{f}" for f in REGROUP_FACTORS if groups % f == 0 and groups // f > 1]
    return names


def signature(block: nn.Module, x: Tensor, training: bool) -> str:
    """What the fastest implementation depends on, apart from the batch size.

    The block, one image's shape (channels × height × width), layout, dtype, device and mode:
    a trial's last partial batch and its evaluation batches reuse the choice timed at the
    first batch size seen, instead of timing every candidate again mid-trial.
    """
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1
    return (f"{x.device.type}|{str(x.dtype).removeprefix('torch.')}|{'nhwc' if nhwc else 'nchw'}|"
            f"{'train' if training else 'eval'}|{'x'.join(map(str, x.shape[1:]))}|"
            f"{block.in_channels}>{block.out_channels}|k{block.kernel_size}|s{block.stride}|"
            f"d{block.dilation}|t{block.towers}|{block.order}|{block.mid}")  # fmt: skip


def time_block(
    block: nn.Module, x: Tensor, training: bool, repeats: int = 5, min_time: float = 0.02
) -> dict[str, float]:
    """Best time per call of the whole block (forward, + backward when training) per impl.

    The whole block, not the grouped conv alone: an implementation's output layout also speeds
    up or slows down the 1×1 convolution after it. Copies are timed, so the block's gradients
    and BatchNorm statistics stay untouched. Each measurement loops for at least min_time, and
    rounds visit every candidate in turn, so a noisy moment hits them alike.
    """
    x = x.detach().clone().requires_grad_(training)
    calls = {}
    for name in candidates(block.spatial_channels, block.towers):
        clone = copy.deepcopy(block)
        clone.impl = name
        calls[name] = functools.partial(_call, clone, x, training)
    times = time_interleaved(calls, x.device, repeats, min_time)
    return {name: min(seconds) for name, seconds in times.items()}


def _call(block: nn.Module, x: Tensor, training: bool) -> None:
    """One forward of block (and backward, when training), as a training step would run it."""
    with torch.enable_grad() if training else torch.no_grad():
        out = block(x)
        if training:
            out.backward(torch.ones_like(out))


CACHE_VERSION = 2  # 1: a flat {signature: impl} file whose signatures held the batch size


class Chooser:
    """Remembers the fastest implementation per signature, timing each signature once.

    Choices live in memory and, given a path, in a JSON file that later processes reuse (so a
    sweep's trials share them, and reruns choose alike). The file is
    {"version": CACHE_VERSION, "choices": {...}}; a file of another version is ignored, then
    replaced on the next save.
    """

    def __init__(
        self, path: str | Path | None = None, repeats: int = 5, min_time: float = 0.02
    ) -> None:
        self.path = Path(path) if path else None
        self.repeats, self.min_time = repeats, min_time
        self.choices: dict[str, str] = {}
        self.measured = 0  # how many signatures this chooser timed itself
        self.choices.update(self._read())

    def choose(self, block: nn.Module, x: Tensor, training: bool) -> str:
        """The fastest implementation for this block and input (timed on first sight)."""
        key = signature(block, x, training)
        if key not in self.choices:
            times = time_block(block, x, training, self.repeats, self.min_time)
            self.choices[key] = min(times, key=times.get)
            self.measured += 1
            if self.path:
                self._save()
        return self.choices[key]

    def _read(self) -> dict[str, str]:
        """The file's choices, or none if it is missing or of another version."""
        if not (self.path and self.path.is_file()):
            return {}
        saved = json.loads(self.path.read_text())
        if not isinstance(saved, dict) or saved.get("version") != CACHE_VERSION:
            return {}
        return dict(saved["choices"])

    def _save(self) -> None:
        """Write the file atomically, keeping choices other processes saved meanwhile."""
        choices = {**self._read(), **self.choices}
        write_json(self.path, {"version": CACHE_VERSION, "choices": choices}, sort_keys=True)


_DEFAULT: list[Chooser] = []  # created on first use, so importing towerspace measures nothing


def default_chooser() -> Chooser:
    """The process's chooser; TOWERSPACE_IMPL_CACHE names a JSON file that keeps its choices."""
    if not _DEFAULT:
        _DEFAULT.append(Chooser(os.environ.get("TOWERSPACE_IMPL_CACHE")))
    return _DEFAULT[0]


def share_choices(path: str | Path) -> Chooser:
    """Make the process's chooser keep its choices in path (a sweep's file), unless
    TOWERSPACE_IMPL_CACHE names one already; choices made so far are kept."""
    if os.environ.get("TOWERSPACE_IMPL_CACHE"):
        return default_chooser()
    chooser = default_chooser()
    if chooser.path != Path(path):
        shared = Chooser(path, chooser.repeats, chooser.min_time)
        shared.choices = {**chooser.choices, **shared.choices}
        _DEFAULT[0] = shared
    return _DEFAULT[0]
