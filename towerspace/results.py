"""Trial records → tidy pandas tables (one row per trial, one per epoch) → parquet."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

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


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


class DamagedRecord(UserWarning):
    """A trial record that could not be read; the trial is left out of the tables."""


def read_record(path: Path) -> dict[str, Any]:
    """One trial record; ValueError or OSError when it is truncated, corrupt or unreadable."""
    record = json.loads(Path(path).read_text())
    if not isinstance(record, dict) or "trial_id" not in record:
        raise ValueError("not a trial record")
    return record


def read_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every readable trial record of a sweep; unreadable ones are named in a warning."""
    records, damaged = [], []
    for path in sorted((Path(sweep_dir) / RECORDS).glob("*.json")):
        try:
            records.append(read_record(path))
        except (OSError, ValueError) as err:
            damaged.append(f"{path.name} ({type(err).__name__})")
    missing = sorted(trial_folders(sweep_dir) - {r["trial_id"] for r in records} -
                     {d.split(".json")[0] for d in damaged})  # fmt: skip
    if damaged:
        warnings.warn(f"skipped damaged trial records: {', '.join(damaged)}", DamagedRecord,
                      stacklevel=2)  # fmt: skip
    if missing:
        warnings.warn(f"no record for trials: {', '.join(missing)}", DamagedRecord, stacklevel=2)
    return records


TRIAL_FOLDER = re.compile(r"^run_trial_([0-9a-f]+_\d{5})_")  # Ray's folder per trial


def trial_folders(sweep_dir: Path) -> set[str]:
    """Trial ids of the trial folders Ray made in a sweep directory."""
    found = (TRIAL_FOLDER.match(p.name) for p in Path(sweep_dir).iterdir() if p.is_dir())
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


def results_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trial with its asked and realized towers, costs, metrics and provenance."""
    table = pd.DataFrame([_row(r) for r in records])
    if table.empty:
        return pd.DataFrame(columns=COLUMNS)
    first = [c for c in COLUMNS if c in table.columns]
    table = table[first + [c for c in table.columns if c not in first]]
    return table.sort_values(["towers", "seed", "trial_id"], kind="stable").reset_index(drop=True)


def history_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trial and epoch: the per-epoch metrics with the trial's point."""
    rows = [
        {"trial_id": r["trial_id"], "towers": r.get("towers"), "seed": r.get("seed"), **epoch}
        for r in records
        for epoch in r.get("history", [])
    ]
    return pd.DataFrame(rows)


def write_tables(sweep_dir: Path) -> tuple[Path, Path]:
    """(Re)build results.parquet and history.parquet from the sweep's trial records."""
    records = read_records(sweep_dir)
    results_path, history_path = Path(sweep_dir) / RESULTS, Path(sweep_dir) / HISTORY
    results_table(records).to_parquet(results_path, index=False)
    history_table(records).to_parquet(history_path, index=False)
    return results_path, history_path


def load(path: str | Path) -> pd.DataFrame:
    """The results table of a sweep directory (rebuilt from its records) or a parquet file."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if not (path / RECORDS).is_dir():
        raise FileNotFoundError(f"{path}: no sweep here (no {RECORDS}/ folder)")
    return results_table(read_records(path))


def load_history(path: str | Path) -> pd.DataFrame:
    """The per-epoch history table of a sweep directory or its history.parquet."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return history_table(read_records(path))
