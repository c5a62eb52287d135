"""A sweep's state on disk: its folder planned and made, the resume check, Ray's saved state,
and the trial records closed when the Tuner returns.

The only module that reads Ray's internals (its experiment_state-*.json files, the
experiment analysis behind a ResultGrid, the local Tuner of a restore); Ray is pinned in
requirements.lock.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search.repeater import TRIAL_INDEX

from towerspace import memory, results
from towerspace import storage as storage_lib
from towerspace.config import ExperimentConfig, to_dict
from towerspace.errors import ConfigError, DiskFull, StorageError
from towerspace.files import write_json
from towerspace.objectstore import SweepStore, is_uri, open_uri
from towerspace.status import Status
from towerspace.sweep.disk import no_space
from towerspace.trial import TRAIN_RUNS, failed_record

EXPERIMENT_FILE = storage_lib.EXPERIMENT_FILE


def resolve_storage(storage: str | Path) -> Path | str:
    """The storage folder as an absolute path, or a URI (s3://, gs://, ...) as given."""
    if is_uri(storage):  # Path() would fold s3://bucket into a local folder s3:/bucket
        open_uri(str(storage), f"--storage {storage}")  # an unknown scheme, a store not there
        return str(storage).rstrip("/")
    return Path(storage).expanduser().resolve()


def plan_storage(
    cfg: ExperimentConfig,
    storage: Path,
    restart: bool,
    resume: bool,
    probe: bool = True,
    store: SweepStore | None = None,
) -> Path:
    """The sweep's directory, checked but not yet written: refuse what cannot or must not go
    (probe: also a folder that another driver has locked). With a store, storage is the
    staging folder's parent and Ray's state is on the store."""
    sweep_dir = storage_lib.sweep_folder(storage, cfg.name)
    where = sweep_dir if store is None else store.uri  # as the user named it
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
            raise StorageError(
                f"--resume: no sweep named {cfg.name!r} under "
                f"{storage if store is None else store.uri.rsplit('/', 1)[0]}"
            )
        _check_same_experiment(cfg, sweep_dir, where)
        if not tune.Tuner.can_restore(str(where)):
            raise StorageError(f"--resume: {where} holds no Ray Tune state to resume; pass "
                               f"--restart to start over")  # fmt: skip
        return sweep_dir
    if exists and not restart:
        raise StorageError(
            f"{where}: a sweep named {cfg.name!r} is already there; pass --resume to "
            f"continue it or --restart to replace it (or --storage to write elsewhere)"
        )
    if exists:
        storage_lib.check_clearable(sweep_dir)  # before the lock, with nothing written
    ancestor = storage
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise StorageError(f"--storage {storage}: cannot write there ({ancestor} is not a "
                           f"writable folder)")  # fmt: skip
    if no_space(storage):
        raise DiskFull(f"--storage {storage}: no space left on device "
                       f"({memory.words(shutil.disk_usage(ancestor).free)} free); nothing was "
                       f"started")  # fmt: skip
    return sweep_dir


def create_storage(
    cfg: ExperimentConfig, sweep_dir: Path, restart: bool, store: SweepStore | None = None
) -> list[str]:
    """Write the sweep's folder (its lock is held): clear an old sweep when restarting, record
    the experiment. Returns what a restart removed (on a store: its prefix, Ray's too)."""
    removed = storage_lib.clear(sweep_dir) if restart and storage_lib.occupied(sweep_dir) else []
    if restart and store is not None:
        store.clear_remote()
    try:
        (sweep_dir / results.RECORDS).mkdir(parents=True, exist_ok=True)
        write_json(sweep_dir / EXPERIMENT_FILE, _comparable(cfg))
    except OSError as err:
        raise storage_lib.storage_error(sweep_dir, err, "cannot write the sweep there") from None
    return removed


def _comparable(cfg: ExperimentConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg).items() if k not in ("source", "storage")}


def _check_same_experiment(cfg: ExperimentConfig, sweep_dir: Path, where=None) -> None:
    path = sweep_dir / EXPERIMENT_FILE
    where = sweep_dir if where is None else where  # the sweep as the user named it
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"--resume: {where} is not a towerspace sweep (no readable "
                          f"{EXPERIMENT_FILE})") from None  # fmt: skip
    now = json.loads(json.dumps(_comparable(cfg)))
    # a field added to towerspace after the sweep started is unchanged if it has its default
    defaults = json.loads(json.dumps(_comparable(ExperimentConfig(name=cfg.name, space=cfg.space))))
    changed = sorted(
        d for d in _differences(stored, now) if not _added_default(d, stored, defaults, now)
    )
    if changed:
        raise ConfigError(f"--resume: {where} holds a different experiment (changed: "
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


def restore_tuner(
    sweep_dir: Path, trainable, params: dict[str, Any], retry: bool, callbacks: list
) -> tune.Tuner:
    """Ray's restore; its state is pickles, so only trusted directories may be resumed."""
    try:
        tuner = tune.Tuner.restore(
            str(sweep_dir), trainable=trainable, resume_unfinished=True,
            resume_errored=retry, param_space=params,
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


def set_aside_orphans(sweep_dir: Path) -> list[str]:
    """Move aside the records of trials Ray's saved state does not know, and return their ids.

    A trial that started after Ray's last save of its state, when the driver was then killed,
    is unknown to the resumed run: Ray never continues it (a searcher proposes anew, a grid
    runs the point again). Its record moves to records/orphaned/, kept but out of the tables,
    so they hold the sweep Ray resumes, one row per trial. Nothing moves when no saved state
    can be read.
    """
    known = _saved_statuses(sweep_dir)
    records_dir = sweep_dir / results.RECORDS
    if not known or not records_dir.is_dir():
        return []
    orphans = sorted(p for p in records_dir.glob("*.json") if p.stem not in known)
    if orphans:
        (records_dir / results.ORPHANED).mkdir(exist_ok=True)
    for path in orphans:
        os.replace(path, records_dir / results.ORPHANED / path.name)
    return [p.stem for p in orphans]


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
        if record["status"] != Status.RUNNING:
            continue
        error = trial.get_error() if trial.status == "ERROR" else None
        # a scheduler may stop a trial at its last epoch too: it ran to the end, so it finished
        ran_out = record.get("epochs_run", 0) >= record.get("epochs_planned", math.inf)
        status = (
            Status.ERROR
            if trial.status == "ERROR"
            else Status.FINISHED
            if ran_out
            else Status.STOPPED
        )
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
                         err=None) | {"status": Status.RUNNING}  # fmt: skip


def mark(path: Path, status: Status, error: str) -> None:
    """Set a running trial's record to a final status, where the disk still allows it."""
    with contextlib.suppress(OSError, ValueError):
        record = results.read_record(path)
        if record.get("status") == Status.RUNNING:
            write_json(path, {**record, "status": status, "error": error})
