"""One trial: data and model from a config, trained, with its own record on disk (no Ray)."""

from __future__ import annotations

import math
import re
import subprocess
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import towerspace
from towerspace import data as datasets
from towerspace.config import ExperimentConfig, apply, to_dict
from towerspace.files import write_json
from towerspace.latency import TABLE, LatencyTable, model_latency
from towerspace.models import build_model, complexity
from towerspace.models.build import at_width
from towerspace.results import read_record
from towerspace.status import Status
from towerspace.towers import realized_towers, tower_label
from towerspace.train import (
    Diverged,
    Trainer,
    choose_device,
    seed_everything,
    uses_bf16,
    uses_channels_last,
)

CHECKPOINT = "trainer.pt"
TRAIN_RUNS = "train"  # a sweep's folder for the Ray Train runs of its data-parallel trials


def trial_folder(sweep_dir: Path, trial_id: str) -> Path:
    """Where Tune persists a trial's checkpoints: <sweep>/run_trial_<trial id>_<point>_<time>.

    (The trial's context names its working directory, not this one.)
    """
    found = sorted(Path(sweep_dir).glob(f"run_trial_{trial_id}_*"))
    return found[0] if found else Path(sweep_dir) / f"run_trial_{trial_id}"


def checkpoint_complete(path: Path) -> bool:
    """Whether a checkpoint file was written to the end (torch.save writes a zip archive, whose
    directory comes last: a copy cut short by a kill has none)."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def newest_checkpoint_file(sweep_dir: Path, trial_id: str) -> Path | None:
    """A trial's newest complete checkpoint file: Tune's, or Ray Train's for a data-parallel
    trial (None when it has none)."""
    folders = (trial_folder(sweep_dir, trial_id), Path(sweep_dir) / TRAIN_RUNS / trial_id)
    found = [d / CHECKPOINT for folder in folders for d in folder.glob("checkpoint_*")]
    complete = sorted((p for p in found if checkpoint_complete(p)), key=lambda p: p.parent.name)
    return complete[-1] if complete else None


def provenance() -> dict[str, str | None]:
    """Package version and the git commit of the source tree, for every record."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
            check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"version": towerspace.__version__, "git_commit": commit}


def one_line(err: BaseException) -> str:
    """An exception as one line: its type and message (the last line of a message that
    carries a traceback, as DataLoader workers' do)."""
    name = type(err).__name__
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    # a traceback's last line repeats the type: 'towerspace.errors.DataError: <message>'
    last = re.sub(rf"^(?:[\w.]+\.)?{re.escape(name)}: ", "", last)
    return f"{name}: {last}".rstrip(": ")


def failed_record(
    cfg: ExperimentConfig,
    *,
    seed: int,
    trial_id: str,
    point: Mapping[str, Any],
    origin: Mapping[str, Any],
    err: BaseException | None,
) -> dict[str, Any]:
    """The record of a trial that failed before it had one (data, model or device setup)."""
    try:
        trial_cfg = apply(cfg, point)
        model = trial_cfg.model
        towers = tower_label(model.towers, model.layer_seed, model.overrides)
    except ValueError:
        trial_cfg, towers = cfg, str(point.get("model.towers", "?"))
    return {
        "experiment": cfg.name, "trial_id": trial_id, "status": Status.ERROR, "seed": seed,
        "point": dict(point), "towers": towers, "order": trial_cfg.model.order,
        "mid": trial_cfg.model.mid, "match": trial_cfg.model.match,
        "residual": trial_cfg.model.residual,
        "width": trial_cfg.model.width, "data": trial_cfg.data.name,
        "epochs_planned": trial_cfg.train.epochs, "epochs_run": 0,
        "error": one_line(err) if err is not None else None, "resumed_at": [],
        "config": to_dict(trial_cfg), **origin, "history": [],
    }  # fmt: skip


def record_costs(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's fixed numbers: params, FLOPs, width, latency_ms, and its fewest and most
    towers of any layer (those it has)."""
    towers = [layer["towers"] for layer in (record.get("realized") or {}).values()]
    fixed = {k: record.get(k) for k in ("params", "flops", "training_flops", "width",
                                        "latency_ms")}  # fmt: skip
    if towers:
        fixed.update(towers_min=min(towers), towers_max=max(towers))
    return {k: v for k, v in fixed.items() if isinstance(v, int | float)}


def _targets(point: Mapping[str, Any], trial_point: Mapping[str, Any], seed: int) -> bool:
    """Whether a fault's point selects this trial (an empty point selects every trial)."""
    return all((seed if k == "seed" else trial_point.get(k)) == v for k, v in point.items())


def _mean(values) -> float | None:
    """Mean of the values given (checkpoints from before a metric existed lack it)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def latency_probe(
    cfg: ExperimentConfig, data: datasets.DataBundle, table: Path
) -> Callable[[nn.Module], float]:
    """A model's measured step time (ms) on this trial's device, batch, layout and autocast,
    from the sweep's table of layer times (timing the layers it lacks)."""
    device = choose_device(cfg.train.device)
    layout = torch.channels_last if uses_channels_last(cfg.train, device) else torch.preserve_format
    batch = cfg.latency.batch or max(1, cfg.train.batch_size // cfg.resources.workers)
    shape = (batch, data.in_chans, data.image_size, data.image_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    x = x.contiguous(memory_format=layout)
    layers = LatencyTable(table)

    def measure(model: nn.Module) -> float:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                  enabled=uses_bf16(cfg.train, device))  # fmt: skip
        model = model.to(device, memory_format=layout)
        return model_latency(model, x, mode=cfg.latency.mode, table=layers, autocast=autocast).ms

    return measure


def _earlier_record(cfg: ExperimentConfig, record_path: Path) -> dict[str, Any]:
    """The record a latency-matched trial already wrote (a retry, a resume), else {}: it
    rebuilds at that record's width (its checkpoint's shapes), whatever the layer times say now."""
    if cfg.model.match != "latency":
        return {}
    try:
        return read_record(record_path)
    except (OSError, ValueError):
        return {}


def solved_config(cfg: ExperimentConfig, record: Mapping[str, Any]) -> ExperimentConfig:
    """cfg as the plain config of the model a latency-matched trial built (from its record's
    width); any other config as it is."""
    width = record.get("width")
    if cfg.model.match != "latency" or record.get("match") != "latency" or width is None:
        return cfg
    return replace(cfg, model=at_width(cfg.model, float(width)))


class Trial:
    """Builds a trial's data, model and trainer, trains it, and keeps its record current."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        seed: int,
        trial_id: str,
        point: Mapping[str, Any],
        record_path: Path,
        origin: Mapping[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        on_write: Callable[[Path], None] | None = None,
    ) -> None:
        self.on_write = on_write  # after each write of the record: its upload to a store
        self.faults = cfg.faults if _targets(cfg.faults.point, point, seed) else None
        self.rank = rank  # data-parallel workers: only worker 0 writes the record
        seed_everything(seed)
        device = choose_device(cfg.train.device)
        self.data = datasets.load(cfg.data, device, datasets.loader_workers(cfg.resources.cpus))
        measures = cfg.latency.measure or cfg.space.measures_latency or cfg.model.match == "latency"
        # only where a time is wanted: the probe holds a batch on the device
        table = record_path.parent.parent / TABLE
        probe = latency_probe(cfg, self.data, table) if measures else None
        earlier = _earlier_record(cfg, record_path)
        solved = solved_config(cfg, earlier)
        self.model = build_model(
            solved.model,
            in_chans=self.data.in_chans,
            num_classes=self.data.num_classes,
            image_size=self.data.image_size,
            measure=probe,
        )
        if solved is not cfg:  # the budget as it was solved, not as a plain model of that width
            self.model.budget = {"match": "latency", "solved_width": earlier["width"],
                                 "budget_error": earlier.get("budget_error")}  # fmt: skip
        self.trainer = Trainer(self.model, self.data, cfg.train, seed=seed, rank=rank,
                               world_size=world_size)  # fmt: skip
        self.record_path = record_path
        self.record = self._initial_record(cfg, seed, trial_id, point, origin or provenance())
        if rank == 0 and probe is not None:
            measured = earlier.get("latency_ms") or probe(self.trainer.model)
            self.record["latency_ms"] = round(measured, 4)

    def _initial_record(self, cfg, seed, trial_id, point, origin) -> dict[str, Any]:
        realized = realized_towers(self.model)
        cost = complexity(self.model, self.data.image_size, self.data.in_chans)  # any model
        budget = getattr(self.model, "budget", None) or {}
        return {
            "experiment": cfg.name,
            "trial_id": trial_id,
            "status": Status.RUNNING,
            "seed": seed,
            "point": dict(point),
            "towers": tower_label(cfg.model.towers, cfg.model.layer_seed, cfg.model.overrides),
            "order": cfg.model.order,
            "mid": cfg.model.mid,
            "match": cfg.model.match,
            "residual": cfg.model.residual,
            "width": budget.get("solved_width", cfg.model.width),
            "budget_error": budget.get("budget_error"),
            "data": cfg.data.name,
            "params": cost.params,
            "flops": cost.flops,
            "training_flops": cost.training_flops,
            "realized": realized,
            "epochs_planned": cfg.train.epochs,
            "epochs_run": 0,
            "error": None,
            "resumed_at": [],  # epochs this trial continued from a checkpoint (retries, resumes)
            "config": to_dict(cfg),
            **origin,
            "history": [],
        }

    def costs(self) -> dict[str, float]:
        """The trial's fixed numbers (what it costs and how its layers were built), reported to
        Ray with every epoch: TensorBoard's HParams view and ExperimentAnalysis show them."""
        return record_costs(self.record)

    def save_checkpoint(self, directory: Path) -> None:
        """Everything needed to continue this trial exactly."""
        torch.save(self.trainer.state_dict(), Path(directory) / CHECKPOINT)

    def load_checkpoint(self, directory: Path) -> None:
        """Continue from a checkpoint (tensors and plain data only: weights_only=True)."""
        state = torch.load(Path(directory) / CHECKPOINT, weights_only=True, map_location="cpu")
        self.trainer.load_state_dict(state)
        self.record["history"] = list(self.trainer.history)
        self.record["epochs_run"] = len(self.trainer.history)
        before = []
        if self.record_path.exists():  # earlier resumes of this trial, from its last record
            try:
                before = read_record(self.record_path).get("resumed_at", [])
            except (OSError, ValueError):
                before = []
        self.record["resumed_at"] = [*before, self.trainer.epoch]

    def epochs(self) -> Iterator[dict[str, float]]:
        """Train to the end, yielding each epoch's metrics; the record follows every epoch."""
        try:
            epochs = self.trainer.epochs()
            while True:
                self._strike()
                metrics = next(epochs, None)
                if metrics is None:
                    break
                self._update(metrics)
                yield metrics
        except Diverged as err:
            self.finish(Status.DIVERGED, str(err))
            return
        except Exception as err:
            self.finish(Status.ERROR, one_line(err))
            raise
        self.finish(Status.FINISHED)

    def _update(self, metrics: Mapping[str, float]) -> None:
        history = self.record["history"]
        history.append(dict(metrics))
        accs = [h["val_acc"] for h in history if math.isfinite(h["val_acc"])]
        self.record.update(
            epochs_run=len(history),
            final_val_acc=history[-1]["val_acc"],
            final_val_top5=history[-1]["val_top5"],
            best_val_acc=max(accs) if accs else None,
            train_time_s=sum(h["epoch_time_s"] for h in history),
            images_per_s=sum(h["train_images_per_s"] for h in history) / len(history),
            data_wait_fraction=_mean(h.get("data_wait_fraction") for h in history),
            peak_memory_mb=max(h["peak_memory_mb"] for h in history),
        )
        self._write()

    def _strike(self) -> None:
        """Fault injection (for tests): fail the chosen trial at the chosen epoch, `times` times.

        In a data-parallel trial worker 0 fails alone, as one lost worker would: a raise takes
        the worker group down, a NaN reaches every worker through the shared loss.
        """
        fault = self.faults
        if fault is None or fault.kind is None or self.trainer.epoch + 1 != fault.epoch:
            return
        if self.rank != 0:
            return
        counter = self.record_path.with_suffix(".faults")
        struck = int(counter.read_text()) if counter.exists() else 0
        if struck >= fault.times:
            return
        counter.write_text(str(struck + 1))
        if fault.kind == "raise":
            raise RuntimeError(f"injected fault at epoch {fault.epoch} (attempt {struck + 1})")
        if fault.kind == "oom":  # 1 EiB: CUDA's OutOfMemoryError, or the CPU allocator's error
            torch.empty(2**60, dtype=torch.uint8, device=self.trainer.device)
        with torch.no_grad():  # diverge for real: the next loss is NaN and the trainer stops
            next(self.model.parameters()).fill_(math.nan)

    def finish(self, status: Status, error: str | None = None) -> None:
        """Close the record with a final status."""
        self.record.update(status=status, error=error)
        self._write()

    def _write(self) -> None:
        if self.rank == 0:
            write_json(self.record_path, self.record)
            if self.on_write is not None:
                self.on_write(self.record_path)
