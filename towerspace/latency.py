"""Measured cost: a model's step time as the sum of its layers' times, each distinct layer (its
kind, settings and input shape) timed once on the device and kept in a table that the trials of
a sweep share, in the manner of FBNet's and ProxylessNAS's latency lookup tables."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from towerspace.block import TowerConv2d
from towerspace.files import write_json
from towerspace.timing import time_interleaved

TABLE = "latency.json"  # a sweep's table, in its folder
TABLE_VERSION = 1
MODES = ("train", "eval")  # train: forward and backward of a training step; eval: forward
FREE = (nn.Identity, nn.Dropout)  # layers that cost nothing worth timing


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers timed one by one: every TowerConv2d whole, and every other leaf module."""
    found, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(f"{prefix}.") for prefix in inside):
            continue
        if isinstance(module, TowerConv2d):
            inside.add(name)
            found.append((name, module))
        elif not any(module.children()) and not isinstance(module, FREE) and name:
            found.append((name, module))
    return found


def signature(module: nn.Module, x: Tensor, mode: str) -> str:
    """What a layer's time depends on: device, dtype, layout, mode, the input's shape with its
    batch, and the layer's kind and settings (a TowerConv2d's impl too)."""
    # NHWC only when it is not also NCHW (1×1 maps and single channels are both)
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    nhwc = nhwc and not x.is_contiguous()
    impl = f"|impl={module.impl}" if isinstance(module, TowerConv2d) else ""
    return (f"{x.device.type}|{str(x.dtype).removeprefix('torch.')}|{'nhwc' if nhwc else 'nchw'}|"
            f"{mode}|{'x'.join(map(str, x.shape))}|{type(module).__name__}({module.extra_repr()})"
            f"{impl}")  # fmt: skip


class LatencyTable:
    """Seconds per call of each layer signature, in memory and, given a path, in a JSON file
    that later processes reuse: {"version": TABLE_VERSION, "seconds": {signature: s}}."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.seconds: dict[str, float] = self._read()
        self.measured = 0  # signatures this table timed itself

    def _read(self) -> dict[str, float]:
        if not (self.path and self.path.is_file()):
            return {}
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a damaged table is timed again, then replaced
        if not isinstance(saved, dict) or saved.get("version") != TABLE_VERSION:
            return {}
        return {k: float(v) for k, v in saved.get("seconds", {}).items()}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the file while layers are timed, with the times other processes
        saved read in first: concurrent trials time each signature once, and all of them use
        that one time (timed apart, under each other's load, they disagreed by 22% here)."""
        if self.path is None:
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.seconds.update(self._read())
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add(self, seconds: dict[str, float]) -> None:
        """Keep new times, and write the file atomically with what other processes saved."""
        self.seconds.update(seconds)
        self.measured += len(seconds)
        if self.path and seconds:
            merged = {**self._read(), **self.seconds}
            write_json(self.path, {"version": TABLE_VERSION, "seconds": merged}, sort_keys=True)


@dataclass(frozen=True)
class Latency:
    """A model's measured step time and how it was made up."""

    ms: float  # the sum over layers, milliseconds per step of the batch
    layers: dict[str, float]  # layer name → milliseconds
    measured: int  # distinct layer signatures timed for it (the rest came from the table)


def _inputs(model: nn.Module, x: Tensor, mode: str) -> dict[str, tuple[nn.Module, Tensor, str]]:
    """Each unit's input in one forward pass of x, with its signature."""
    seen: dict[str, tuple[nn.Module, Tensor, str]] = {}
    hooks = []
    for name, module in units(model):

        def keep(module, args, _kwargs=None, name=name):
            if args and isinstance(args[0], Tensor):
                x = args[0].detach()
                seen[name] = (module, x, signature(module, x, mode))

        hooks.append(module.register_forward_pre_hook(keep))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)  # eval: BatchNorm statistics stay as they are
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return seen


def _call(module: nn.Module, x: Tensor, training: bool) -> None:
    with torch.enable_grad() if training else torch.no_grad():
        out = module(x)
        if training and out.requires_grad:
            out.backward(torch.ones_like(out))


def _timer(module: nn.Module, x: Tensor, mode: str) -> Callable[[], None]:
    """A call of a copy of the layer on a fresh input of the same shape, dtype and layout."""
    clone = copy.deepcopy(module).train(mode == "train")
    fresh = torch.randn_like(x) if x.is_floating_point() else x.clone()
    fresh.requires_grad_(mode == "train" and fresh.is_floating_point())
    return functools.partial(_call, clone, fresh, mode == "train")


def model_latency(
    model: nn.Module,
    x: Tensor,
    *,
    mode: str = "train",
    table: LatencyTable | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    repeats: int = 3,
    min_time: float = 0.01,
) -> Latency:
    """The step time of model on a batch like x: the sum of its layers' times, each distinct
    layer timed once (copies, so the model's weights and statistics stay untouched).

    Work outside modules (functional ReLUs, residual additions, the optimizer step) is not
    counted: the sum ranks tower schedules by what they change, the layers. The model's state
    and the global random streams are left as they were.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of: {', '.join(MODES)}")
    table = table if table is not None else LatencyTable()
    cuda = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(cuda), autocast or contextlib.nullcontext():
        seen = _inputs(model, x, mode)
        missing = {sig: (m, t) for m, t, sig in seen.values() if sig not in table.seconds}
        if missing:
            with table.locked():  # another process may have timed them meanwhile
                missing = {sig: mt for sig, mt in missing.items() if sig not in table.seconds}
                calls = {sig: _timer(m, t, mode) for sig, (m, t) in missing.items()}
                times = time_interleaved(calls, x.device, repeats, min_time) if calls else {}
                table.add({sig: min(seconds) for sig, seconds in times.items()})
    layers = {name: table.seconds[sig] * 1e3 for name, (_m, _t, sig) in seen.items()}
    return Latency(sum(layers.values()), layers, len(missing))
