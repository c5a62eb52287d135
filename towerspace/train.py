"""The training loop: plain PyTorch, yields metrics per epoch, knows nothing of Ray."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from towerspace import memory
from towerspace.choices import DEVICES
from towerspace.data import DataBundle
from towerspace.errors import ConfigError
from towerspace.parallel import synchronise_batchnorm

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "step", "exponential", "constant")
AMPS = ("auto", "bf16", "none")
SWITCHES = ("auto", "on", "off")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe of every trial."""

    epochs: int = field(default=15, metadata={"min": 1})  # passes over the train split
    batch_size: int = field(default=128, metadata={"min": 1})  # global: split over workers
    optimizer: str = field(default="sgd", metadata={"choices": OPTIMIZERS})  # sgd: momentum
    lr: float = field(default=0.1, metadata={"gt": 0.0})  # peak learning rate (after warm-up)
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})  # sgd
    nesterov: bool = True  # sgd: Nesterov momentum
    weight_decay: float = field(default=5.0e-4, metadata={"min": 0.0})  # not on biases and norms
    schedule: str = field(default="cosine", metadata={"choices": SCHEDULES})  # per step
    decay_epochs: float = field(default=2.0, metadata={"gt": 0.0})  # step/exponential (paper: 2)
    gamma: float = field(default=0.94, metadata={"gt": 0.0, "max": 1.0})  # paper: 0.94
    warmup_epochs: float = field(default=0.0, metadata={"min": 0.0})  # linear, from lr/10
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "max": 0.5})  # of the loss
    device: str = field(default="auto", metadata={"choices": DEVICES})  # auto: cuda if present
    amp: str = field(default="auto", metadata={"choices": AMPS})  # auto: bf16 on cuda; bf16: any
    channels_last: str = field(default="auto", metadata={"choices": SWITCHES})  # auto: on cuda
    eval_batch_size: int = field(default=512, metadata={"min": 1})  # validation batches
    deterministic: bool = False  # torch.use_deterministic_algorithms (GPU); CPU is anyway
    max_steps: int | None = field(default=None, metadata={"min": 1})  # cap per epoch (smoke)


def paper_imagenet(**changes: Any) -> TrainConfig:
    """The Xception paper's ImageNet recipe (dropout 0.5 is the model's argument).

    "decay of rate 0.94 every 2 epochs": a staircase (schedule step), as in
    experiments/imagenet_xception.yaml.
    """
    recipe = TrainConfig(optimizer="sgd", momentum=0.9, nesterov=False, lr=0.045,
                         schedule="step", decay_epochs=2.0, gamma=0.94,
                         weight_decay=1e-5)  # fmt: skip
    return replace(recipe, **changes)


class Diverged(RuntimeError):
    """The training loss, or a validation metric, became NaN or infinite."""

    def __init__(self, epoch: int, step: int | None, loss: float, what: str = "loss") -> None:
        where = f"epoch {epoch}, step {step}" if step is not None else f"epoch {epoch}"
        super().__init__(f"{what} is {loss} at {where}")
        self.epoch, self.step = epoch, step


def choose_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for but no CUDA device is visible")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def uses_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training runs in channels_last: on, or auto on a GPU."""
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast: bf16 (a CPU too), or auto on a GPU."""
    return cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at an optimizer step (warm-up, then the schedule)."""
    epoch = step / steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    if epoch < cfg.warmup_epochs:
        return 0.1 + 0.9 * epoch / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        start = cfg.warmup_epochs * steps_per_epoch
        progress = (step - start) / max(1.0, total - start)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "onecycle":  # triangle up to 30%, then down to lr/1000
        peak = 0.3 * total
        if step < peak:
            return 0.1 + 0.9 * step / peak
        return max(1e-3, 1.0 - (step - peak) / max(1.0, total - peak))
    if cfg.schedule == "exponential":  # smooth: gamma per decay_epochs, continuously
        return cfg.gamma ** (epoch / cfg.decay_epochs)
    if cfg.schedule == "step":  # the paper: multiply by gamma every decay_epochs
        return cfg.gamma ** math.floor(epoch / cfg.decay_epochs)
    return 1.0


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip


class Trainer:
    """Trains one model on one data bundle; yields metrics per epoch; knows nothing of Ray.

    With world_size > 1 (torch.distributed initialised by the caller), it is one of several
    data-parallel workers: every worker draws the same global batch, trains on its own part
    of it under DistributedDataParallel (gradients averaged, so the step is the global
    batch's), BatchNorm normalises over the global batch, and validation sums are added over
    workers: N workers compute what one worker computes on the same global batch.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DataBundle,
        cfg: TrainConfig,
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg, self.data = cfg, data
        self.rank, self.world_size = rank, world_size
        self.part = (rank, world_size)  # this worker's part of every batch
        self.device = choose_device(cfg.device)
        cuda = self.device.type == "cuda"
        self.channels_last = uses_channels_last(cfg, self.device)
        self.amp = uses_bf16(cfg, self.device)
        if cuda:
            torch.backends.cudnn.benchmark = not cfg.deterministic
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if world_size > 1:
            model = synchronise_batchnorm(model, self.device)
        memory.reset_peak(self.device)  # before this trial's weights: its own peak only
        self.model = model.to(self.device, memory_format=memory_format)
        self.forward_model = self._data_parallel(self.model)
        groups = _param_groups(self.model, cfg.weight_decay)
        if cfg.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
            )
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.generator = torch.Generator().manual_seed(seed)
        full = math.ceil(len(data.train) / cfg.batch_size)
        self.steps_per_epoch = min(full, cfg.max_steps) if cfg.max_steps else full
        self.step, self.epoch = 0, 0
        self.data_wait_s = 0.0  # of the last epoch: see train_epoch()
        self.history: list[dict[str, float]] = []

    def _sum_over_workers(self, *values: float | torch.Tensor) -> list[float]:
        """Sums over every data-parallel worker (the values themselves with one worker)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device)
                         for v in values])  # fmt: skip
        dist.all_reduce(t)
        return t.tolist()

    def _data_parallel(self, model: nn.Module) -> nn.Module:
        """The model as DistributedDataParallel when several workers train it."""
        if self.world_size == 1:
            return model
        if not dist.is_initialized():
            raise RuntimeError("world_size > 1 needs torch.distributed initialised first")
        # device_ids=None: the module sits on one device (the worker's GPU, or the CPU)
        return nn.parallel.DistributedDataParallel(model, device_ids=None)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def train_epoch(self) -> tuple[float, int]:
        """One pass over the train split: (mean loss, images seen).

        Sets data_wait_s: how long the loop waited for batches (loading, decoding and
        augmenting), to tell a starving data path from a slow model.
        """
        self.model.train()
        total, seen = torch.zeros((), device=self.device), 0
        batches = self.data.train.batches(self.cfg.batch_size, shuffle=True, train=True,
                                          generator=self.generator, part=self.part)  # fmt: skip
        self.data_wait_s, asked = 0.0, time.perf_counter()
        for i, (x, y) in enumerate(batches):
            self.data_wait_s += time.perf_counter() - asked
            if i == self.steps_per_epoch:
                break
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.lr * lr_factor(self.cfg, self.step, self.steps_per_epoch)
            y = y.to(self.device, non_blocking=True)
            with self._autocast():
                loss = F.cross_entropy(self.forward_model(self._inputs(x)), y,
                                       label_smoothing=self.cfg.label_smoothing)  # fmt: skip
            self._check_finite(loss, i)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach() * len(y)
            seen += len(y)
            self.step += 1
            asked = time.perf_counter()
        total_loss, seen = self._sum_over_workers(total, seen)
        return total_loss / max(seen, 1), int(seen)

    def _check_finite(self, loss: torch.Tensor, i: int) -> None:
        """Raise Diverged on a NaN or infinite loss, on every worker at the same step."""
        if self.world_size > 1:  # one worker stopping alone would leave the others waiting
            loss = loss.detach().clone()
            dist.all_reduce(loss)
        if not torch.isfinite(loss):
            raise Diverged(self.epoch + 1, i + 1, loss.item())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss, top-1 and top-5 accuracy."""
        self.model.eval()
        if self.world_size > 1:  # every worker evaluates with worker 0's BatchNorm statistics
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)
        loss = top1 = top5 = 0.0
        n = 0
        for x, y in self.data.val.batches(self.cfg.eval_batch_size, shuffle=False, part=self.part):
            y = y.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(self._inputs(x)).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices == y[:, None]
            top1 += hits[:, 0].sum().item()
            top5 += hits.any(dim=1).sum().item()
            n += len(y)
        loss, top1, top5, n = self._sum_over_workers(loss, top1, top5, n)
        return {"val_loss": loss / n, "val_acc": top1 / n, "val_top5": top5 / n}

    def epochs(self) -> Iterator[dict[str, float]]:
        """Train from the current epoch to the last, yielding each epoch's metrics."""
        while self.epoch < self.cfg.epochs:
            start = time.perf_counter()
            train_loss, seen = self.train_epoch()
            train_time = time.perf_counter() - start
            scores = self.evaluate()
            for name, value in scores.items():  # blown-up weights after the last finite loss
                if not math.isfinite(value):
                    raise Diverged(self.epoch + 1, None, value, what=name)
            metrics = {"epoch": self.epoch + 1, "train_loss": train_loss, **scores,
                       "lr": self.optimizer.param_groups[0]["lr"],
                       "epoch_time_s": time.perf_counter() - start,
                       "train_images_per_s": seen / max(train_time, 1e-9),
                       "data_wait_fraction": self.data_wait_s / max(train_time, 1e-9),
                       "peak_memory_mb": memory.peak_mb(self.device),
                       "ended_at": time.time()}  # fmt: skip
            self.epoch += 1
            self.history.append(metrics)
            yield metrics

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, RNG, progress, history."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "epoch": self.epoch,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from state_dict()."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.history = [dict(h) for h in state["history"]]
