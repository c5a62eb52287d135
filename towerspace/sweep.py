"""Tower sweeps on Ray Tune: the only module that imports Ray."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from ray import train, tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX

from towerspace import data as datasets
from towerspace import memory, results
from towerspace import storage as storage_lib
from towerspace.config import ConfigError, ExperimentConfig, apply, from_dict, to_dict
from towerspace.errors import DiskFull, StorageError
from towerspace.files import write_json
from towerspace.impls import share_choices
from towerspace.models import build_model
from towerspace.models.builders import absolute_builder
from towerspace.spaces import SpaceConfig
from towerspace.trial import CHECKPOINT, Trial, failed_record, one_line, provenance

DOMAINS = {
    "choice": lambda v: tune.choice(list(v)),
    "uniform": lambda v: tune.uniform(*v),
    "loguniform": lambda v: tune.loguniform(*v),
    "randint": lambda v: tune.randint(*v),
    "grid": lambda v: tune.grid_search(list(v)),
}
SEARCHER_SEED = 0  # Optuna's sampler seed: the same experiment proposes the same points
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # s3://, gs://, hdfs://, file:/ ...
KEEP_CHECKPOINTS_S = 300.0  # a trial's checkpoints younger than this are never pruned
PROGRESS_EVERY_S = 30.0  # while trials run: at most one epoch line this often
DRIVER_MEMORY = 256 * 2**20  # bytes Tune reserves for a data-parallel trial's driver
TRAIN_RUNS = "train"  # a sweep's folder for the Ray Train runs of its data-parallel trials
DISK_RESERVE = 4 * 2**20  # bytes (at most 5% of the disk): with less free a sweep stops
RESERVE = ".space_reserve"  # a file held while trials run, removed to close a sweep on a full disk
RESERVE_BYTES = 2**20
ADDRESS_WAIT_S = 10.0  # --address: how long to wait for a Ray head to answer
IMPL_CHOICES = "impl_choices.json"  # impl: auto: the kernels chosen for the sweep, by layer shape


@dataclass(frozen=True)
class SweepOutcome:
    """Where a finished sweep's tables are, and how its trials ended."""

    sweep_dir: Path
    results_path: Path
    history_path: Path
    statuses: dict[str, int]
    unfinished: int = 0  # trials an interruption left running or pending (--resume continues)

    @property
    def failed(self) -> int:
        """Trials that ended in error or diverged."""
        return self.statuses.get("error", 0) + self.statuses.get("diverged", 0)


def param_space(space: SpaceConfig, seeds: tuple[int, ...]) -> dict[str, Any]:
    """Ray Tune's param_space: the space's domains, plus seeds as a grid for grid spaces."""
    params = {name: DOMAINS[d.kind](d.values) for name, d in space.params.items()}
    if space.searcher == "grid":
        params["seed"] = tune.grid_search(list(seeds))
    return params


def searcher(space: SpaceConfig, seeds: tuple[int, ...]) -> Repeater | None:
    """Optuna (TPE or random) for sampled spaces, repeating every point over the seeds."""
    if space.searcher == "grid":
        return None
    import optuna  # the sampler classes; Ray's OptunaSearch drives the study

    sampler = (
        optuna.samplers.TPESampler(seed=SEARCHER_SEED)
        if space.searcher == "optuna"
        else optuna.samplers.RandomSampler(seed=SEARCHER_SEED)
    )
    search = OptunaSearch(metric=space.metric, mode=space.mode, sampler=sampler)
    return Repeater(search, repeat=len(seeds), set_index=True)


def scheduler(cfg: ExperimentConfig) -> ASHAScheduler | None:
    """ASHA early stopping by epoch, or None for FIFO (every trial runs to the end)."""
    if cfg.scheduler.name != "asha":
        return None
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=cfg.train.epochs,
        grace_period=cfg.scheduler.grace_period,
        reduction_factor=cfg.scheduler.reduction_factor,
    )


class Progress(tune.Callback):
    """One line per trial that ends, instead of Ray's per-trial tables; while trials run, an
    epoch line at most every `every_s` seconds, so a long sweep is never silent for hours."""

    def __init__(self, total: int, every_s: float = PROGRESS_EVERY_S) -> None:
        self.total, self.done, self.every_s = total, 0, every_s
        self.start = self.last = time.monotonic()

    def _print(self, trial, status: str, result: dict) -> None:
        point = {k: v for k, v in trial.config.items() if k != TRIAL_INDEX}
        shown = "  ".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
        acc = f"val_acc {result['val_acc']:.3f}" if "val_acc" in result else "no result"
        self.last = time.monotonic()
        print(f"[{self.done}/{self.total} {self.last - self.start:5.0f}s] {status:8} {shown}  "
              f"{acc} after {result.get('training_iteration', 0)} epochs", flush=True)  # fmt: skip

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self._print(trial, "running", result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self._print(trial, "done", trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self._print(trial, "error", trial.last_result or {})


def count_trials(space: SpaceConfig, seeds: tuple[int, ...]) -> int:
    """How many trials a space launches."""
    if space.searcher != "grid":
        return space.num_samples * len(seeds)
    grid = math.prod(len(d.values) for d in space.params.values() if d.kind == "grid")
    return grid * len(seeds) * space.num_samples


def run_trial(
    config: dict[str, Any],
    *,
    base: ExperimentConfig,
    records: str,
    origin: dict,
    keep_errors_before: float | None = None,
):
    """Ray Tune's trainable: a thin adapter that reports each epoch with a checkpoint.

    Whatever stage a trial fails at, its record says so (a row in the tables). With
    keep_errors_before (a resume that retries only what a full disk ended), a trial that
    ended in another error before then fails again at once, keeping that error.
    """
    point = {k: v for k, v in config.items() if k not in ("seed", TRIAL_INDEX)}
    seed = config["seed"] if "seed" in config else base.seeds[config.get(TRIAL_INDEX, 0)]
    trial_id = tune.get_context().get_trial_id()
    record_path = Path(records) / f"{trial_id}.json"
    done = _finished_record(record_path)
    if done is not None:  # finished before a kill that Ray's saved state did not see: keep it
        tune.report(done["history"][-1])
        return
    kept = _kept_error(record_path, keep_errors_before)
    if kept is not None:
        raise RuntimeError(f"{kept} (kept from before this resume; --retry-errored retries it)")
    job = {"seed": seed, "trial_id": trial_id, "point": point, "record_path": record_path,
           "origin": origin}  # fmt: skip
    try:
        _run_trial(apply(base, point), job, Path(records).parent)
    except Exception as err:
        with contextlib.suppress(OSError):  # a full disk: the record stays as it was
            record_failure(base, job, err)
        raise


def _run_trial(cfg: ExperimentConfig, job: dict[str, Any], sweep_dir: Path) -> None:
    if cfg.model.impl == "auto":  # every trial of the sweep (and its resume) runs the same kernels
        share_choices(sweep_dir / IMPL_CHOICES)
    if cfg.resources.workers > 1:
        _run_data_parallel(cfg, job)
        return
    torch.set_num_threads(max(1, math.ceil(cfg.resources.cpus)))
    trial = Trial(cfg, **job)
    folder = trial_folder(sweep_dir, job["trial_id"])
    checkpoint = newest_checkpoint(tune.get_checkpoint(), folder)
    try:
        _train(trial, cfg, checkpoint, tune.report, tune.Checkpoint, lambda: prune(folder),
               reserve=sweep_dir / RESERVE)  # fmt: skip
    finally:  # workers are reused across trials: leave nothing behind for the next one
        del trial
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _kept_error(path: Path, before: float | None) -> str | None:
    """The error of a trial that ended in one (not a full disk's) before `before`, or None."""
    if before is None:
        return None
    try:
        record = results.read_record(path)
        if path.stat().st_mtime >= before or record.get("status") != "error":
            return None
    except (OSError, ValueError):
        return None
    error = record.get("error") or "error"
    return None if storage_lib.disk_full_text(error) else error


def record_failure(base: ExperimentConfig, job: dict[str, Any], err: BaseException) -> None:
    """Close a trial's record as an error, whatever stage it failed at (a record that already
    has its final status keeps it)."""
    path = job["record_path"]
    try:
        record = results.read_record(path)
    except (OSError, ValueError):
        known = {k: job[k] for k in ("seed", "trial_id", "point", "origin")}
        record = failed_record(base, err=err, **known)
    if record.get("status") not in (None, "running"):
        return
    record.update(status="error", error=record.get("error") or one_line(err))
    write_json(path, record)


def trial_folder(sweep_dir: Path, trial_id: str) -> Path:
    """Where Tune persists a trial's checkpoints: <sweep>/run_trial_<trial id>_<point>_<time>.

    (The trial's context names its working directory, not this one.)
    """
    found = sorted(sweep_dir.glob(f"run_trial_{trial_id}_*"))
    return found[0] if found else sweep_dir / f"run_trial_{trial_id}"


def newest_checkpoint(known: tune.Checkpoint | None, trial_dir: Path) -> tune.Checkpoint | None:
    """The newest complete epoch checkpoint of a trial: Ray's, or a newer one in its folder.

    Ray saves the experiment's state on a timer, so after a hard kill it can know an older
    checkpoint of a trial, or none, while the trial had already persisted newer ones: without
    this the trial would repeat epochs, or start over.
    """
    found = sorted(trial_dir.glob("checkpoint_*"), reverse=True)
    complete = [d for d in found if _complete(d / CHECKPOINT)]
    if not complete:
        return known
    if known is not None and Path(known.path).name >= complete[0].name:
        return known
    return tune.Checkpoint.from_directory(str(complete[0]))


def _complete(path: Path) -> bool:
    """Whether a checkpoint file was written to the end (torch.save writes a zip archive, whose
    directory comes last: a copy cut short by a kill has none)."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def prune(trial_dir: Path, keep: int = 2, keep_s: float = KEEP_CHECKPOINTS_S) -> None:
    """Delete a trial's old checkpoints: all but the newest `keep`, and none younger than keep_s
    seconds (Ray's saved state, behind by up to its save period, may still name them)."""
    old = sorted(trial_dir.glob("checkpoint_*"), reverse=True)[keep:]
    now = time.time()
    for folder in old:
        with contextlib.suppress(OSError):
            if now - folder.stat().st_mtime > keep_s:
                shutil.rmtree(folder)


def _train(
    trial: Trial,
    cfg: ExperimentConfig,
    checkpoint,
    report,
    checkpoint_cls,
    after_report=None,
    reserve: Path | None = None,
) -> None:
    """Continue from a checkpoint, then report every epoch with one (Tune's or Train's API);
    with reserve, stop before a checkpoint once the driver has freed that file (disk full)."""
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trial.load_checkpoint(Path(directory))
    for metrics in trial.epochs():
        if reserve is not None and not reserve.exists():  # the driver freed it: disk full
            raise OSError(errno.ENOSPC, f"{storage_lib.NO_SPACE} (the sweep is stopping)")
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if trial.rank == 0:  # data-parallel workers hold the same weights: one copy
                trial.save_checkpoint(Path(directory))
                saved = checkpoint_cls.from_directory(directory)
            report(metrics, checkpoint=saved)
        if after_report is not None:
            after_report()
    if trial.record["status"] == "diverged":  # never the best: searchers see the worst value
        worst = -math.inf if cfg.space.mode == "max" else math.inf
        report({cfg.space.metric: worst, "diverged": 1})


def _run_data_parallel(cfg: ExperimentConfig, job: dict[str, Any]) -> None:
    """A trial on several workers: Ray Train's TorchTrainer (DDP: NCCL on GPUs, gloo on CPU).

    Its run is named after the trial and kept beside the records, so a retried or resumed
    trial continues from the run's last checkpoint; metrics reach Tune from worker 0.
    """
    res = cfg.resources
    per_worker = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": to_dict(cfg), **job, "record_path": str(job["record_path"])},
        scaling_config=train.ScalingConfig(num_workers=res.workers, use_gpu=res.gpus > 0,
                                           resources_per_worker=per_worker),
        run_config=train.RunConfig(
            name=job["trial_id"],
            storage_path=str(Path(job["record_path"]).parent.parent / TRAIN_RUNS),
            callbacks=[TuneReportCallback()],
            failure_config=train.FailureConfig(max_failures=cfg.retries),
            checkpoint_config=train.CheckpointConfig(num_to_keep=1),
        ),
    )  # fmt: skip
    trainer.fit()


def _train_worker(loop_config: dict[str, Any]) -> None:
    """One data-parallel worker of a trial (torch.distributed is set up by Ray Train)."""
    context = train.get_context()
    cfg = from_dict(loop_config["config"])
    torch.set_num_threads(max(1, math.ceil(cfg.resources.cpus)))
    if cfg.model.impl == "auto":
        share_choices(Path(loop_config["record_path"]).parent.parent / IMPL_CHOICES)
    job = {k: loop_config[k] for k in ("seed", "trial_id", "point", "origin")}
    trial = Trial(cfg, **job, record_path=Path(loop_config["record_path"]),
                  rank=context.get_world_rank(), world_size=context.get_world_size())  # fmt: skip
    _train(trial, cfg, train.get_checkpoint(), train.report, train.Checkpoint)


def _finished_record(path: Path) -> dict | None:
    try:
        record = results.read_record(path)
    except (OSError, ValueError):
        return None
    return record if record["status"] == "finished" and record.get("history") else None


def init_ray(address: str | None) -> None:
    """Connect to a Ray cluster (address or RAY_ADDRESS), or start a local one on this machine."""
    if ray.is_initialized():
        return
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # a stopped sweep's trials end in errors Tune already handled (and towerspace recorded):
    # Ray would print each again with its traceback as "unhandled"
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    quiet = {"log_to_driver": False, "configure_logging": True, "logging_level": "warning"}
    if address or os.environ.get("RAY_ADDRESS"):
        check_address(
            address or os.environ["RAY_ADDRESS"], "--address" if address else "RAY_ADDRESS"
        )
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(),
                 include_dashboard=False, **quiet)  # fmt: skip
    for handler in logging.getLogger("ray").handlers:
        handler.addFilter(_disk_full_in_one_line)


def _disk_full_in_one_line(record: logging.LogRecord) -> bool:
    """Ray's log lines about a full disk without their tracebacks: the sweep stops and says so."""
    if record.exc_info and storage_lib.disk_full(record.exc_info[1]):
        record.msg, record.args = f"{record.getMessage().strip()} {storage_lib.NO_SPACE}", ()
        record.exc_info = record.exc_text = None
    return True


def check_address(address: str, what: str = "--address", wait_s: float | None = None) -> None:
    """Refuse a Ray address where nothing answers, after a bounded wait (ray.init would retry
    for minutes; default ADDRESS_WAIT_S). 'auto' and 'local' are Ray's to resolve."""
    if address in ("auto", "local"):
        return
    wait_s = ADDRESS_WAIT_S if wait_s is None else wait_s
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{what} {address}: not allowed; allowed: HOST:PORT of a Ray head, "
                          f"ray://HOST:PORT (Ray Client), auto")  # fmt: skip
    deadline, problem = time.monotonic() + wait_s, "no answer"
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                return
        except OSError as err:
            problem = err.strerror or type(err).__name__
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise ConfigError(f"{what} {address}: nothing answers there after {wait_s:g} s ({problem}); "
                      f"start the cluster (ray start --head) or check the address")  # fmt: skip


def check_resources(cfg: ExperimentConfig) -> None:
    """Refuse a sweep whose trials can never be placed (Ray would wait forever)."""
    available = ray.cluster_resources()
    workers = cfg.resources.workers
    for field, key in (("cpus", "CPU"), ("gpus", "GPU")):
        asked = getattr(cfg.resources, field)
        if asked * workers > available.get(key, 0):
            hint = " (--set resources.gpus=0 runs on CPU)" if key == "GPU" else ""
            each = f"{asked:g} per worker x {workers} workers" if workers > 1 else f"{asked:g}"
            raise ConfigError(
                f"{cfg.source}: resources.{field}: {each} per trial, but the Ray cluster has "
                f"{available.get(key, 0):g}{hint}"
            )


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What Tune reserves for a trial: its resources, or for a data-parallel trial only its
    driver's memory (Ray Train reserves the workers' CPUs and GPUs itself; a CPU held by
    the driver could leave the workers waiting for it forever)."""
    if cfg.resources.workers > 1:
        return {"memory": DRIVER_MEMORY}
    return {"cpu": cfg.resources.cpus, "gpu": cfg.resources.gpus}


def max_concurrent(cfg: ExperimentConfig) -> int:
    """Trials that fit on the cluster at once (0: Tune decides, from the trials' resources).

    Data-parallel trial drivers reserve nothing, so without a cap Tune would start every
    trial and leave their worker groups queueing for the same resources.
    """
    res = cfg.resources
    if res.workers == 1:
        return 0
    available = ray.cluster_resources()
    fits = [available.get("CPU", 0) // (res.cpus * res.workers)]
    if res.gpus:
        fits.append(available.get("GPU", 0) // (res.gpus * res.workers))
    return max(1, int(min(fits)))


def resolve_storage(storage: str | Path) -> Path:
    """The storage folder as an absolute path; object-store URIs are refused, not mangled."""
    if URI.match(str(storage)):  # Path() would fold s3://bucket into a local folder s3:/bucket
        raise StorageError(f"--storage {storage}: object-store URIs are not supported (trial "
                           f"records are plain files); use a folder that every node mounts, "
                           f"such as an NFS path")  # fmt: skip
    return Path(storage).expanduser().resolve()


def plan_storage(
    cfg: ExperimentConfig, storage: Path, restart: bool, resume: bool, probe: bool = True
) -> Path:
    """The sweep's directory, checked but not yet written: refuse what cannot or must not go
    (probe: also a folder that another driver has locked)."""
    sweep_dir = storage_lib.sweep_folder(storage, cfg.name)
    if probe:
        action = "--resume" if resume else "--restart" if restart else "sweep"
        storage_lib.refuse_if_locked(sweep_dir, action)
    exists = storage_lib.occupied(sweep_dir)
    for inner in (results.RECORDS, TRAIN_RUNS, "plots"):
        if (sweep_dir / inner).is_symlink():  # never written through: refused, not followed
            raise StorageError(f"{sweep_dir / inner}: is a link; a sweep's folders must be "
                               f"real folders (nothing is written through a link)")  # fmt: skip
    if resume:
        if not exists:
            raise StorageError(f"--resume: no sweep named {cfg.name!r} under {storage}")
        _check_same_experiment(cfg, sweep_dir)
        if not tune.Tuner.can_restore(str(sweep_dir)):
            raise StorageError(f"--resume: {sweep_dir} holds no Ray Tune state to resume; "
                               f"pass --restart to start over")  # fmt: skip
        return sweep_dir
    if exists and not restart:
        raise StorageError(
            f"{sweep_dir}: a sweep named {cfg.name!r} is already there; pass --resume to "
            f"continue it or --restart to replace it (or --storage to write elsewhere)"
        )
    if exists and not (sweep_dir / EXPERIMENT_FILE).is_file():
        raise StorageError(f"--restart: {sweep_dir} holds no towerspace sweep (no "
                           f"{EXPERIMENT_FILE}); nothing removed: remove it yourself, or choose "
                           f"another name or --storage")  # fmt: skip
    ancestor = storage
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise StorageError(f"--storage {storage}: cannot write there ({ancestor} is not a "
                           f"writable folder)")  # fmt: skip
    if _no_space(storage):
        raise DiskFull(f"--storage {storage}: no space left on device "
                       f"({memory.words(shutil.disk_usage(ancestor).free)} free); nothing was "
                       f"started")  # fmt: skip
    return sweep_dir


def create_storage(cfg: ExperimentConfig, sweep_dir: Path, restart: bool) -> list[str]:
    """Write the sweep's folder (its lock is held): clear an old sweep when restarting, record
    the experiment. Returns what a restart removed."""
    removed = storage_lib.clear(sweep_dir) if restart and storage_lib.occupied(sweep_dir) else []
    try:
        (sweep_dir / results.RECORDS).mkdir(parents=True, exist_ok=True)
        write_json(sweep_dir / EXPERIMENT_FILE, _comparable(cfg))
    except OSError as err:
        raise storage_lib.storage_error(sweep_dir, err, "cannot write the sweep there") from None
    return removed


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


def _points(cfg: ExperimentConfig):
    """The base model, then each value of each grid or choice parameter on its own."""
    yield "model", {}
    for key, domain in cfg.space.params.items():
        if domain.kind in ("grid", "choice") and key.startswith("model."):
            for value in domain.values:
                yield f"space {cfg.space.name}: {key}={value}", {key: value}


EXPERIMENT_FILE = storage_lib.EXPERIMENT_FILE


def _comparable(cfg: ExperimentConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg).items() if k not in ("source", "storage")}


def _check_same_experiment(cfg: ExperimentConfig, sweep_dir: Path) -> None:
    path = sweep_dir / EXPERIMENT_FILE
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"--resume: {sweep_dir} is not a towerspace sweep (no readable "
                          f"{EXPERIMENT_FILE})") from None  # fmt: skip
    now = json.loads(json.dumps(_comparable(cfg)))
    # a field added to towerspace after the sweep started is unchanged if it has its default
    defaults = json.loads(json.dumps(_comparable(ExperimentConfig(name=cfg.name, space=cfg.space))))
    changed = sorted(
        d for d in _differences(stored, now) if not _added_default(d, stored, defaults, now)
    )
    if changed:
        raise ConfigError(f"--resume: {sweep_dir} holds a different experiment (changed: "
                          f"{', '.join(changed)})")  # fmt: skip


def _added_default(path: str, stored: dict, defaults: dict, now: dict) -> bool:
    """Whether a dotted field is absent from the stored experiment and at its default now."""
    parts = path.split(".")
    node = stored
    for part in parts[:-1]:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    if not isinstance(node, dict) or parts[-1] in node:
        return False
    return _lookup(defaults, parts) == _lookup(now, parts)


def _lookup(tree: dict, parts: list[str]) -> Any:
    for part in parts:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{path}{k}.")]
    return [] if a == b else [path.rstrip(".")]


def run_sweep(
    cfg: ExperimentConfig,
    *,
    storage: str | Path,
    address: str | None = None,
    restart: bool = False,
    resume: bool = False,
    retry_errored: bool = False,
    confirm: Callable[[ExperimentConfig], None] | None = None,
) -> SweepOutcome:
    """Run (or resume) every trial of an experiment on Ray Tune and write its results tables.

    One driver at a time: the sweep folder is locked from the checks to the tables.
    """
    started = time.time()
    preflight(cfg, address)
    storage = resolve_storage(storage)
    cfg = _absolute_paths(cfg)
    sweep_dir = plan_storage(cfg, storage, restart, resume)
    with storage_lib.DriverLock(sweep_dir, "--resume" if resume else "sweep"):
        plan_storage(cfg, storage, restart, resume, probe=False)  # as it is now, under the lock
        if confirm is not None and not resume:  # checked input, nothing started: ask about cost
            confirm(cfg)
        init_ray(address)
        check_resources(cfg)
        if not resume:
            removed = create_storage(cfg, sweep_dir, restart)
            if removed:
                print(f"{cfg.name}: --restart removed the old sweep's {len(removed)} entries "
                      f"from {_shown(sweep_dir)}: {_listing(removed)}", flush=True)  # fmt: skip
        return _run(cfg, sweep_dir, resume, retry_errored, started)


def _run(cfg: ExperimentConfig, sweep_dir: Path, resume: bool, retry_errored: bool,
         started: float) -> SweepOutcome:  # fmt: skip
    """Launch (or restore) the Tuner, close the records and write the tables."""
    records_dir = sweep_dir / results.RECORDS
    # a resume retries the trials a full disk ended; the others keep their errors unless asked
    retry = retry_errored or (resume and _stopped_by_full_disk(records_dir))
    keep_errors_before = started if retry and not retry_errored else None
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg, records=str(records_dir), origin=provenance(),
                             keep_errors_before=keep_errors_before),
        trial_resources(cfg),
    )  # fmt: skip
    total = count_trials(cfg.space, cfg.seeds)
    cluster = ray.cluster_resources()
    verb = "resuming" if resume else "running"
    print(f"{cfg.name}: {verb} {total} trials on {cluster.get('CPU', 0):g} CPUs and "
          f"{cluster.get('GPU', 0):g} GPUs, in {_shown(sweep_dir)}", flush=True)  # fmt: skip
    watch = DiskWatch(sweep_dir)
    if resume:
        tuner = _restore(sweep_dir, trainable, cfg, retry, [Progress(total), watch])
    else:
        tuner = _tuner(cfg, trainable, sweep_dir.parent, total, watch)
    reserve = _reserve_space(sweep_dir)
    try:
        grid = tuner.fit()
    except Exception as err:
        if watch.full or storage_lib.disk_full(err) or _no_space(sweep_dir):
            raise _disk_full(sweep_dir) from None
        raise
    finally:  # its space is what the records and tables are closed with on a full disk
        reserve.unlink(missing_ok=True)
    unfinished = close_records(grid, records_dir, cfg)
    if watch.full:  # whatever Ray's saved state says: a record that ran says so itself
        for path in records_dir.glob("*.json"):
            _mark(path, "error", storage_lib.NO_SPACE)
    try:
        with warnings.catch_warnings():  # damaged records: named by whoever reads the tables
            warnings.simplefilter("ignore", results.DamagedRecord)
            results_path, history_path = results.write_tables(sweep_dir)
    except OSError as err:
        if storage_lib.disk_full(err):
            raise _disk_full(sweep_dir) from None
        raise
    if watch.full:
        raise _disk_full(sweep_dir)
    statuses = Counter(pd.read_parquet(results_path)["status"])
    return SweepOutcome(sweep_dir, results_path, history_path, dict(statuses), unfinished)


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with its files as absolute paths: trials run in working directories of
    their own."""
    if cfg.data.root is not None:
        cfg = apply(cfg, {"data.root": str(Path(cfg.data.root).expanduser().resolve())})
    if cfg.model.builder is not None:
        cfg = apply(cfg, {"model.builder": absolute_builder(cfg.model.builder)})
    if cfg.model.init_from is not None:
        cfg = apply(cfg, {"model.init_from": str(Path(cfg.model.init_from).resolve())})
    return cfg


def _shown(path: Path) -> Path:
    """A path relative to the working directory when it lies below it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def _listing(names: list[str], at_most: int = 6) -> str:
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def _disk_full(sweep_dir: Path) -> DiskFull:
    return DiskFull(f"{sweep_dir}: no space left on device; the sweep stopped and kept what "
                    f"was on disk (unfinished trials are resumable): free space, then run the "
                    f"same command with --resume")  # fmt: skip


def _no_space(folder: Path) -> bool:
    """Whether the disk of a folder (or of its nearest existing parent) is all but full."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return False
    return usage.free < min(DISK_RESERVE, 0.05 * usage.total)


def _reserve_space(sweep_dir: Path) -> Path:
    """A file of RESERVE_BYTES held while trials run: when the disk fills up, DiskWatch removes
    it, and its space takes Ray's last state save, the closing records and the tables."""
    path = sweep_dir / RESERVE
    try:
        with open(path, "wb") as file:  # zeros written, not a sparse file: real blocks
            file.write(bytes(RESERVE_BYTES))
    except OSError as err:
        path.unlink(missing_ok=True)
        if storage_lib.disk_full(err):
            raise _disk_full(sweep_dir) from None
        raise storage_lib.storage_error(sweep_dir, err, "cannot write the sweep there") from None
    return path


def _stopped_by_full_disk(records_dir: Path) -> bool:
    """Whether a trial of the sweep ended on a full disk (a resume retries those)."""
    for path in records_dir.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            record = results.read_record(path)
            if record.get("status") == "error" and storage_lib.disk_full_text(record.get("error")):
                return True
    return False


class DiskWatch(tune.Callback):
    """Stops the sweep as Ctrl-C does (trials stay resumable, nothing new starts) when its
    storage fills up: free space below DISK_RESERVE, or a trial failing with ENOSPC."""

    def __init__(self, folder: Path, every_s: float = 2.0) -> None:
        self.folder, self.every_s, self.full, self.last = folder, every_s, False, 0.0

    def _stop(self) -> None:
        if self.full:
            return
        self.full = True
        # its space takes Ray's last state save and the closing records; trials see it gone
        # and write no more checkpoints
        (self.folder / RESERVE).unlink(missing_ok=True)
        print(f"{_shown(self.folder)}: no space left on device: stopping the sweep (unfinished "
              f"trials stay resumable)", flush=True)  # fmt: skip
        if callable(signal.getsignal(signal.SIGUSR1)):  # Tune's stop handler (main thread)
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            if _no_space(self.folder):
                self._stop()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        if storage_lib.disk_full_text(str(trial.get_error())) or _no_space(self.folder):
            self._stop()


def _tuner(cfg: ExperimentConfig, trainable, storage: Path, total: int, watch: DiskWatch):
    repeats = 1 if cfg.space.searcher == "grid" else len(cfg.seeds)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg.space, cfg.seeds),
        tune_config=tune.TuneConfig(
            metric=cfg.space.metric,
            mode=cfg.space.mode,
            search_alg=searcher(cfg.space, cfg.seeds),
            scheduler=scheduler(cfg),
            num_samples=cfg.space.num_samples * repeats,
            max_concurrent_trials=max_concurrent(cfg),
            reuse_actors=True,  # a new trial skips process start-up, torch import, data load
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=str(storage),
            # Tune deletes nothing: its saved state (written every 10 s or so) may name an older
            # checkpoint than the newest, and a resume needs that one to exist; prune() keeps
            # the checkpoints of the last minutes instead
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=cfg.retries),
            callbacks=[Progress(total), watch],
            verbose=0,
        ),
    )


def _restore(sweep_dir: Path, trainable, cfg: ExperimentConfig, retry: bool, callbacks: list):
    """Ray's restore; its state is pickles, so only trusted directories may be resumed."""
    try:
        tuner = tune.Tuner.restore(
            str(sweep_dir), trainable=trainable, resume_unfinished=True,
            resume_errored=retry, param_space=param_space(cfg.space, cfg.seeds),
        )  # fmt: skip
    except Exception as err:  # a damaged state must never become a silent fresh start
        problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise StorageError(f"--resume: cannot read the Ray Tune state in {sweep_dir} "
                           f"({problem}); pass --restart to start over") from None  # fmt: skip
    if tuner._local_tuner is not None:  # this run's callbacks, not the pickled first run's
        tuner._local_tuner.get_run_config().callbacks = callbacks
    return tuner


def _saved_statuses(sweep_dir: Path) -> dict[str, str]:
    """Trial statuses in Ray's last saved experiment state: what --resume will see.

    After a Ctrl-C, Ray ends the interrupted trials in memory but saves them as running, and
    resumes them; only the saved state tells an interruption from a scheduler's stop.
    """
    # the newest run's by name (its start time): Ray re-syncs older runs' files at the end of
    # a resumed run, so their modification times say nothing
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
        parsed = [json.loads(t[0]) if isinstance(t[0], str) else t[0] for t in trials]
        return {t["trial_id"]: t["status"] for t in parsed}
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        return {}


def close_records(grid: tune.ResultGrid, records_dir: Path, cfg: ExperimentConfig) -> int:
    """Give every ended trial a final status; interrupted ones stay unfinished (resumable).

    Ray's per-trial status is only on the experiment analysis behind the ResultGrid (Ray is
    pinned in requirements.lock; this is the one place that reads it).
    """
    saved = _saved_statuses(records_dir.parent)
    unfinished = 0
    for trial in grid._experiment_analysis.trials:
        status_now = saved.get(trial.trial_id, trial.status)
        if status_now not in ("TERMINATED", "ERROR"):
            unfinished += 1
            continue  # running or pending when interrupted: --resume continues it
        path = records_dir / f"{trial.trial_id}.json"
        try:
            record = results.read_record(path)
        except (OSError, ValueError):  # never written (a full disk), or damaged: rebuilt
            record = _record_of(trial, cfg)
        if record["status"] != "running":
            continue
        error = trial.get_error() if trial.status == "ERROR" else None
        # a scheduler may stop a trial at its last epoch too: it ran to the end, so it finished
        ran_out = record.get("epochs_run", 0) >= record.get("epochs_planned", math.inf)
        status = "error" if trial.status == "ERROR" else "finished" if ran_out else "stopped"
        message = str(error).strip().splitlines()[-1] if error else None
        record.update(status=status, error=record.get("error") or message)
        with contextlib.suppress(OSError):  # a full disk: the tables are rebuilt from the rest
            write_json(path, record)
    return unfinished


def _record_of(trial, cfg: ExperimentConfig) -> dict[str, Any]:
    """A record for a trial that left none, from what Ray knows of it."""
    config = dict(trial.config or {})
    point = {k: v for k, v in config.items() if k not in ("seed", TRIAL_INDEX)}
    seed = config["seed"] if "seed" in config else cfg.seeds[config.get(TRIAL_INDEX, 0)]
    return failed_record(cfg, seed=seed, trial_id=trial.trial_id, point=point, origin={},
                         err=None) | {"status": "running"}  # fmt: skip


def _mark(path: Path, status: str, error: str) -> None:
    """Set a running trial's record to a final status, where the disk still allows it."""
    with contextlib.suppress(OSError, ValueError):
        record = results.read_record(path)
        if record.get("status") == "running":
            write_json(path, {**record, "status": status, "error": error})
