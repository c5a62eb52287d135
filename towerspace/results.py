"""Trial records → tidy pandas tables (one row per trial, one per epoch) → parquet."""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from towerspace import files
from towerspace.objectstore import is_uri, staged
from towerspace.status import Status
from towerspace.towers import label_order

RECORDS = "records"
ORPHANED = "orphaned"  # records/orphaned/: trials a kill hid from Ray's saved state
RESULTS = "results.parquet"
HISTORY = "history.parquet"


@dataclass(frozen=True)
class Column:
    """One column of a table: its kind (a pandas dtype, see DTYPES) and what it holds."""

    kind: str  # a key of DTYPES
    meaning: str


# kind → (the pandas dtype, as the docs name it); absent values: NaN in str and float64
# columns, <NA> in Int64 ones, [] in lists; an int64 column is never absent
DTYPES = {
    "str": "`str`",
    "json": "`str`: JSON text",
    "int64": "`int64`",
    "Int64": "`Int64` (nullable)",
    "float64": "`float64`",
    "boolean": "`boolean` (nullable)",
    "towers": "ordered `category`",
    "ints": "`object`: a list of int",
}
TOWERS = "the sweep's tower labels, ordered from regular to depthwise"
RESULTS_SCHEMA: dict[str, Column] = {
    "experiment": Column("str", "the experiment's name"),
    "trial_id": Column("str", "the trial's id (its record: `records/<trial_id>.json`)"),
    "status": Column("str", "finished, stopped, diverged or error (running: not closed)"),
    "seed": Column("int64", "the trial's seed"),
    "towers": Column("towers", f"the point as asked (`4`, `gw8`, `t=0.50`, ...); {TOWERS}"),
    "order": Column("str", "`spatial_first` or `pointwise_first`"),
    "mid": Column("str", "the op between the k×k and the 1×1 convolution"),
    "match": Column("str", "budget matching: `params`, `flops` or `none`"),
    "residual": Column("boolean", "whether the model keeps its shortcuts (`model.residual`)"),
    "width": Column("float64", "width multiplier (solved, when budgets are matched)"),
    "params": Column("Int64", "trainable parameters"),
    "flops": Column("Int64", "forward FLOPs per image"),
    "training_flops": Column("Int64", "training FLOPs per image (3× forward)"),
    "latency_ms": Column(
        "float64",
        "measured step time of the batch, the sum of its layers' "
        "(null: not measured; see `latency`)",
    ),
    "final_val_acc": Column("float64", "top-1 validation accuracy after the last epoch run"),
    "best_val_acc": Column("float64", "the best finite top-1 validation accuracy of an epoch"),
    "final_val_top5": Column("float64", "top-5 validation accuracy after the last epoch run"),
    "epochs_run": Column("Int64", "epochs completed"),
    "epochs_planned": Column("Int64", "epochs asked for"),
    "train_time_s": Column("float64", "seconds of its epochs (training and validation)"),
    "images_per_s": Column("float64", "training images per second, mean over epochs"),
    "data_wait_fraction": Column("float64", "share of training time spent waiting for batches"),
    "peak_memory_mb": Column("float64", "peak memory of any epoch, MiB (CUDA, or RSS on a CPU)"),
    "budget_error": Column("float64", "matched cost / target - 1 (null: not matched)"),
    "position": Column("float64", "mean over layers of the position (0 regular … 1 depthwise)"),
    "towers_min": Column("Int64", "fewest towers of any layer, as built"),
    "towers_max": Column("Int64", "most towers of any layer, as built"),
    "realized_towers": Column("json", "per layer: channels, towers, group_width, position, regime"),
    "group_widths": Column("ints", "the distinct channels per tower of its layers, ascending"),
    "data": Column("str", "the data set"),
    "error": Column("str", "why the trial failed, in one line (null when it did not)"),
    "resumed_at": Column("ints", "epochs it continued after, from a checkpoint; [] when none"),
    "point": Column("json", "the search space's point: field → value"),
    "config": Column("json", "the trial's whole resolved experiment"),
    "version": Column("str", "towerspace's version"),
    "git_commit": Column("str", "the source tree's commit (`+dirty`: with uncommitted changes)"),
}
HISTORY_SCHEMA: dict[str, Column] = {
    "trial_id": Column("str", "the trial's id"),
    "towers": Column("towers", f"the trial's point as asked; {TOWERS}"),
    "seed": Column("int64", "the trial's seed"),
    "epoch": Column("Int64", "the epoch, from 1"),
    "train_loss": Column("float64", "mean training loss over the epoch"),
    "val_loss": Column("float64", "validation loss after the epoch"),
    "val_acc": Column("float64", "top-1 validation accuracy after the epoch"),
    "val_top5": Column("float64", "top-5 validation accuracy after the epoch"),
    "lr": Column("float64", "learning rate at the epoch's end"),
    "epoch_time_s": Column("float64", "seconds of the epoch (training and validation)"),
    "train_images_per_s": Column("float64", "training images per second"),
    "data_wait_fraction": Column("float64", "share of training time spent waiting for batches"),
    "peak_memory_mb": Column("float64", "peak memory in the epoch, MiB"),
    "ended_at": Column("float64", "wall-clock time at the epoch's end, Unix seconds"),
}
JSON_COLUMNS = tuple(name for name, c in RESULTS_SCHEMA.items() if c.kind == "json")


class DamagedRecord(UserWarning):
    """A trial record that could not be read; the trial is left out of the tables."""


MAX_RECORD_BYTES = 16 * 2**20  # a record file larger than this is not parsed
NUMBER = (int, float)
# a record's fields and the types they may hold (None: may be null); absent fields are null,
# except the required ones
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "trial_id": (str,), "status": (str,), "seed": (int,), "towers": (str,),
    "experiment": (str, type(None)), "point": (dict,), "order": (str, type(None)),
    "mid": (str, type(None)), "match": (str, type(None)), "residual": (bool, type(None)),
    "width": (*NUMBER, type(None)),
    "budget_error": (*NUMBER, type(None)), "data": (str, type(None)),
    "params": (int, type(None)), "flops": (int, type(None)),
    "training_flops": (int, type(None)), "latency_ms": (*NUMBER, type(None)),
    "realized": (dict, type(None)),
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
    for key, types in RECORD_FIELDS.items():
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
    """One trial record, checked against RECORD_FIELDS; ValueError or OSError when it is truncated,
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
    named |= {p.stem for p in (folder / ORPHANED).glob("*.json")}  # set aside on a resume
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


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _row(record: dict[str, Any]) -> dict[str, Any]:
    realized = record.get("realized")
    layers = list((realized or {}).values())
    counts = [layer["towers"] for layer in layers]
    row = {k: v for k, v in record.items() if k in RESULTS_SCHEMA}
    row.update(
        realized_towers=_json(realized),
        towers_min=min(counts, default=None),
        towers_max=max(counts, default=None),
        position=sum(r["position"] for r in layers) / len(layers) if layers else None,
        group_widths=sorted({layer["group_width"] for layer in layers}),
        point=_json(record.get("point")),
        config=_json(record.get("config")),
        residual=record.get("residual", True),  # absent: a record from before the option
    )
    return row


def towers_dtype(labels: Iterable[object]) -> pd.CategoricalDtype:
    """The ordered categorical of tower labels: the distinct labels given, from regular to
    depthwise (towers.label_order, the one order of tables and plots)."""
    return pd.CategoricalDtype(pd.Index(label_order(labels), dtype="str"), ordered=True)


def ordered_towers(column: pd.Series) -> pd.Series:
    """A column of tower labels as towers_dtype of its labels (a categorical keeps its
    categories, unused ones included, in that order)."""
    labels = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else column
    return column.astype("str").astype(towers_dtype(pd.Series(labels).dropna()))


def _int_list(value: Any) -> list[int]:
    if isinstance(value, str):  # an older towerspace wrote lists comma-joined
        return [int(part) for part in value.split(",") if part]
    return [] if value is None or pd.api.types.is_scalar(value) else [int(v) for v in value]


def conform(
    table: pd.DataFrame, schema: Mapping[str, Column], labels: Iterable[object] | None = None
) -> pd.DataFrame:
    """The table with exactly the schema's columns, in its order and with its dtypes (a column
    no row has is all null); tower labels are ordered over `labels` (default: the column's)."""
    table = table.reindex(columns=list(schema))
    columns = {}
    for name, column in schema.items():
        values = table[name]
        if column.kind == "towers":
            if labels is None:
                values = ordered_towers(values)
            else:
                values = values.astype("str").astype(towers_dtype(labels))
        elif column.kind == "ints":
            values = pd.Series([_int_list(v) for v in values], index=table.index, dtype=object)
        else:
            values = values.astype("str" if column.kind == "json" else column.kind)
        columns[name] = values
    return pd.DataFrame(columns, index=table.index)


def _arrow_schema(table: pd.DataFrame, schema: Mapping[str, Column]) -> pa.Schema:
    """The parquet schema of a conformed table: lists of int stay lists of int when every list
    is empty (pyarrow would infer a list of nulls)."""
    arrow = pa.Schema.from_pandas(table, preserve_index=False)
    for name, column in schema.items():
        if column.kind == "ints":
            arrow = arrow.set(arrow.get_field_index(name), pa.field(name, pa.list_(pa.int64())))
    return arrow


def results_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trial (RESULTS_SCHEMA: its columns and dtypes, whatever trials failed),
    from regular to depthwise, then by seed."""
    table = conform(pd.DataFrame([_row(r) for r in records]), RESULTS_SCHEMA)
    table = table.sort_values(["towers", "seed", "trial_id"], kind="stable")
    return table.reset_index(drop=True)


def history_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trial and epoch (HISTORY_SCHEMA): the per-epoch metrics with the trial's
    point; its tower labels are the categories of the results table."""
    rows = [
        {"trial_id": r["trial_id"], "towers": r.get("towers"), "seed": r.get("seed"), **epoch}
        for r in records
        for epoch in r.get("history", [])
    ]
    labels = [r["towers"] for r in records]
    return conform(pd.DataFrame(rows), HISTORY_SCHEMA, labels=labels)


def schema_markdown(schema: Mapping[str, Column]) -> str:
    """A schema as the docs' table (docs/results.md): column, dtype, meaning."""
    lines = ["| column | dtype | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | {DTYPES[c.kind]} | {c.meaning} |" for name, c in schema.items()]
    return "\n".join(lines)


def _write_parquet(table: pd.DataFrame, schema: Mapping[str, Column], path: Path) -> None:
    table.to_parquet(path, index=False, schema=_arrow_schema(table, schema))


def write_tables(sweep_dir: Path, out: Path | None = None) -> tuple[Path, Path]:
    """(Re)build results.parquet and history.parquet from the sweep's trial records, in the
    sweep's folder or in out; each written whole (a temporary file renamed), never through a
    link."""
    records = read_records(sweep_dir)
    root = Path(out) if out is not None else Path(sweep_dir)
    results_path, history_path = root / RESULTS, root / HISTORY
    tables = {results_path: (results_table(records), RESULTS_SCHEMA),
              history_path: (history_table(records), HISTORY_SCHEMA)}  # fmt: skip
    for path, (table, schema) in tables.items():
        files.write_atomic(path, partial(_write_parquet, table, schema), root=root)
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


def _read_parquet(path: Path, rebuild, schema: Mapping[str, Column]) -> pd.DataFrame:
    """A parquet table in its schema; a zero-byte, truncated or damaged one is rebuilt from
    the records."""
    try:
        return conform(pd.read_parquet(path), schema)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        folder = path.parent
        if not (folder / RECORDS).is_dir():
            raise
        warnings.warn(f"{path}: unreadable ({type(err).__name__}); rebuilt from {RECORDS}/",
                      DamagedRecord, stacklevel=3)  # fmt: skip
        return rebuild(read_records(folder))


def load(path: str | Path) -> pd.DataFrame:
    """The results table of a sweep directory (rebuilt from its records), of a sweep on object
    storage (s3://bucket/runs/NAME, read through pyarrow.fs), or of a parquet file."""
    if is_uri(path):
        with staged(str(path)) as folder:
            return load(folder)
    path = Path(path)
    if path.suffix == ".parquet":
        return _read_parquet(path, results_table, RESULTS_SCHEMA)
    if not (path / RECORDS).is_dir():
        raise FileNotFoundError(f"{path}: no sweep here (no {RECORDS}/ folder)")
    return results_table(read_records(path))


def load_history(path: str | Path) -> pd.DataFrame:
    """The per-epoch history table of a sweep directory (or URI) or its history.parquet."""
    if is_uri(path):
        with staged(str(path)) as folder:
            return load_history(folder)
    path = Path(path)
    if path.suffix == ".parquet":
        return _read_parquet(path, history_table, HISTORY_SCHEMA)
    return history_table(read_records(path))
