"""Checks before a sweep launches: data on disk, the device, every model, memory per trial."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from towerspace import data as datasets
from towerspace import memory
from towerspace.config import ConfigError, ExperimentConfig, apply
from towerspace.models import build_model


def preflight(cfg: ExperimentConfig, address: str | None = None) -> None:
    """Checks that would otherwise fail inside every trial: data on disk, the device, the
    model at every point (on the meta device) and whether a trial fits in memory."""
    if cfg.data.name not in ("digits", "synthetic") and not cfg.data.download:
        root = cfg.data.root
        if root is None or not Path(root).expanduser().is_dir():
            what = "is not set" if root is None else f"{root!r} is not a folder"
            raise ConfigError(f"{cfg.source}: data.root: {what}; {cfg.data.name} needs its files "
                              f"there (or --set data.download=true)")  # fmt: skip
    local = not (address or os.environ.get("RAY_ADDRESS"))
    _check_device(cfg, local)
    data_bytes = datasets.resident_bytes(cfg.data)  # refuses empty classes of an image folder
    if local:  # before the data is counted by loading it
        _check_fits(cfg, data_bytes, 0, cfg.data.image_size or 0)
    shape = {"in_chans": 3, "num_classes": 10, "image_size": cfg.data.image_size or 32}
    if cfg.model.init_from is not None or data_bytes:
        sizes = datasets.sizes(cfg.data)  # exact channels and image size: the memory check
        shape = {"in_chans": sizes.in_chans, "num_classes": sizes.num_classes,
                 "image_size": sizes.image_size}  # fmt: skip
    for field, point in _points(cfg):
        try:
            with torch.device("meta"):  # structure only: no weights allocated
                model = build_model(apply(cfg, point).model, **shape)
        except ValueError as err:
            raise ConfigError(f"{cfg.source}: {field}: {err}") from None
        if local:  # a cluster's nodes are not this machine
            _check_memory(cfg, model, shape, data_bytes or 0)


def _check_device(cfg: ExperimentConfig, local: bool) -> None:
    """train.device cuda needs GPUs for the trials, and here a visible one."""
    if cfg.train.device != "cuda":
        return
    if cfg.resources.gpus == 0:
        raise ConfigError(f"{cfg.source}: train.device: 'cuda' with resources.gpus=0: a trial "
                          f"without a GPU sees none (allowed: auto, cpu; or set "
                          f"resources.gpus)")  # fmt: skip
    if local and not torch.cuda.is_available():
        raise ConfigError(f"{cfg.source}: train.device: 'cuda' but no CUDA device is visible "
                          f"here (allowed: auto, cpu)")  # fmt: skip


def _check_memory(cfg: ExperimentConfig, model, shape: dict[str, int], data_bytes: int) -> None:
    """Refuse a trial whose data and training memory (by formula) exceed this machine's (or its
    GPU's, for the training of a GPU trial)."""
    from towerspace.estimate import memory_estimate_mb, worker_batch

    train_bytes = memory_estimate_mb(model, shape["in_chans"], shape["image_size"],
                                     worker_batch(cfg), cfg.train.optimizer) * 2**20  # fmt: skip
    _check_fits(cfg, data_bytes, train_bytes, shape["image_size"])


def _check_fits(cfg: ExperimentConfig, data_bytes: float, train_bytes: float, size: int) -> None:
    gpu = memory.gpu_bytes() if cfg.resources.gpus and cfg.train.device != "cpu" else None
    checks = [(data_bytes + (0 if gpu else train_bytes), memory.machine_bytes(), "this machine's")]
    if gpu is not None:
        checks.append((train_bytes, gpu, "the GPU's"))
    for needed, available, whose in checks:
        if available is None or needed <= available:
            continue
        data = cfg.data
        if data_bytes > train_bytes:
            synthetic = data.name == "synthetic"
            samples = f"data.num_samples={data.num_samples}, " if synthetic else ""
            given = f"{samples}data.image_size={size}"
            fields = "data.num_samples or data.image_size" if synthetic else "data.image_size"
        else:
            given = f"data.image_size={size}, train.batch_size={cfg.train.batch_size}"
            fields = "train.batch_size, data.image_size or model.width"
        parts = f"data {memory.words(data_bytes)} in memory"
        if train_bytes:
            parts += f", training {memory.words(train_bytes)} by formula"
        raise ConfigError(f"{cfg.source}: {given}: one trial needs about {memory.words(needed)} "
                          f"({parts}), more than {whose} {memory.words(available)}; lower "
                          f"{fields}")  # fmt: skip


def _points(cfg: ExperimentConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    """The base model, then each value of each grid or choice parameter on its own."""
    yield "model", {}
    for key, domain in cfg.space.params.items():
        if domain.kind in ("grid", "choice") and key.startswith("model."):
            for value in domain.values:
                yield f"space {cfg.space.name}: {key}={value}", {key: value}
