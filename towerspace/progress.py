"""A sweep's progress read from its folder, without Ray and writing nothing (`towerspace
status`): trials by status, the best so far, elapsed time and an estimate of the time left."""

from __future__ import annotations

import datetime
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from towerspace import results, storage
from towerspace.errors import StorageError
from towerspace.schema import build
from towerspace.spaces import SpaceConfig, grid_points
from towerspace.status import FAILED, Status

PENDING = "pending"  # not started: neither a record nor a trial folder yet
MAX_EXPERIMENT_BYTES = 2**20  # an experiment.json larger than this is not a sweep's
EXPECTED = "expected a sweep's folder, e.g. runs/digits_continuum"


def count_trials(space: SpaceConfig, seeds: Sequence[int]) -> int:
    """How many trials a space launches."""
    return len(grid_points(space)) * space.num_samples * len(seeds)


def eta_s(epochs_left: int, mean_epoch_s: float | None, at_once: int) -> float | None:
    """Seconds until a sweep ends: the epochs left at the mean epoch time so far, shared by the
    trials that run at once (None before any epoch has ended)."""
    if mean_epoch_s is None:
        return None
    return epochs_left * mean_epoch_s / max(1, at_once)


def duration(seconds: float) -> str:
    """Seconds in words a reader takes in at a glance: 42s, 3m05s, 2h03m, 3d04h."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@dataclass(frozen=True)
class SweepProgress:
    """What a sweep's folder says of it now."""

    sweep_dir: str
    name: str
    metric: str  # the experiment's metric, and whether higher (max) or lower is better
    mode: str
    total: int  # trials the experiment launches
    counts: dict[str, int]  # every Status, and PENDING: trials
    driver: dict[str, Any] | None  # the driver holding the folder's lock (pid, host, started)
    elapsed_s: float  # with a driver: since it started; else from the sweep's start to its
    #                   last record
    epochs_left: int  # of trials not ended (ASHA may stop some early: then fewer)
    mean_epoch_s: float | None  # mean epoch_time_s of every epoch recorded so far
    epochs_timed: int
    at_once: int  # trials running now
    eta_s: float | None  # None: no driver runs the sweep, or no epoch has ended yet
    scheduler: str
    best: dict[str, Any] | None  # the trial whose last epoch scores best
    failures: list[dict[str, Any]]
    notes: list[str]  # damaged records, left out

    def to_json(self) -> dict[str, Any]:
        """A plain dict for --json."""
        return asdict(self)


def read_experiment(sweep_dir: Path) -> dict[str, Any]:
    """A sweep's experiment.json as plain data; StorageError (one line) when the folder is not
    a sweep's."""
    if not sweep_dir.is_dir():
        problem = "does not exist" if not sweep_dir.exists() else "is not a folder"
        raise StorageError(f"{sweep_dir}: {problem}; {EXPECTED}")
    path = sweep_dir / storage.EXPERIMENT_FILE
    if not path.is_file() or path.is_symlink():
        raise StorageError(f"{sweep_dir}: not a towerspace sweep (no {storage.EXPERIMENT_FILE}); "
                           f"{EXPECTED}")  # fmt: skip
    try:
        if path.stat().st_size > MAX_EXPERIMENT_BYTES:
            raise ValueError(f"larger than {MAX_EXPERIMENT_BYTES:,} bytes")
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        problem = "not valid JSON" if isinstance(err, json.JSONDecodeError) else str(err)
        raise StorageError(f"{path}: unreadable ({problem or type(err).__name__}); "
                           f"{EXPECTED}") from None  # fmt: skip
    if not isinstance(raw, dict):
        raise StorageError(f"{path}: not an experiment (a JSON mapping); {EXPECTED}")
    return raw


def _field(raw: Mapping[str, Any], section: str, key: str, kind: type, default: Any) -> Any:
    part = raw.get(section)
    value = part.get(key, default) if isinstance(part, dict) else default
    return value if isinstance(value, kind) and not isinstance(value, bool) else default


def read_progress(
    sweep_dir: str | Path,
    now: float | None = None,
    holder: Callable[[Path], dict[str, Any] | None] = storage.holder,
) -> SweepProgress:
    """A sweep's progress from its experiment.json, trial records, trial folders and lock.

    Read-only: the records are each written whole (a rename), so a running sweep is read as it
    is; the lock is probed without waiting (storage.holder).
    """
    sweep_dir = Path(sweep_dir)
    now = time.time() if now is None else now
    raw = read_experiment(sweep_dir)
    where = str(sweep_dir / storage.EXPERIMENT_FILE)
    space = build(SpaceConfig, raw.get("space"), where, "space")
    seeds = raw.get("seeds") if isinstance(raw.get("seeds"), list) else [0]
    epochs = _field(raw, "train", "epochs", int, 1)
    records = _records(sweep_dir)
    record_files = {p.stem for p in (sweep_dir / results.RECORDS).glob("*.json")}
    starting = results.trial_folders(sweep_dir) - record_files  # started, no epoch recorded
    damaged = record_files - {r["trial_id"] for r in records}
    total = count_trials(space, seeds)
    counts = {str(status): 0 for status in Status}
    for record in records:
        counts[record["status"]] += 1
    counts[Status.RUNNING] += len(starting)
    counts[PENDING] = max(0, total - len(records) - len(starting) - len(damaged))
    left = [max(0, (r.get("epochs_planned") or epochs) - (r.get("epochs_run") or 0))
            for r in records if r["status"] == Status.RUNNING]  # fmt: skip
    epochs_left = sum(left) + (len(starting) + counts[PENDING]) * epochs
    times = [h["epoch_time_s"] for r in records for h in r["history"]
             if math.isfinite(h.get("epoch_time_s", math.nan))]  # fmt: skip
    mean = sum(times) / len(times) if times else None
    driver = holder(sweep_dir)
    at_once = counts[Status.RUNNING]
    return SweepProgress(
        sweep_dir=str(sweep_dir), name=str(raw.get("name", sweep_dir.name)), metric=space.metric,
        mode=space.mode, total=total, counts=counts, driver=driver,
        elapsed_s=_elapsed(sweep_dir, driver, now), epochs_left=epochs_left, mean_epoch_s=mean,
        epochs_timed=len(times), at_once=at_once,
        eta_s=eta_s(epochs_left, mean, at_once) if driver is not None else None,
        scheduler=_field(raw, "scheduler", "name", str, "fifo"),
        best=_best(records, space.metric, space.mode),
        failures=[_failure(r) for r in records if r["status"] in FAILED],
        notes=[f"{results.RECORDS}/{name}.json: unreadable, left out" for name in sorted(damaged)],
    )  # fmt: skip


def _records(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every readable record (what read_records warns about is counted by the caller)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", results.DamagedRecord)
        return results.read_records(sweep_dir)


def _elapsed(sweep_dir: Path, driver: dict[str, Any] | None, now: float) -> float:
    """Seconds since the driver started; without one, from the sweep's start (its experiment
    file) to its newest record."""
    start = (sweep_dir / storage.EXPERIMENT_FILE).stat().st_mtime
    if driver is not None:
        try:
            started = datetime.datetime.strptime(driver.get("started", ""), "%Y-%m-%d %H:%M:%S UTC")
            start = started.replace(tzinfo=datetime.UTC).timestamp()
        except (TypeError, ValueError):
            pass
        return max(0.0, now - start)
    stamps = [p.stat().st_mtime for p in (sweep_dir / results.RECORDS).glob("*.json")]
    return max(0.0, max(stamps, default=start) - start)


def _best(records: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The trial whose last recorded epoch scores best on the metric (diverged ones left out,
    as the analysis leaves them out), with its best epoch too."""
    scored = []
    for record in records:
        values = [h.get(metric) for h in record["history"]]
        values = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
        if record["status"] != Status.DIVERGED and values:
            best = max(values) if mode == "max" else min(values)
            scored.append((values[-1], best, record))
    if not scored:
        return None
    pick = max if mode == "max" else min
    final, best, record = pick(scored, key=lambda s: s[0])
    return {"value": final, "best_epoch_value": best, "towers": record["towers"],
            "seed": record["seed"], "trial_id": record["trial_id"], "status": record["status"],
            "epochs_run": record.get("epochs_run"),
            "epochs_planned": record.get("epochs_planned")}  # fmt: skip


def _failure(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in ("trial_id", "status", "towers", "seed", "error")}


def lines(progress: SweepProgress) -> list[str]:
    """The progress as a few lines of text."""
    p, counts = progress, progress.counts
    shown = [f"{n} {status}" for status, n in counts.items() if n]
    out = [f"{p.name}: {p.total} trials: {', '.join(shown) or 'none yet'}"]
    unfinished = counts[Status.RUNNING]
    if p.driver is not None:
        out.append(f"driver: {storage.describe(p.driver)}; running for {duration(p.elapsed_s)}")
    elif unfinished or counts[PENDING]:
        out.append(f"no driver running: stopped after {duration(p.elapsed_s)} with "
                   f"{unfinished + counts[PENDING]} trials unfinished (towerspace sweep "
                   f"EXPERIMENT --resume continues them)")  # fmt: skip
    else:
        out.append(f"ended: ran {duration(p.elapsed_s)} (from its start to its last record)")
    if p.best is not None:
        b = p.best
        out.append(f"best so far: {p.metric} {b['value']:.4f} after {b['epochs_run']}/"
                   f"{b['epochs_planned']} epochs (its best epoch {b['best_epoch_value']:.4f})  "
                   f"towers={b['towers']}  seed={b['seed']}  trial {b['trial_id']} "
                   f"({b['status']})")  # fmt: skip
    if p.driver is not None:
        out.append(_eta_line(p))
    out += [f"  {f['status']:8} towers={f['towers']} seed={f['seed']} ({f['trial_id']}): "
            f"{f['error']}" for f in p.failures]  # fmt: skip
    out += [f"note: {note}" for note in p.notes]
    return out


def _eta_line(p: SweepProgress) -> str:
    if p.eta_s is None:
        return f"ETA: after the first epoch ({p.epochs_left} epochs left)"
    bound = "at most " if p.scheduler == "asha" else "about "  # ASHA stops trials early
    return (f"ETA: {bound}{duration(p.eta_s)} ({p.epochs_left} epochs left x "
            f"{p.mean_epoch_s:.1f} s, the mean of {p.epochs_timed} epochs so far, / "
            f"{max(1, p.at_once)} trials at once; trial start-up not counted)")  # fmt: skip


def tensorboard_line(sweep_dir: Path) -> str | None:
    """The command that shows a sweep's TensorBoard event files, where it has any."""
    from towerspace.files import shown

    if not any(Path(sweep_dir).glob("run_trial_*/events.out.tfevents.*")):
        return None
    return f"TensorBoard: tensorboard --logdir {shown(sweep_dir)}"


def trial_spans(records: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each trial's training span (start, end), Unix seconds, from its epochs' end times
    (`ended_at`) and durations; trials without them are left out."""
    spans = {}
    for record in records:
        history = [h for h in record.get("history", []) if h.get("ended_at") is not None]
        if history:
            first, last = history[0], history[-1]
            start = first["ended_at"] - first.get("epoch_time_s", 0.0)
            spans[record["trial_id"]] = (start, last["ended_at"])
    return spans


def most_at_once(spans: Iterable[tuple[float, float]]) -> int:
    """The most spans (start, end) that cover one moment: how many trials ran at once."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, change in events:  # at a tie, an end comes first: touching spans do not overlap
        running += change
        most = max(most, running)
    return most
