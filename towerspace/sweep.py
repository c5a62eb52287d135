"""Tower sweeps on Ray Tune: the only module that imports Ray."""

from __future__ import annotations

import gc
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX

from towerspace import results
from towerspace.config import ConfigError, ExperimentConfig, SpaceConfig, apply
from towerspace.results import write_json
from towerspace.trial import Trial, provenance

DOMAINS = {
    "choice": lambda v: tune.choice(list(v)),
    "uniform": lambda v: tune.uniform(*v),
    "loguniform": lambda v: tune.loguniform(*v),
    "randint": lambda v: tune.randint(*v),
    "grid": lambda v: tune.grid_search(list(v)),
}
SEARCHER_SEED = 0  # Optuna's sampler seed: the same experiment proposes the same points


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
    """One line per trial that ends, instead of Ray's per-trial tables."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()

    def _line(self, trial, status: str) -> None:
        self.done += 1
        point = {k: v for k, v in trial.config.items() if k != TRIAL_INDEX}
        shown = "  ".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
        last = trial.last_result or {}
        acc = f"val_acc {last['val_acc']:.3f}" if "val_acc" in last else "no result"
        epochs = last.get("training_iteration", 0)
        elapsed = time.monotonic() - self.start
        print(f"[{self.done}/{self.total} {elapsed:5.0f}s] {status:8} {shown}  {acc} "
              f"after {epochs} epochs", flush=True)  # fmt: skip

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "error")


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
    torch.set_num_threads(max(1, math.ceil(base.resources.cpus)))
    trial_id = tune.get_context().get_trial_id()
    trial = Trial(
        apply(base, point), seed=seed, trial_id=trial_id, point=point,
        record_path=Path(records) / f"{trial_id}.json", origin=origin,
    )  # fmt: skip
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trial.load_checkpoint(Path(directory))
    try:
        for metrics in trial.epochs():
            with tempfile.TemporaryDirectory() as directory:
                trial.save_checkpoint(Path(directory))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        if trial.record["status"] == "diverged":  # never the best: searchers see the worst value
            worst = -math.inf if base.space.mode == "max" else math.inf
            tune.report({base.space.metric: worst, "diverged": 1})
    finally:  # workers are reused across trials: leave nothing behind for the next one
        del trial
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
    for field, key in (("cpus", "CPU"), ("gpus", "GPU")):
        asked = getattr(cfg.resources, field)
        if asked > available.get(key, 0):
            hint = " (--set resources.gpus=0 runs on CPU)" if key == "GPU" else ""
            raise ConfigError(
                f"{cfg.source}: resources.{field}: {asked} per trial, but the Ray cluster has "
                f"{available.get(key, 0):g}{hint}"
            )


def prepare_storage(cfg: ExperimentConfig, storage: Path, restart: bool) -> Path:
    """The sweep's directory under storage; an existing sweep is kept unless restart is asked."""
    sweep_dir = storage / cfg.name
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        if not restart:
            raise ConfigError(
                f"{sweep_dir}: a sweep named {cfg.name!r} is already there; pass --restart to "
                f"replace it, or --storage to write elsewhere"
            )
        shutil.rmtree(sweep_dir)
    try:
        (sweep_dir / results.RECORDS).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--storage {storage}: cannot write there ({err.strerror})") from None
    return sweep_dir


def run_sweep(
    cfg: ExperimentConfig, *, storage: Path, address: str | None = None, restart: bool = False
) -> SweepOutcome:
    """Run every trial of an experiment on Ray Tune and write its results tables."""
    storage = Path(storage).resolve()
    if cfg.data.root is not None:  # trials run in their own working directories
        cfg = apply(cfg, {"data.root": str(Path(cfg.data.root).resolve())})
    init_ray(address)
    check_resources(cfg)
    sweep_dir = prepare_storage(cfg, storage, restart)
    records_dir = sweep_dir / results.RECORDS
    trainable = tune.with_parameters(
        run_trial, base=cfg, records=str(records_dir), origin=provenance()
    )
    repeats = 1 if cfg.space.searcher == "grid" else len(cfg.seeds)
    total = count_trials(cfg.space, cfg.seeds)
    cluster = ray.cluster_resources()
    print(f"{cfg.name}: {total} trials on {cluster.get('CPU', 0):g} CPUs and "
          f"{cluster.get('GPU', 0):g} GPUs, into {sweep_dir}", flush=True)  # fmt: skip
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cfg.resources.cpus, "gpu": cfg.resources.gpus}),
        param_space=param_space(cfg.space, cfg.seeds),
        tune_config=tune.TuneConfig(
            metric=cfg.space.metric,
            mode=cfg.space.mode,
            search_alg=searcher(cfg.space, cfg.seeds),
            scheduler=scheduler(cfg),
            num_samples=cfg.space.num_samples * repeats,
            reuse_actors=True,  # a new trial skips process start-up, torch import, data load
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=str(storage),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=cfg.retries),
            callbacks=[Progress(total)],
            verbose=0,
        ),
    )
    grid = tuner.fit()
    close_records(grid, records_dir, cfg)
    results_path, history_path = results.write_tables(sweep_dir)
    statuses = Counter(pd.read_parquet(results_path)["status"])
    return SweepOutcome(sweep_dir, results_path, history_path, dict(statuses))


def close_records(grid: tune.ResultGrid, records_dir: Path, cfg: ExperimentConfig) -> None:
    """Give every trial a final status: early-stopped ones 'stopped', crashed ones 'error'."""
    for result in grid:
        trial_id = Path(result.path).name.split("_")[-3] if result.path else None
        trial_id = (result.metrics or {}).get("trial_id", trial_id)
        path = records_dir / f"{trial_id}.json"
        record = results.read_record(path) if path.exists() else None
        error = f"{type(result.error).__name__}: {result.error}" if result.error else None
        if record is None:
            record = {"experiment": cfg.name, "trial_id": trial_id, "status": "running",
                      "point": {}, "history": []}  # fmt: skip
        if record["status"] != "running":
            continue
        # a scheduler may stop a trial at its last epoch too: it ran to the end, so it finished
        ran_out = record.get("epochs_run", 0) >= record.get("epochs_planned", math.inf)
        status = "error" if error else "finished" if ran_out else "stopped"
        record.update(status=status, error=error)
        write_json(path, record)
