"""An experiment's cost before it runs: trials, FLOPs, images, device-hours, memory per point."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from towerspace import data as datasets
from towerspace import memory
from towerspace.config import ExperimentConfig, apply
from towerspace.data import DataSizes, TensorBatches
from towerspace.errors import ConfigError
from towerspace.models import build_model, complexity
from towerspace.spaces import grid_points
from towerspace.towers import TowerLabel, TowerSpec, tower_label
from towerspace.train import TrainConfig, Trainer, choose_device, seed_everything

# Optimistic sustained training rates: hours computed from them are lower bounds (a GPU of the
# A100 class sustains less than 100 TFLOP/s on grouped convolutions; a CPU core, at its fp32
# peak, about 0.1; this project's 2-core CPU sustains 0.01 on the digits demo)
ASSUMED_TFLOPS = {"gpu": 100.0, "cpu": 0.1}
WARMUP_STEPS, TIMED_STEPS = 2, 3  # --measure: untimed steps (allocation, cudnn choice), timed ones
THROUGHPUT_COLUMNS = ("towers", "images_per_s")
PER_SAMPLE = " (base model, per sample)"  # a sampled space's one row: its base model's cost


def device_kind(cfg: ExperimentConfig) -> str:
    """'gpu' when the trials take GPUs, else 'cpu': the device whose hours are counted."""
    return "gpu" if cfg.resources.gpus > 0 else "cpu"


def devices_per_trial(cfg: ExperimentConfig) -> float:
    """GPUs a trial holds (workers × GPUs each), or CPUs for CPU-only trials."""
    res = cfg.resources
    return res.workers * (res.gpus if res.gpus > 0 else res.cpus)


def trials_per_point(cfg: ExperimentConfig) -> int:
    """Trials each row stands for: one per seed (and per sample of a sampled space)."""
    return cfg.space.num_samples * len(cfg.seeds)


def images_per_epoch(train_images: int, batch_size: int, max_steps: int | None) -> int:
    """Images a trial trains on per epoch: the train split, or max_steps full batches."""
    if max_steps is not None and max_steps * batch_size < train_images:
        return max_steps * batch_size
    return train_images


def memory_estimate_mb(model: nn.Module, in_chans: int, size: int, batch: int, optimizer: str):
    """Training memory by formula (fp32): weights, gradients and optimizer state, plus every
    layer's output at the batch size (what backward keeps, roughly). The model may be on meta."""
    outputs: list[int] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    leaves = [m for m in leaves if not isinstance(m, nn.Identity | nn.Dropout)]
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel())) for m in leaves]
    device, training = next(model.parameters()).device, model.training
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, in_chans, size, size, device=device))  # eval: batch of 1
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    states = 3 if optimizer == "sgd" else 4  # weights, gradients, momentum (adamw: 2 moments)
    params = sum(p.numel() for p in model.parameters())
    return 4 * (states * params + batch * sum(outputs)) / 2**20


@dataclasses.dataclass(frozen=True)
class MetaModels:
    """Models built once on the meta device (structure and shapes, no weights) for the data
    sizes they were built at, by their point's model fields (model_key)."""

    sizes: DataSizes
    models: Mapping[str, nn.Module]


def model_key(point: Mapping[str, Any]) -> str:
    """The model fields of a point, as one text: points that build the same model share it."""
    fields = {k: v for k, v in point.items() if k.startswith("model.")}
    return json.dumps(fields, sort_keys=True, default=str)


def meta_model(cfg: ExperimentConfig, point: Mapping[str, Any], sizes: DataSizes) -> nn.Module:
    """The model at a point of cfg's space, on the meta device: no weights allocated."""
    model_cfg = apply(cfg, point).model if point else cfg.model
    with torch.device("meta"):
        return build_model(model_cfg, in_chans=sizes.in_chans, num_classes=sizes.num_classes,
                           image_size=sizes.image_size)  # fmt: skip


def _point_label(cfg: ExperimentConfig) -> str:
    label = tower_label(cfg.model.towers, cfg.model.layer_seed, cfg.model.overrides)
    return label if cfg.space.searcher == "grid" else label + PER_SAMPLE


def cost_table(
    cfg: ExperimentConfig, sizes: DataSizes, built: MetaModels | None = None
) -> pd.DataFrame:
    """One row per point: trials, parameters, training FLOPs, images and memory (meta models;
    those of `built` where it holds the point at these sizes)."""
    per_epoch = images_per_epoch(sizes.train_images, cfg.train.batch_size, cfg.train.max_steps)
    images = per_epoch * cfg.train.epochs
    reuse = built.models if built is not None and built.sizes == sizes else {}
    rows = []
    for point in grid_points(cfg.space):
        point_cfg = apply(cfg, point) if point else cfg
        model = reuse.get(model_key(point))
        if model is None:
            model = meta_model(cfg, point, sizes)
        cost = complexity(model, sizes.image_size, sizes.in_chans)  # any model
        shown = {k.split(".")[-1]: v for k, v in point.items() if k != "model.towers"}
        rows.append({
            "towers": _point_label(point_cfg), **shown,
            "trials": trials_per_point(cfg),
            "params": cost.params,
            "train_gflops_per_image": cost.training_flops / 1e9,
            "images_per_trial": images,
            "train_pflops_per_trial": cost.training_flops * images / 1e15,
            "memory_mb_est": memory_estimate_mb(model, sizes.in_chans, sizes.image_size,
                                                worker_batch(cfg), cfg.train.optimizer),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _towers_key(value: Any, where: str) -> str:
    text = str(value).strip()
    try:
        return TowerSpec.from_label(text).label()
    except ValueError as err:
        raise ConfigError(f"{where}: towers: {text!r}: {err}") from None


def read_throughput(path: str | Path) -> dict[str, float]:
    """Images per second per tower label from a CSV with columns towers,images_per_s."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--throughput {path}: no such file")
    try:
        table = pd.read_csv(path, dtype=str, comment="#")  # lines from # on are notes
    except (ValueError, pd.errors.ParserError) as err:
        raise ConfigError(f"--throughput {path}: not a readable CSV ({err})") from None
    missing = [c for c in THROUGHPUT_COLUMNS if c not in table]
    if missing:
        raise ConfigError(f"--throughput {path}: no column {missing[0]!r} (needed: "
                          f"{', '.join(THROUGHPUT_COLUMNS)})")  # fmt: skip
    rates = {}
    for towers, rate in zip(table["towers"], table["images_per_s"], strict=True):
        key = _towers_key(towers, f"--throughput {path}")
        if not pd.to_numeric(rate, errors="coerce") > 0:
            raise ConfigError(f"--throughput {path}: towers {key}: images_per_s: {rate!r} is not "
                              f"allowed; allowed: a number > 0")  # fmt: skip
        rates[key] = float(rate)
    return rates


def worker_batch(cfg: ExperimentConfig) -> int:
    """The batch one worker of a trial runs (the global batch split over data-parallel workers)."""
    return cfg.train.batch_size // cfg.resources.workers


def measure_point(cfg: ExperimentConfig, sizes: DataSizes, device: str) -> dict[str, float]:
    """Images/s of one worker: a few timed training steps (towerspace's Trainer) at its batch
    and the experiment's image size, after a warm-up; peak memory on CUDA."""
    seed_everything(0)
    model = build_model(cfg.model, in_chans=sizes.in_chans, num_classes=sizes.num_classes,
                        image_size=sizes.image_size)  # fmt: skip
    return time_steps(model, cfg.train, worker_batch(cfg), sizes, device)


def time_steps(
    model: nn.Module, recipe: TrainConfig, batch: int, sizes: DataSizes, device: str,
    timed: int = TIMED_STEPS,
) -> dict[str, float]:  # fmt: skip
    """Images/s of any model trained by towerspace's Trainer (the recipe's optimizer, autocast
    and layout) on random images held on the device, after WARMUP_STEPS; peak memory on CUDA."""
    dev = choose_device(device)
    size = sizes.image_size
    images = torch.rand(batch, sizes.in_chans, size, size, device=dev)
    labels = torch.randint(0, sizes.num_classes, (batch,), device=dev)
    ones = torch.ones(sizes.in_chans, device=dev)
    stream = TensorBatches(images, labels, 0.5 * ones, 0.5 * ones, "none")
    bundle = datasets.DataBundle("random", stream, stream, sizes.num_classes, sizes.in_chans, size)
    recipe = dataclasses.replace(recipe, device=dev.type, max_steps=None, epochs=1)
    trainer = Trainer(model, bundle, recipe)  # one batch: every train_epoch() is one step
    for _ in range(WARMUP_STEPS):
        trainer.train_epoch()  # ends with .item(): the device has finished the step
    memory.reset_peak(dev)
    start = time.perf_counter()
    for _ in range(timed):
        trainer.train_epoch()
    seconds = time.perf_counter() - start
    measured = {"images_per_s": batch * timed / seconds}
    if dev.type == "cuda":  # on a CPU the process's RSS says little about one trial's needs
        measured["peak_memory_mb"] = memory.peak_mb(dev)
    return measured


def measure(cfg: ExperimentConfig, sizes: DataSizes, device: str) -> pd.DataFrame:
    """measure_point() at every point of the space, one row per point."""
    rows = []
    for point in grid_points(cfg.space):
        point_cfg = apply(cfg, point) if point else cfg
        rows.append(measure_point(point_cfg, sizes, device))
    return pd.DataFrame(rows)


def add_hours(
    table: pd.DataFrame, cfg: ExperimentConfig, images_per_s: list[float | None]
) -> pd.DataFrame:
    """Hours per trial and device-hours from a throughput per row (images/s on one device).

    A trial of W data-parallel workers is taken to scale ideally (W× the images/s); its
    device-hours count every GPU it holds (workers × gpus), or its CPUs on a CPU-only trial.
    """
    kind = device_kind(cfg)
    rate = pd.Series(images_per_s, index=table.index, dtype="float64")
    table = table.assign(images_per_s=rate)
    table["hours_per_trial"] = table["images_per_trial"] / (rate * cfg.resources.workers) / 3600
    per_trial = table["hours_per_trial"] * devices_per_trial(cfg)
    table[f"{kind}_hours_per_trial"] = per_trial
    table[f"{kind}_hours"] = per_trial * table["trials"]
    return table


def lower_bound_hours(table: pd.DataFrame, cfg: ExperimentConfig) -> float:
    """Device-hours of the whole sweep at ASSUMED_TFLOPS: a floor, with no throughput known."""
    pflops = (table["train_pflops_per_trial"] * table["trials"]).sum()
    return float(pflops * 1e15 / (ASSUMED_TFLOPS[device_kind(cfg)] * 1e12) / 3600)


def total_hours(table: pd.DataFrame, cfg: ExperimentConfig) -> float | None:
    """The sweep's device-hours, or None if any row lacks a throughput."""
    column = f"{device_kind(cfg)}_hours"
    if column not in table or table[column].isna().any():
        return None
    return float(table[column].sum())


def rates_for(table: pd.DataFrame, rates: dict[str, float]) -> list[float | None]:
    """A throughput file's images/s for each row's towers (None where the file has none)."""
    heads = [TowerLabel.parse(label.removesuffix(PER_SAMPLE)).head for label in table["towers"]]
    return [rates.get(head) for head in heads]


def sizes_or_given(
    cfg: ExperimentConfig, train_images: int | None = None, num_classes: int | None = None
) -> DataSizes:
    """The data set's sizes, counted; or, for a tree not on this machine, the sizes given."""
    if train_images is None and num_classes is None:
        try:
            return datasets.sizes(cfg.data)
        except datasets.DataError as err:
            hint = " (or --train-images N --classes N for a tree not on this machine)"
            raise ConfigError(f"{err}{hint if cfg.data.name == 'imagefolder' else ''}") from None
    if cfg.data.name != "imagefolder":
        raise ConfigError(f"--train-images, --classes: for imagefolder data only ({cfg.data.name} "
                          f"is counted or of known size)")  # fmt: skip
    if train_images is None or num_classes is None or cfg.data.image_size is None:
        raise ConfigError("--train-images and --classes go together, with data.image_size set")
    return DataSizes(train_images, 0, num_classes, 3, cfg.data.image_size)


def summary_line(table: pd.DataFrame, cfg: ExperimentConfig) -> str:
    """Trials, training PFLOPs and device-hours of the whole sweep, in one line."""
    kind = device_kind(cfg).upper()
    trials = int(table["trials"].sum())
    pflops = float((table["train_pflops_per_trial"] * table["trials"]).sum())
    hours = total_hours(table, cfg)
    if hours is not None:
        spent = f"{number(hours)} {kind}-hours at the images/s listed"
    else:
        floor = number(lower_bound_hours(table, cfg))
        rate = ASSUMED_TFLOPS[device_kind(cfg)]
        spent = f"at least {floor} {kind}-hours (at an optimistic {rate:g} TFLOP/s per {kind})"
    return f"{trials} trials, {number(pflops)} training PFLOPs, {spent}"


def number(value: float) -> str:
    """A figure for a table or a line: 4 significant digits, whole numbers from 10,000."""
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def hours_hint() -> str:
    """How to get device-hours when no throughput is known."""
    return ("no throughput given, so no hours: --measure times a few training steps of each "
            "point on this machine, --throughput FILE.csv (columns towers,images_per_s) "
            "takes figures measured elsewhere")  # fmt: skip
