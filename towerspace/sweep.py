"""Tower sweeps on Ray Tune: the only module that imports Ray."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import shutil
import tempfile
import time
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
from towerspace import results
from towerspace.config import (
    ConfigError,
    ExperimentConfig,
    SpaceConfig,
    apply,
    from_dict,
    to_dict,
)
from towerspace.impls import share_choices
from towerspace.models import build_model
from towerspace.models.builders import absolute_builder
from towerspace.results import write_json
from towerspace.trial import CHECKPOINT, Trial, provenance

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
IMPL_CHOICES = "impl_choices.json"  # impl: auto: the kernels chosen for the sweep, by layer shape


@dataclass(frozen=True)
class SweepOutcome:
    """Where a finished sweep's tables are, and how its trials ended."""

    sweep_dir: Path
    results_path: Path
    history_path: Path
    statuses: dict[str, int]

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


def run_trial(config: dict[str, Any], *, base: ExperimentConfig, records: str, origin: dict):
    """Ray Tune's trainable: a thin adapter that reports each epoch with a checkpoint."""
    point = {k: v for k, v in config.items() if k not in ("seed", TRIAL_INDEX)}
    seed = config["seed"] if "seed" in config else base.seeds[config.get(TRIAL_INDEX, 0)]
    trial_id = tune.get_context().get_trial_id()
    record_path = Path(records) / f"{trial_id}.json"
    done = _finished_record(record_path)
    if done is not None:  # finished before a kill that Ray's saved state did not see: keep it
        tune.report(done["history"][-1])
        return
    cfg = apply(base, point)
    if cfg.model.impl == "auto":  # every trial of the sweep (and its resume) runs the same kernels
        share_choices(Path(records).parent / IMPL_CHOICES)
    job = {"seed": seed, "trial_id": trial_id, "point": point, "record_path": record_path,
           "origin": origin}  # fmt: skip
    if cfg.resources.workers > 1:
        _run_data_parallel(cfg, job)
        return
    torch.set_num_threads(max(1, math.ceil(cfg.resources.cpus)))
    trial = Trial(cfg, **job)
    checkpoint = newest_checkpoint(
        tune.get_checkpoint(), trial_folder(Path(records).parent, trial_id)
    )
    folder = trial_folder(Path(records).parent, trial_id)
    try:
        _train(trial, cfg, checkpoint, tune.report, tune.Checkpoint, lambda: prune(folder))
    finally:  # workers are reused across trials: leave nothing behind for the next one
        del trial
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
    trial: Trial, cfg: ExperimentConfig, checkpoint, report, checkpoint_cls, after_report=None
) -> None:
    """Continue from a checkpoint, then report every epoch with one (Tune's or Train's API)."""
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trial.load_checkpoint(Path(directory))
    for metrics in trial.epochs():
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
    quiet = {"log_to_driver": False, "configure_logging": True, "logging_level": "warning"}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(),
                 include_dashboard=False, **quiet)  # fmt: skip


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


EXPERIMENT_FILE = "experiment.json"  # the resolved config a sweep was started with


def resolve_storage(storage: str | Path) -> Path:
    """The storage folder as an absolute path; object-store URIs are refused, not mangled."""
    if URI.match(str(storage)):  # Path() would fold s3://bucket into a local folder s3:/bucket
        raise ConfigError(f"--storage {storage}: object-store URIs are not supported (trial "
                          f"records are plain files); use a folder that every node mounts, "
                          f"such as an NFS path")  # fmt: skip
    return Path(storage).resolve()


def plan_storage(cfg: ExperimentConfig, storage: Path, restart: bool, resume: bool) -> Path:
    """The sweep's directory, checked but not yet written: refuse what cannot or must not go."""
    sweep_dir = storage / cfg.name
    exists = sweep_dir.is_dir() and any(sweep_dir.iterdir())
    if resume:
        if not exists:
            raise ConfigError(f"--resume: no sweep named {cfg.name!r} under {storage}")
        _check_same_experiment(cfg, sweep_dir)
        if not tune.Tuner.can_restore(str(sweep_dir)):
            raise ConfigError(f"--resume: {sweep_dir} holds no Ray Tune state to resume; "
                              f"pass --restart to start over")  # fmt: skip
        return sweep_dir
    if exists and not restart:
        raise ConfigError(
            f"{sweep_dir}: a sweep named {cfg.name!r} is already there; pass --resume to "
            f"continue it or --restart to replace it (or --storage to write elsewhere)"
        )
    ancestor = storage
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--storage {storage}: cannot write there ({ancestor} is not a "
                          f"writable folder)")  # fmt: skip
    return sweep_dir


def create_storage(cfg: ExperimentConfig, sweep_dir: Path, restart: bool) -> None:
    """Write the sweep's folder: replace an old sweep when restarting, record the experiment."""
    try:
        if restart and sweep_dir.exists():
            shutil.rmtree(sweep_dir)
        (sweep_dir / results.RECORDS).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--storage {sweep_dir.parent}: cannot write there "
                          f"({err.strerror})") from None  # fmt: skip
    write_json(sweep_dir / EXPERIMENT_FILE, _comparable(cfg))


def preflight(cfg: ExperimentConfig) -> None:
    """Checks that would otherwise fail inside every trial: data on disk, strict tower counts."""
    if cfg.data.name not in ("digits", "synthetic") and not cfg.data.download:
        root = cfg.data.root
        if root is None or not Path(root).expanduser().is_dir():
            what = "is not set" if root is None else f"{root!r} is not a folder"
            raise ConfigError(f"{cfg.source}: data.root: {what}; {cfg.data.name} needs its files "
                              f"there (or --set data.download=true)")  # fmt: skip
    shape = {"in_chans": 3, "num_classes": 10, "image_size": cfg.data.image_size or 32}
    if cfg.model.init_from is not None:  # a weights file fixes channels and classes: use the data's
        sizes = datasets.sizes(cfg.data)
        shape = {"in_chans": sizes.in_chans, "num_classes": sizes.num_classes,
                 "image_size": sizes.image_size}  # fmt: skip
    for field, point in _points(cfg):
        try:
            with torch.device("meta"):  # structure only: no weights allocated
                build_model(apply(cfg, point).model, **shape)
        except ValueError as err:
            raise ConfigError(f"{cfg.source}: {field}: {err}") from None


def _points(cfg: ExperimentConfig):
    """The base model, then each value of each grid or choice parameter on its own."""
    yield "model", {}
    for key, domain in cfg.space.params.items():
        if domain.kind in ("grid", "choice") and key.startswith("model."):
            for value in domain.values:
                yield f"space {cfg.space.name}: {key}={value}", {key: value}


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
    """Run (or resume) every trial of an experiment on Ray Tune and write its results tables."""
    preflight(cfg)
    storage = resolve_storage(storage)
    if cfg.data.root is not None:  # trials run in their own working directories
        cfg = apply(cfg, {"data.root": str(Path(cfg.data.root).resolve())})
    if cfg.model.builder is not None:  # so do custom models' files
        cfg = apply(cfg, {"model.builder": absolute_builder(cfg.model.builder)})
    if cfg.model.init_from is not None:
        cfg = apply(cfg, {"model.init_from": str(Path(cfg.model.init_from).resolve())})
    sweep_dir = plan_storage(cfg, storage, restart, resume)
    if confirm is not None and not resume:  # checked input, nothing started: ask about the cost
        confirm(cfg)
    init_ray(address)
    check_resources(cfg)
    if not resume:
        create_storage(cfg, sweep_dir, restart)
    records_dir = sweep_dir / results.RECORDS
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg, records=str(records_dir), origin=provenance()),
        trial_resources(cfg),
    )
    total = count_trials(cfg.space, cfg.seeds)
    cluster = ray.cluster_resources()
    verb = "resuming" if resume else "running"
    try:
        shown = sweep_dir.relative_to(Path.cwd())
    except ValueError:
        shown = sweep_dir
    print(f"{cfg.name}: {verb} {total} trials on {cluster.get('CPU', 0):g} CPUs and "
          f"{cluster.get('GPU', 0):g} GPUs, in {shown}", flush=True)  # fmt: skip
    if resume:
        tuner = _restore(sweep_dir, trainable, cfg, retry_errored)
    else:
        tuner = _tuner(cfg, trainable, storage, total)
    grid = tuner.fit()
    close_records(grid, records_dir, cfg)
    results_path, history_path = results.write_tables(sweep_dir)
    statuses = Counter(pd.read_parquet(results_path)["status"])
    return SweepOutcome(sweep_dir, results_path, history_path, dict(statuses))


def _tuner(cfg: ExperimentConfig, trainable, storage: Path, total: int) -> tune.Tuner:
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
            callbacks=[Progress(total)],
            verbose=0,
        ),
    )


def _restore(sweep_dir: Path, trainable, cfg: ExperimentConfig, retry_errored: bool):
    """Ray's restore; its state is pickles, so only trusted directories may be resumed."""
    try:
        return tune.Tuner.restore(
            str(sweep_dir), trainable=trainable, resume_unfinished=True,
            resume_errored=retry_errored, param_space=param_space(cfg.space, cfg.seeds),
        )  # fmt: skip
    except Exception as err:  # a damaged state must never become a silent fresh start
        problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise ConfigError(f"--resume: cannot read the Ray Tune state in {sweep_dir} "
                          f"({problem}); pass --restart to start over") from None  # fmt: skip


def _saved_statuses(sweep_dir: Path) -> dict[str, str]:
    """Trial statuses in Ray's last saved experiment state: what --resume will see.

    After a Ctrl-C, Ray ends the interrupted trials in memory but saves them as running, and
    resumes them; only the saved state tells an interruption from a scheduler's stop.
    """
    states = sorted(sweep_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
        parsed = [json.loads(t[0]) if isinstance(t[0], str) else t[0] for t in trials]
        return {t["trial_id"]: t["status"] for t in parsed}
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        return {}


def close_records(grid: tune.ResultGrid, records_dir: Path, cfg: ExperimentConfig) -> None:
    """Give every ended trial a final status; interrupted ones stay unfinished (resumable).

    Ray's per-trial status is only on the experiment analysis behind the ResultGrid (Ray is
    pinned in requirements.lock; this is the one place that reads it).
    """
    saved = _saved_statuses(records_dir.parent)
    for trial in grid._experiment_analysis.trials:
        status_now = saved.get(trial.trial_id, trial.status)
        if status_now not in ("TERMINATED", "ERROR"):
            continue  # running or pending when interrupted: --resume continues it
        path = records_dir / f"{trial.trial_id}.json"
        try:
            record = results.read_record(path)
        except (OSError, ValueError):
            record = {"experiment": cfg.name, "trial_id": trial.trial_id, "status": "running",
                      "point": {}, "history": []}  # fmt: skip
        if record["status"] != "running":
            continue
        error = trial.get_error() if trial.status == "ERROR" else None
        # a scheduler may stop a trial at its last epoch too: it ran to the end, so it finished
        ran_out = record.get("epochs_run", 0) >= record.get("epochs_planned", math.inf)
        status = "error" if trial.status == "ERROR" else "finished" if ran_out else "stopped"
        message = str(error).strip().splitlines()[-1] if error else None
        record.update(status=status, error=record.get("error") or message)
        write_json(path, record)
