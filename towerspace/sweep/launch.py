"""Launching a sweep: checks, the driver's lock, Ray, the Tuner's run, then records and tables."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
from ray import tune

from towerspace import results
from towerspace import storage as storage_lib
from towerspace.config import ExperimentConfig, apply
from towerspace.estimate import MetaModels
from towerspace.files import shown
from towerspace.models.builders import absolute_builder
from towerspace.objectstore import SweepStore, ray_temp
from towerspace.progress import count_trials
from towerspace.status import FAILED, Status
from towerspace.study import write_study
from towerspace.sweep.cluster import check_resources, init_ray, trial_resources
from towerspace.sweep.disk import (
    DiskWatch,
    disk_full_error,
    no_space,
    reserve_space,
    stopped_by_full_disk,
)
from towerspace.sweep.preflight import preflight
from towerspace.sweep.state import (
    close_records,
    create_storage,
    mark,
    plan_storage,
    resolve_storage,
    restore_tuner,
    set_aside_orphans,
)
from towerspace.sweep.trainable import run_trial
from towerspace.sweep.tuner import Progress, StoreSync, make_tuner, param_space
from towerspace.trial import provenance


@dataclass(frozen=True)
class SweepOutcome:
    """Where a finished sweep's tables are, and how its trials ended."""

    sweep_dir: Path
    tables: results.Tables  # written once, by the sweep: its report draws from them
    statuses: dict[str, int]
    unfinished: int = 0  # trials an interruption left running or pending (--resume continues)
    uri: str | None = None  # a sweep on object storage: where it is (sweep_dir: its staging)

    @property
    def results_path(self) -> Path:
        """The sweep's results.parquet: one row per trial."""
        return self.tables.results_path

    @property
    def history_path(self) -> Path:
        """The sweep's history.parquet: one row per trial and epoch."""
        return self.tables.history_path

    @property
    def failed(self) -> int:
        """Trials that ended in error or diverged."""
        return sum(self.statuses.get(status, 0) for status in FAILED)


def run_sweep(
    cfg: ExperimentConfig,
    *,
    storage: str | Path,
    address: str | None = None,
    restart: bool = False,
    resume: bool = False,
    retry_errored: bool = False,
    confirm: Callable[[ExperimentConfig, MetaModels], None] | None = None,
    finish: Callable[[SweepOutcome], None] | None = None,
) -> SweepOutcome:
    """Run (or resume) every trial of an experiment on Ray Tune and write its results tables.

    One driver at a time: the sweep folder is locked from the checks to the tables and to
    finish(outcome) (the report). A URI storage runs in a staging folder, synced to the store.
    """
    started = time.time()
    storage = resolve_storage(storage)  # a URI is opened here: refused before anything starts
    built = preflight(cfg, address)
    cfg = _absolute_paths(cfg)
    if isinstance(storage, str):
        return _run_on_store(cfg, storage, address, restart, resume, retry_errored, confirm,
                             finish, started, built)  # fmt: skip
    sweep_dir = plan_storage(cfg, storage, restart, resume)
    with storage_lib.DriverLock(sweep_dir, "--resume" if resume else "sweep"):
        plan_storage(cfg, storage, restart, resume, probe=False)  # as it is now, under the lock
        if confirm is not None and not resume:  # checked input, nothing started: ask about cost
            confirm(cfg, built)
        init_ray(address)
        check_resources(cfg)
        if not resume:
            removed = create_storage(cfg, sweep_dir, restart)
            if removed:
                print(f"{cfg.name}: --restart removed the old sweep's {len(removed)} entries "
                      f"from {shown(sweep_dir)}: {_listing(removed)}", flush=True)  # fmt: skip
        outcome = _run(cfg, sweep_dir, resume, retry_errored, started)
        if finish is not None:
            finish(outcome)
        return outcome


def _run_on_store(cfg, storage: str, address, restart, resume, retry_errored, confirm, finish,
                  started: float, built) -> SweepOutcome:  # fmt: skip
    """A sweep on object storage: its lease, a staging folder read from the store, the run,
    and every change uploaded (also when it is interrupted or fails)."""
    storage_lib.sweep_folder(ray_temp(), cfg.name)  # the name, checked before any use
    store = SweepStore.for_sweep(storage, cfg.name)
    with store.lease("--resume" if resume else "sweep"):
        store.stage()
        sweep_dir = plan_storage(cfg, store.local.parent, restart, resume, store=store)
        with storage_lib.DriverLock(sweep_dir, "--resume" if resume else "sweep"):
            if confirm is not None and not resume:
                confirm(cfg, built)
            init_ray(address)
            check_resources(cfg)
            if not resume:
                removed = create_storage(cfg, sweep_dir, restart, store)
                if removed:
                    print(f"{cfg.name}: --restart removed the old sweep from {store.uri}",
                          flush=True)  # fmt: skip
                store.push()  # its experiment: a kill from here on leaves a sweep to resume
            try:
                outcome = _run(cfg, sweep_dir, resume, retry_errored, started, store)
                if finish is not None:
                    finish(outcome)
            except BaseException:
                with contextlib.suppress(Exception):  # the first error is the one to show
                    store.push()
                raise
            store.push()
            return outcome


def _run(cfg: ExperimentConfig, sweep_dir: Path, resume: bool, retry_errored: bool,
         started: float, store: SweepStore | None = None) -> SweepOutcome:  # fmt: skip
    """Launch (or restore) the Tuner, close the records and write the tables."""
    records_dir = sweep_dir / results.RECORDS
    ray_dir = store.uri if store is not None else str(sweep_dir)  # where Ray keeps its state
    # a resume retries the trials a full disk ended; the others keep their errors unless asked
    retry = retry_errored or (resume and stopped_by_full_disk(records_dir))
    keep_errors_before = started if retry and not retry_errored else None
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg, records=str(records_dir), origin=provenance(),
                             keep_errors_before=keep_errors_before,
                             remote=store.uri if store is not None else None),
        trial_resources(cfg),
    )  # fmt: skip
    total = count_trials(cfg.space, cfg.seeds)
    cluster = ray.cluster_resources()
    verb = "resuming" if resume else "running"
    print(f"{cfg.name}: {verb} {total} trials on {cluster.get('CPU', 0):g} CPUs and "
          f"{cluster.get('GPU', 0):g} GPUs, in {ray_dir if store else shown(sweep_dir)}",
          flush=True)  # fmt: skip
    watch = DiskWatch(sweep_dir)
    callbacks = [watch] if store is None else [watch, StoreSync(store)]
    if resume:
        orphans = set_aside_orphans(sweep_dir)
        if orphans:
            print(f"{cfg.name}: {len(orphans)} trials started after Ray last saved its state, "
                  f"before the kill; not resumable, their records are kept in "
                  f"{shown(sweep_dir / results.RECORDS / results.ORPHANED)}: {_listing(orphans)}",
                  flush=True)  # fmt: skip
        params = param_space(cfg.space, cfg.seeds)
        progress = Progress(total, cfg.train.epochs)
        tuner = restore_tuner(ray_dir, trainable, params, retry, [progress, *callbacks])
    else:
        storage = store.uri.rsplit("/", 1)[0] if store is not None else sweep_dir.parent
        tuner = make_tuner(cfg, trainable, storage, total, callbacks)
    reserve = reserve_space(sweep_dir)
    try:
        grid = tuner.fit()
    except Exception as err:
        if watch.full or storage_lib.disk_full(err) or no_space(sweep_dir):
            raise disk_full_error(sweep_dir) from None
        raise
    finally:  # its space is what the records and tables are closed with on a full disk
        reserve.unlink(missing_ok=True)
    if store is not None:  # Ray's last state, and the records of trials on other nodes
        store.pull()
    unfinished = close_records(grid, records_dir, cfg)
    if watch.full:  # whatever Ray's saved state says: a record that ran says so itself
        for path in records_dir.glob("*.json"):
            mark(path, Status.ERROR, storage_lib.NO_SPACE)
    try:  # damaged records: kept as notes, named by whoever reads the tables
        tables = results.write_tables_noting(sweep_dir)
        with warnings.catch_warnings():  # damaged records: already in the tables' notes
            warnings.simplefilter("ignore", results.DamagedRecord)
            write_study(sweep_dir, results.read_records(sweep_dir), cfg.name, cfg.space)
    except OSError as err:
        if storage_lib.disk_full(err):
            raise disk_full_error(sweep_dir) from None
        raise
    if watch.full:
        raise disk_full_error(sweep_dir)
    statuses = Counter(pd.read_parquet(tables.results_path)["status"])
    uri = store.uri if store is not None else None
    return SweepOutcome(sweep_dir, tables, dict(statuses), unfinished, uri)


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


def _listing(names: list[str], at_most: int = 6) -> str:
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more
