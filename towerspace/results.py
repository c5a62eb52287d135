"""Trial records → tidy pandas tables (one row per trial, one per epoch) → parquet."""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from towerspace import files
from towerspace.status import Status
from towerspace.towers import label_order

RECORDS = "records"
RESULTS = "results.parquet"
HISTORY = "history.parquet"
# columns shown first; nested values (realized towers, config) are stored as JSON text
COLUMNS = [
    "experiment", "trial_id", "status", "seed", "towers", "order", "mid", "match", "width",
    "params", "flops", "training_flops", "final_val_acc", "best_val_acc", "final_val_top5",
    "epochs_run", "epochs_planned", "train_time_s", "images_per_s", "data_wait_fraction",
    "peak_memory_mb",
    "budget_error", "position", "realized_towers", "group_widths", "data", "error",
]  # fmt: skip


class DamagedRecord(UserWarning):
    """A trial record that could not be read; the trial is left out of the tables."""


MAX_RECORD_BYTES = 16 * 2**20  # a record file larger than this is not parsed
NUMBER = (int, float)
# a record's fields and the types they may hold (None: may be null); absent fields are null,
# except the required ones
SCHEMA: dict[str, tuple[type, ...]] = {
    "trial_id": (str,), "status": (str,), "seed": (int,), "towers": (str,),
    "experiment": (str, type(None)), "point": (dict,), "order": (str, type(None)),
    "mid": (str, type(None)), "match": (str, type(None)), "width": (*NUMBER, type(None)),
    "budget_error": (*NUMBER, type(None)), "data": (str, type(None)),
    "params": (int, type(None)), "flops": (int, type(None)),
    "training_flops": (int, type(None)), "realized": (dict, type(None)),
    "epochs_planned": (int, type(None)), "epochs_run": (int, type(None)),
    "error": (str, type(None)), "resumed_at": (list,), "config": (dict, type(None)),
    "history": (list,), "final_val_acc": (*NUMBER, type(None)),
    "best_val_acc": (*NUMBER, type(None)), "final_val_top5": (*NUMBER, type(None)),
    "train_time_s": (*NUMBER, type(None)), "images_per_s": (*NUMBER, type(None)),
    "data_wait_fraction": (*NUMBER, type(None)), "peak_memory_mb": (*NUMBER, type(None)),
    "version": (str, type(None)), "git_commit": (str, type(None)),
}  # fmt: skip
REQUIRED = ("trial_id", "status", "seed", "towers")


def _type_words(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list", type(None): "null"}  # fmt: skip
    return " or ".join(dict.fromkeys(names[t] for t in types if not (t is int and float in types)))


def check_record(record: Any) -> None:
    """Raise ValueError naming the first field of a record that is missing or mistyped."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a mapping of fields, got {type(record).__name__}")
    for key in REQUIRED:
        if key not in record:
            raise ValueError(f"field {key!r}: missing (required)")
    for key, types in SCHEMA.items():
        value = record.get(key)
        if key not in record or (isinstance(value, bool) and bool not in types):
            if key in record:
                raise ValueError(f"field {key!r}: expected {_type_words(types)}, got {value!r}")
            continue
        if not isinstance(value, types):
            shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
            raise ValueError(f"field {key!r}: expected {_type_words(types)}, got {shown}")
    if record["status"] not in set(Status):
        raise ValueError(f"field 'status': {record['status']!r} is not one of "
                         f"{', '.join(Status)}")  # fmt: skip
    for site, layer in (record.get("realized") or {}).items():
        if not isinstance(layer, dict) or not all(
            isinstance(layer.get(k), NUMBER) and not isinstance(layer.get(k), bool)
            for k in ("towers", "group_width", "position")
        ):
            raise ValueError(f"field 'realized.{site}': expected towers, group_width and "
                             f"position as numbers")  # fmt: skip
    for i, epoch in enumerate(record["history"]):
        if not isinstance(epoch, dict) or not all(
            isinstance(v, NUMBER) and not isinstance(v, bool) for v in epoch.values()
        ):
            raise ValueError(f"field 'history[{i}]': expected a mapping of numbers")


def read_record(path: Path) -> dict[str, Any]:
    """One trial record, checked against SCHEMA; ValueError or OSError when it is truncated,
    corrupt, mistyped, too large, a link or not a regular file."""
    path = Path(path)
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        kind = "a link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise ValueError(f"{kind}, not read")
    if info.st_size > MAX_RECORD_BYTES:
        raise ValueError(f"{info.st_size:,} bytes, more than {MAX_RECORD_BYTES:,}")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        text = f.read(MAX_RECORD_BYTES + 1)
    try:
        record = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    check_record(record)
    return record


def read_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every readable trial record of a sweep; the others are named in a warning."""
    records, damaged = [], []
    folder = Path(sweep_dir) / RECORDS
    for path in sorted(folder.iterdir() if folder.is_dir() else []):
        if path.suffix != ".json":
            continue
        try:
            records.append(read_record(path))
        except (OSError, ValueError) as err:
            problem = str(err) if str(err) else type(err).__name__
            if isinstance(err, json.JSONDecodeError):
                problem = "not valid JSON"
            damaged.append(f"{RECORDS}/{path.name} ({problem})")
    named = {r["trial_id"] for r in records} | {d.split("/")[1].split(".json")[0] for d in damaged}
    missing = sorted(trial_folders(sweep_dir) - named)
    if damaged:
        warnings.warn(f"skipped damaged trial records: {'; '.join(damaged)}", DamagedRecord,
                      stacklevel=2)  # fmt: skip
    if missing:
        warnings.warn(f"no record for trials: {', '.join(missing)}", DamagedRecord, stacklevel=2)
    return records


TRIAL_FOLDER = re.compile(r"^run_trial_([0-9a-f]+_\d{5})_")  # Ray's folder per trial


def trial_folders(sweep_dir: Path) -> set[str]:
    """Trial ids of the trial folders Ray made in a sweep directory for trials that started
    (Ray makes an empty one for a trial still pending when a sweep stops)."""
    if not Path(sweep_dir).is_dir():
        return set()
    found = (TRIAL_FOLDER.match(p.name) for p in Path(sweep_dir).iterdir()
             if p.is_dir() and not p.is_symlink() and any(p.iterdir()))  # fmt: skip
    return {m.group(1) for m in found if m}


def _row(record: dict[str, Any]) -> dict[str, Any]:
    realized = record.get("realized") or {}
    counts = sorted({r["towers"] for r in realized.values()})
    widths = sorted({r["group_width"] for r in realized.values()})
    row = {k: v for k, v in record.items() if k not in ("history", "realized", "config", "point")}
    row.update(
        realized_towers=json.dumps(realized, sort_keys=True),
        towers_min=min(counts, default=None),
        towers_max=max(counts, default=None),
        position=sum(r["position"] for r in realized.values()) / max(len(realized), 1),
        group_widths=",".join(map(str, widths)),
        point=json.dumps(record.get("point", {}), sort_keys=True),
        resumed_at=",".join(map(str, record.get("resumed_at", []))),
        config=json.dumps(record.get("config", {}), sort_keys=True),
    )
    return row


HISTORY_COLUMNS = ["trial_id", "towers", "seed", "epoch", "train_loss", "val_loss", "val_acc",
                   "val_top5", "lr", "epoch_time_s", "train_images_per_s", "data_wait_fraction",
                   "peak_memory_mb"]  # fmt: skip


def results_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trial with its asked and realized towers, costs, metrics and provenance;
    every column of COLUMNS is there (null where no trial has it: failed before an epoch)."""
    table = pd.DataFrame([_row(r) for r in records])
    table = table.reindex(columns=[*COLUMNS, *[c for c in table.columns if c not in COLUMNS]])
    if table.empty:
        return table
    table = table.sort_values(["towers", "seed", "trial_id"], key=_regular_first, kind="stable")
    return table.reset_index(drop=True)


def _regular_first(column: pd.Series) -> pd.Series:
    """Sort keys: tower labels from regular to depthwise (label_order), others as they are."""
    if column.name != "towers":
        return column
    rank = {label: i for i, label in enumerate(label_order(column))}
    return column.map(lambda label: rank[str(label)])


def history_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trial and epoch: the per-epoch metrics with the trial's point."""
    rows = [
        {"trial_id": r["trial_id"], "towers": r.get("towers"), "seed": r.get("seed"), **epoch}
        for r in records
        for epoch in r.get("history", [])
    ]
    table = pd.DataFrame(rows)
    extra = [c for c in table.columns if c not in HISTORY_COLUMNS]
    return table.reindex(columns=[*HISTORY_COLUMNS, *extra])


def write_tables(sweep_dir: Path, out: Path | None = None) -> tuple[Path, Path]:
    """(Re)build results.parquet and history.parquet from the sweep's trial records, in the
    sweep's folder or in out; each written whole (a temporary file renamed), never through a
    link."""
    records = read_records(sweep_dir)
    root = Path(out) if out is not None else Path(sweep_dir)
    results_path, history_path = root / RESULTS, root / HISTORY
    for path, table in ((results_path, results_table(records)),
                        (history_path, history_table(records))):  # fmt: skip
        files.write_atomic(path, lambda tmp, t=table: t.to_parquet(tmp, index=False), root=root)
    return results_path, history_path


@dataclass(frozen=True)
class Tables:
    """A sweep's tables as written, and what was wrong with the records they were built from."""

    results_path: Path
    history_path: Path
    notes: tuple[str, ...] = ()  # damaged or missing trial records, left out of the tables


def write_tables_noting(sweep_dir: Path, out: Path | None = None) -> Tables:
    """write_tables, with its DamagedRecord warnings kept as notes for the caller to show."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DamagedRecord)
        results_path, history_path = write_tables(sweep_dir, out=out)
    notes = tuple(str(w.message) for w in caught if issubclass(w.category, DamagedRecord))
    return Tables(results_path, history_path, notes)


def _read_parquet(path: Path, rebuild) -> pd.DataFrame:
    """A parquet table; a zero-byte, truncated or damaged one is rebuilt from the records."""
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        folder = path.parent
        if not (folder / RECORDS).is_dir():
            raise
        warnings.warn(f"{path}: unreadable ({type(err).__name__}); rebuilt from {RECORDS}/",
                      DamagedRecord, stacklevel=3)  # fmt: skip
        return rebuild(read_records(folder))


def load(path: str | Path) -> pd.DataFrame:
    """The results table of a sweep directory (rebuilt from its records) or a parquet file."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _read_parquet(path, results_table)
    if not (path / RECORDS).is_dir():
        raise FileNotFoundError(f"{path}: no sweep here (no {RECORDS}/ folder)")
    return results_table(read_records(path))


def load_history(path: str | Path) -> pd.DataFrame:
    """The per-epoch history table of a sweep directory or its history.parquet."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _read_parquet(path, history_table)
    return history_table(read_records(path))
