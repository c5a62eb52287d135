"""Checks before a sweep launches: data on disk, the device, every model, memory per trial."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from towerspace import data as datasets
from towerspace import memory
from towerspace.config import ExperimentConfig
from towerspace.data import DataSizes
from towerspace.errors import ConfigError
from towerspace.estimate import MetaModels, memory_estimate_mb, meta_model, model_key, worker_batch
from towerspace.spaces import grid_points, param_points


def preflight(cfg: ExperimentConfig, address: str | None = None) -> MetaModels:
    """Checks that would otherwise fail inside every trial: data on disk, the device, the
    model at every point and whether a trial fits in memory. Returns the models it built on
    the meta device, for the cost gate to reuse."""
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
    sizes = datasets.sizes(cfg.data)  # counted once: the trials' and the cost gate's shapes
    models: dict[str, nn.Module] = {}
    for field, point in _points(cfg):
        key = model_key(point)
        if key in models:
            continue
        try:
            models[key] = meta_model(cfg, point, sizes)
        except ValueError as err:
            raise ConfigError(f"{cfg.source}: {field}: {err}") from None
        if local:  # a cluster's nodes are not this machine
            _check_memory(cfg, models[key], sizes, data_bytes or 0)
    return MetaModels(sizes, models)


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


def _check_memory(cfg: ExperimentConfig, model: nn.Module, sizes: DataSizes,
                  data_bytes: int) -> None:  # fmt: skip
    """Refuse a trial whose data and training memory (by formula) exceed this machine's (or its
    GPU's, for the training of a GPU trial)."""
    train_bytes = memory_estimate_mb(model, sizes.in_chans, sizes.image_size, worker_batch(cfg),
                                     cfg.train.optimizer) * 2**20  # fmt: skip
    _check_fits(cfg, data_bytes, train_bytes, sizes.image_size)


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
    """The base model, the model fields of every grid point, then each choice value (and, in a
    sampled space, each grid value) on its own: every model a trial can build."""
    space = cfg.space
    yield "model", {}
    for point in grid_points(space):
        fields = {k: v for k, v in point.items() if k.startswith("model.")}
        if fields:
            yield f"space {space.name}: " + ", ".join(f"{k}={v}" for k, v in fields.items()), fields
    alone = ("choice",) if space.searcher == "grid" else ("grid", "choice")
    for key, value in param_points(space, kinds=alone):
        if key.startswith("model."):
            yield f"space {space.name}: {key}={value}", {key: value}
