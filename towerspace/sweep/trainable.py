"""One trial on Ray Tune: the trainable, on one process or data-parallel (Ray Train)."""

from __future__ import annotations

import contextlib
import errno
import gc
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ray import train, tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search.repeater import TRIAL_INDEX

from towerspace import results
from towerspace import storage as storage_lib
from towerspace.config import ExperimentConfig, apply, from_dict, to_dict
from towerspace.files import write_json
from towerspace.impls import share_choices
from towerspace.status import Status
from towerspace.sweep.checkpoints import (
    newest_checkpoint,
    newest_on_store,
    prune,
    prune_on_store,
    trial_folder,
)
from towerspace.sweep.disk import RESERVE
from towerspace.sweep.state import TRAIN_RUNS
from towerspace.trial import Trial, failed_record, one_line, record_costs

IMPL_CHOICES = "impl_choices.json"  # impl: auto: the kernels chosen for the sweep, by layer shape


def run_trial(
    config: dict[str, Any],
    *,
    base: ExperimentConfig,
    records: str,
    origin: dict,
    keep_errors_before: float | None = None,
    remote: str | None = None,
):
    """Ray Tune's trainable: a thin adapter that reports each epoch with a checkpoint.

    Whatever stage a trial fails at, its record says so (a row in the tables). With
    keep_errors_before (a resume that retries only what a full disk ended), a trial that
    ended in another error before then fails again at once, keeping that error. With remote
    (a sweep on object storage), records is a staging folder on every node, and the trial
    reads its record from the store first and uploads it after every write.
    """
    point = {k: v for k, v in config.items() if k not in ("seed", TRIAL_INDEX)}
    seed = config["seed"] if "seed" in config else base.seeds[config.get(TRIAL_INDEX, 0)]
    trial_id = tune.get_context().get_trial_id()
    record_path = Path(records) / f"{trial_id}.json"
    upload = record_uploader(remote, record_path)
    done = _finished_record(record_path)
    if done is not None:  # finished before a kill that Ray's saved state did not see: keep it
        tune.report({**done["history"][-1], **record_costs(done)})
        return
    kept = _kept_error(record_path, keep_errors_before)
    if kept is not None:
        raise RuntimeError(f"{kept} (kept from before this resume; --retry-errored retries it)")
    job = {"seed": seed, "trial_id": trial_id, "point": point, "record_path": record_path,
           "origin": origin}  # fmt: skip
    try:
        _run_trial(apply(base, point), job, Path(records).parent, remote, upload)
    except Exception as err:
        with contextlib.suppress(OSError):  # a full disk: the record stays as it was
            record_failure(base, job, err)
            if upload is not None:
                upload(record_path)
        raise


def record_uploader(remote: str | None, record_path: Path) -> Callable[[Path], None] | None:
    """On a store: the trial's record read from it into the staging folder (a retried or
    resumed trial, on any node), and a function that uploads the record; else None."""
    if remote is None:
        return None
    from towerspace.objectstore import SweepStore

    store = SweepStore(remote, record_path.parent.parent)
    rel = f"{results.RECORDS}/{record_path.name}"
    store.pull(only=rel)
    return lambda path: store.put_file(rel)


def _run_trial(cfg: ExperimentConfig, job: dict[str, Any], sweep_dir: Path,
               remote: str | None = None, upload=None) -> None:  # fmt: skip
    if cfg.model.impl == "auto":  # every trial of the sweep (and its resume) runs the same kernels
        share_choices(sweep_dir / IMPL_CHOICES)
    if cfg.resources.workers > 1:
        _run_data_parallel(cfg, job, remote)
        return
    torch.set_num_threads(max(1, math.ceil(cfg.resources.cpus)))
    trial = Trial(cfg, **job, on_write=upload)
    folder, trial_id = trial_folder(sweep_dir, job["trial_id"]), job["trial_id"]
    if remote:
        checkpoint = newest_on_store(tune.get_checkpoint(), remote, trial_id)
        tidy = lambda: prune_on_store(remote, trial_id)  # noqa: E731
    else:
        checkpoint = newest_checkpoint(tune.get_checkpoint(), folder)
        tidy = lambda: prune(folder)  # noqa: E731
    try:
        # on a store: no reserve file (it is on the driver's node), checkpoints made in the
        # trial's working folder (in Ray's temporary folder) before Ray uploads them
        _train(trial, cfg, checkpoint, tune.report, tune.Checkpoint, tidy,
               reserve=None if remote else sweep_dir / RESERVE,
               scratch="." if remote else None)  # fmt: skip
    finally:  # workers are reused across trials: leave nothing behind for the next one
        del trial
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _finished_record(path: Path) -> dict | None:
    try:
        record = results.read_record(path)
    except (OSError, ValueError):
        return None
    return record if record["status"] == Status.FINISHED and record.get("history") else None


def _kept_error(path: Path, before: float | None) -> str | None:
    """The error of a trial that ended in one (not a full disk's) before `before`, or None."""
    if before is None:
        return None
    try:
        record = results.read_record(path)
        if path.stat().st_mtime >= before or record.get("status") != Status.ERROR:
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
    if record.get("status") not in (None, Status.RUNNING):
        return
    record.update(status=Status.ERROR, error=record.get("error") or one_line(err))
    write_json(path, record)


def _train(
    trial: Trial,
    cfg: ExperimentConfig,
    checkpoint,
    report,
    checkpoint_cls,
    after_report=None,
    reserve: Path | None = None,
    scratch: str | None = None,
) -> None:
    """Continue from a checkpoint, then report every epoch with one (Tune's or Train's API);
    with reserve, stop before a checkpoint once the driver has freed that file (disk full)."""
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trial.load_checkpoint(Path(directory))
    costs = trial.costs()
    reported = False
    for metrics in trial.epochs():
        if reserve is not None and not reserve.exists():  # the driver freed it: disk full
            raise OSError(errno.ENOSPC, f"{storage_lib.NO_SPACE} (the sweep is stopping)")
        with tempfile.TemporaryDirectory(dir=scratch) as directory:
            saved = None
            if trial.rank == 0:  # data-parallel workers hold the same weights: one copy
                trial.save_checkpoint(Path(directory))
                saved = checkpoint_cls.from_directory(directory)
            report({**metrics, **costs}, checkpoint=saved)
        reported = True
        if after_report is not None:
            after_report()
    if not reported and trial.record["history"]:  # restored after its last epoch: a kill came
        report({**trial.record["history"][-1], **costs})  # between its last checkpoint and record
    if trial.record["status"] == Status.DIVERGED:  # never the best: searchers see the worst value
        worst = -math.inf if cfg.space.mode == "max" else math.inf
        report({**costs, cfg.space.metric: worst, "diverged": 1})


def _run_data_parallel(cfg: ExperimentConfig, job: dict[str, Any], remote: str | None) -> None:
    """A trial on several workers: Ray Train's TorchTrainer (DDP: NCCL on GPUs, gloo on CPU).

    Its run is named after the trial and kept beside the records, so a retried or resumed
    trial continues from the run's last checkpoint; metrics reach Tune from worker 0.
    """
    res = cfg.resources
    per_worker = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": to_dict(cfg), **job, "record_path": str(job["record_path"]),
                           "remote": remote},
        scaling_config=train.ScalingConfig(num_workers=res.workers, use_gpu=res.gpus > 0,
                                           resources_per_worker=per_worker),
        run_config=train.RunConfig(
            name=job["trial_id"],
            storage_path=f"{remote}/{TRAIN_RUNS}" if remote else
            str(Path(job["record_path"]).parent.parent / TRAIN_RUNS),
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
    rank = context.get_world_rank()
    path = Path(loop_config["record_path"])
    upload = record_uploader(loop_config["remote"], path) if rank == 0 else None
    trial = Trial(cfg, **job, record_path=path, rank=rank,
                  world_size=context.get_world_size(), on_write=upload)  # fmt: skip
    _train(
        trial,
        cfg,
        train.get_checkpoint(),
        train.report,
        train.Checkpoint,
        scratch="." if loop_config["remote"] else None,
    )
