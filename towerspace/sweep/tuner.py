"""Ray Tune's side of a sweep: its search space, searcher, scheduler, progress lines and Tuner."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX

from towerspace.config import ExperimentConfig
from towerspace.spaces import SpaceConfig, grid_points
from towerspace.status import Status
from towerspace.sweep.cluster import max_concurrent

DOMAINS = {
    "choice": lambda v: tune.choice(list(v)),
    "uniform": lambda v: tune.uniform(*v),
    "loguniform": lambda v: tune.loguniform(*v),
    "randint": lambda v: tune.randint(*v),
    "grid": lambda v: tune.grid_search(list(v)),
}
SEARCHER_SEED = 0  # Optuna's sampler seed: the same experiment proposes the same points
PROGRESS_EVERY_S = 30.0  # while trials run: at most one epoch line this often


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
            self._print(trial, Status.RUNNING, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self._print(trial, "done", trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self._print(trial, Status.ERROR, trial.last_result or {})


def count_trials(space: SpaceConfig, seeds: tuple[int, ...]) -> int:
    """How many trials a space launches."""
    return len(grid_points(space)) * space.num_samples * len(seeds)


def make_tuner(
    cfg: ExperimentConfig, trainable, storage: Path, total: int, watch: tune.Callback
) -> tune.Tuner:
    """A new sweep's Tuner: its space, searcher, scheduler, concurrency, storage and callbacks."""
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
            # a new trial skips process start-up, torch import, data load; but a trial ASHA
            # stops may still be running its function when its actor is handed on, and the
            # next trial then errors (ray-project/ray#29268): no reuse under a scheduler
            reuse_actors=scheduler(cfg) is None,
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
