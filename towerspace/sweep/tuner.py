"""Ray Tune's side of a sweep: its search space, searcher, scheduler, progress lines and Tuner."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX

from towerspace.config import ExperimentConfig
from towerspace.objectstore import SYNC_EVERY_S
from towerspace.progress import duration, eta_s
from towerspace.spaces import SpaceConfig
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


def param_space(space: SpaceConfig, seeds: tuple[int, ...]) -> dict[str, Any]:
    """Ray Tune's param_space: the space's domains, plus seeds as a grid for grid spaces."""
    params = {name: DOMAINS[d.kind](d.values) for name, d in space.params.items()}
    if space.searcher == "grid":
        params["seed"] = tune.grid_search(list(seeds))
    return params


def metrics(space: SpaceConfig) -> tuple[list[str], list[str]]:
    """The objectives the searcher sees (the space's metric first) and their modes."""
    return [space.metric, *space.objectives], [space.mode, *space.objectives.values()]


class ConstrainedSearch(OptunaSearch):
    """Ray's OptunaSearch, telling Optuna how far a trial is past each bound of the space
    (Trial.set_constraint: <= 0 is feasible; a bound's metric not reported counts as 1)."""

    def __init__(self, *args, constraints: dict[str, float], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.constraints = constraints

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if self.constraints and ot_trial is not None and result:
            for name, bound in self.constraints.items():
                excess = result.get(name, math.inf) - bound
                ot_trial.set_constraint(name, excess if math.isfinite(excess) else 1.0)
        super().on_trial_complete(trial_id, result, error)


class MeanRepeater(Repeater):
    """Ray's Repeater for any number of objectives and bounds: each is averaged over the seeds
    of a point before the searcher sees it (NaN where no seed reported it)."""

    def __init__(self, searcher: ConstrainedSearch, repeat: int, keys: list[str]) -> None:
        super().__init__(searcher, repeat=repeat, set_index=True)
        self.keys = keys

    def on_trial_complete(self, trial_id: str, result: dict | None = None, **kwargs) -> None:
        group = self._trial_id_to_group[trial_id]
        group.report(trial_id, [float((result or {}).get(k, np.nan)) for k in self.keys])
        if group.finished_reporting():
            scores = np.array(group.scores(), dtype=float)
            with warnings.catch_warnings():  # a point every seed of which failed: all NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                means = np.nanmean(scores, axis=0)
            mean = {k: float(v) for k, v in zip(self.keys, means, strict=True) if not np.isnan(v)}
            self.searcher.on_trial_complete(group.primary_trial_id, result=mean or None, **kwargs)


def searcher(space: SpaceConfig, seeds: tuple[int, ...]) -> Repeater | None:
    """Optuna (TPE, NSGA-II or random) for sampled spaces, with the space's objectives and
    bounds, repeating every point over the seeds."""
    if space.searcher == "grid":
        return None
    import optuna  # the sampler classes; Ray's OptunaSearch drives the study

    sampler = {
        "optuna": optuna.samplers.TPESampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "random": optuna.samplers.RandomSampler,
    }[space.searcher](seed=SEARCHER_SEED)
    names, modes = metrics(space)
    multi = len(names) > 1
    search = ConstrainedSearch(
        # several objectives: the space is given here, so Tune's single metric does not replace
        # the searcher's list (Tune then leaves its param_space empty: see make_tuner)
        space=OptunaSearch.convert_search_space(param_space(space, seeds)) if multi else None,
        metric=names if multi else space.metric,
        mode=modes if multi else space.mode,
        sampler=sampler,
        constraints=space.constraints,
    )
    keys = list(dict.fromkeys([*names, *space.constraints]))
    return MeanRepeater(search, repeat=len(seeds), keys=keys)


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


ENDED = ("TERMINATED", "ERROR")  # Ray's statuses of a trial that will not run again


class Progress(tune.Callback):
    """A line when a trial starts, one per epoch result with an ETA for the sweep, and one
    when a trial ends, instead of Ray's per-trial tables.

    The ETA is progress.eta_s: the epochs left (each unended trial's planned epochs less those
    it reported; every trial not yet started, `epochs`) at the mean epoch_time_s reported so
    far, shared by the trials running now. Trial start-up is not counted.
    """

    def __init__(self, total: int, epochs: int = 1) -> None:
        self.total, self.epochs, self.done = total, epochs, 0
        self.start = time.monotonic()
        self.epoch_s, self.epochs_timed = 0.0, 0

    def _print(self, trial, status: str, what: str = "") -> None:
        point = {k: v for k, v in trial.config.items() if k != TRIAL_INDEX}
        shown = "  ".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
        elapsed = time.monotonic() - self.start
        print(f"[{self.done}/{self.total} {elapsed:5.0f}s] {status:8} {shown}{what}", flush=True)

    @staticmethod
    def _result(result: dict, planned: int | None = None) -> str:
        acc = f"val_acc {result['val_acc']:.3f}" if "val_acc" in result else "no result"
        epochs = result.get("training_iteration", 0)
        return f"  {acc} after {epochs}{f'/{planned}' if planned else ''} epochs"

    def _planned(self, trial) -> int:
        return int(trial.config.get("train.epochs", self.epochs))

    def _eta(self, trials, trial, result: dict) -> str:
        """The sweep's ETA, as progress.eta_s computes it (Ray updates trial.last_result after
        its callbacks: the trial reporting counts its new result)."""
        left, running = (self.total - len(trials)) * self.epochs, 0
        for each in trials:
            last = result if each is trial else each.last_result or {}
            if each.status not in ENDED:
                left += max(0, self._planned(each) - last.get("training_iteration", 0))
                running += each.status == "RUNNING"
        mean = self.epoch_s / self.epochs_timed if self.epochs_timed else None
        eta = eta_s(left, mean, running)
        return "" if eta is None else f"  ETA {duration(eta)}"

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._print(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "epoch_time_s" in result:
            self.epoch_s += result["epoch_time_s"]
            self.epochs_timed += 1
        line = self._result(result, self._planned(trial)) + self._eta(trials, trial, result)
        self._print(trial, Status.RUNNING, line)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self._print(trial, "done", self._result(trial.last_result or {}))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self._print(trial, Status.ERROR, self._result(trial.last_result or {}))


class StoreSync(tune.Callback):
    """Uploads the staging folder's changes to the sweep's object store as trials report (at
    most every SYNC_EVERY_S) and whenever one ends."""

    def __init__(self, store) -> None:
        self.store = store

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.store.push(force=False)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.store.push()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.store.push()


def make_tuner(
    cfg: ExperimentConfig, trainable, storage: Path | str, total: int, callbacks: list
) -> tune.Tuner:
    """A new sweep's Tuner: its space, searcher, scheduler, concurrency, storage and callbacks
    (storage a folder, or a URI where Ray keeps its state and checkpoints on the store)."""
    on_store = isinstance(storage, str)
    repeats = 1 if cfg.space.searcher == "grid" else len(cfg.seeds)
    return tune.Tuner(
        trainable,
        param_space={} if len(cfg.space.objectives) else param_space(cfg.space, cfg.seeds),
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
            callbacks=[Progress(total, cfg.train.epochs), *callbacks],
            # on a store, Ray uploads its state this often (its default, 300 s, would leave a
            # killed sweep nothing to resume)
            sync_config=tune.SyncConfig(sync_period=SYNC_EVERY_S) if on_store else None,
            verbose=0,
        ),
    )
