"""Results tables from trial records on disk: tidy rows, one schema whatever failed, ordered
tower labels and nulls that survive parquet, damaged records named."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from towerspace import files, results

SCHEMA_PAGE = Path(__file__).resolve().parent.parent / "docs" / "results.md"  # the docs' tables


def _record(trial_id, towers, seed, acc, status="finished", position=0.0):
    realized = {"entry.block2.convs.0": {"channels": 16, "towers": 1 if towers == "1" else 16,
                "group_width": 16 if towers == "1" else 1, "position": position,
                "regime": "regular"}}  # fmt: skip
    history = [{"epoch": e, "val_acc": acc - 0.1 * (2 - e), "train_loss": 1.0 / e,
                "epoch_time_s": 1.5, "train_images_per_s": 100.0} for e in (1, 2)]  # fmt: skip
    return {
        "experiment": "t", "trial_id": trial_id, "status": status, "seed": seed, "towers": towers,
        "order": "spatial_first", "mid": "none", "match": "params", "width": 0.25,
        "params": 1000, "flops": 5000, "training_flops": 15000, "final_val_acc": acc,
        "best_val_acc": acc, "epochs_run": 2, "epochs_planned": 2, "realized": realized,
        "point": {"model.towers": towers}, "config": {"name": "t"}, "history": history,
        "error": None if status == "finished" else "boom", "resumed_at": [],
    }  # fmt: skip


def _failed_at_setup(trial_id, towers, seed):
    """A trial that failed before it had a model (as trial.failed_record writes it)."""
    return {"experiment": "t", "trial_id": trial_id, "status": "error", "seed": seed,
            "towers": towers, "point": {"model.towers": towers}, "order": "spatial_first",
            "mid": "none", "match": "params", "width": 0.25, "data": "digits",
            "epochs_planned": 2, "epochs_run": 0, "error": "DataError: no such folder",
            "resumed_at": [], "config": {"name": "t"}, "history": []}  # fmt: skip


def _write(folder, records):
    for record in records:
        files.write_json(folder / "records" / f"{record['trial_id']}.json", record)
    return results.write_tables(folder)


@pytest.fixture
def sweep_dir(tmp_path):
    rows = [("a", "1", 0, 0.8), ("b", "1", 1, 0.9), ("c", "depthwise", 0, 0.7),
            ("d", "depthwise", 1, 0.75)]  # fmt: skip
    for trial_id, towers, seed, acc in rows:
        pos = 0.0 if towers == "1" else 1.0
        files.write_json(tmp_path / "records" / f"{trial_id}.json",
                         _record(trial_id, towers, seed, acc, position=pos))  # fmt: skip
    files.write_json(tmp_path / "records" / "e.json", _record("e", "1", 2, 0.1, status="error"))
    return tmp_path


def test_one_row_per_trial_and_parquet_round_trip(sweep_dir):
    table = results.load(sweep_dir)
    assert list(table["trial_id"]) == ["a", "b", "e", "c", "d"]
    assert table.loc[table.trial_id == "e", "status"].item() == "error"
    assert json.loads(table.loc[0, "realized_towers"])["entry.block2.convs.0"]["towers"] == 1
    results_path, history_path = results.write_tables(sweep_dir)
    pd.testing.assert_frame_equal(pd.read_parquet(results_path), table)
    history = results.load_history(history_path)
    assert len(history) == 10 and set(history["epoch"]) == {1, 2}


def test_damaged_records_are_skipped_and_named(sweep_dir):
    (sweep_dir / "records" / "c.json").write_text('{"trial_id": "c", "status": "fini')
    (sweep_dir / "records" / "z.json").write_text("[1, 2]")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = results.load(sweep_dir)
    assert sorted(table["trial_id"]) == ["a", "b", "d", "e"]
    (message,) = [str(w.message) for w in caught if w.category is results.DamagedRecord]
    assert message == (
        "skipped damaged trial records: records/c.json (not valid JSON); "
        "records/z.json (expected a mapping of fields, got list)"
    )


def test_load_refuses_a_folder_without_a_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sweep here"):
        results.load(tmp_path)


LABELS = ["depthwise", "16", "2", "t=0.50", "1", "gw8", "32", "4 [entry=2]", "4", "8", "gw64"]
ORDER = ["1", "2", "4", "4 [entry=2]", "8", "16", "32", "depthwise", "gw64", "gw8", "t=0.50"]


def test_towers_is_an_ordered_categorical_that_survives_parquet(tmp_path):
    records = [_record(f"r{i}", label, 0, 0.5) for i, label in enumerate(LABELS)]
    results_path, history_path = _write(tmp_path, records)
    for table in (pd.read_parquet(results_path), results.load(results_path),
                  results.load(tmp_path), pd.read_parquet(history_path),
                  results.load_history(history_path)):  # fmt: skip
        dtype = table["towers"].dtype
        assert isinstance(dtype, pd.CategoricalDtype) and dtype.ordered
        assert list(dtype.categories) == ORDER  # the sweep's labels, regular to depthwise
    table = results.load(results_path)
    assert list(table["towers"]) == ORDER  # rows sorted by it, not as text (1, 16, 2, ...)
    assert list(table.sort_values("towers", ascending=False)["towers"])[:2] == ["t=0.50", "gw8"]
    assert table["towers"].min() == "1" and (table["towers"] < "depthwise").sum() == 7
    # categories are the sweep's labels even where a table lacks rows of one
    assert list(pd.read_parquet(results_path).query("seed < 0")["towers"].dtype.categories) == ORDER


def test_dtypes_do_not_depend_on_which_trials_failed(tmp_path):
    finished = [_record("a", "1", 0, 0.8), _record("b", "depthwise", 0, 0.7)]
    sweeps = {
        "none failed": finished,
        "one failed in an epoch": [*finished, _record("c", "1", 1, 0.1, status="error")],
        "one failed at set-up": [*finished, _failed_at_setup("c", "4", 1)],
        "all failed at set-up": [_failed_at_setup("a", "1", 0), _failed_at_setup("b", "4", 0)],
        "no trials": [],
    }
    for name, records in sweeps.items():
        results_path, history_path = _write(tmp_path / name.replace(" ", "_"), records)
        for table in (results.results_table(records), pd.read_parquet(results_path)):
            assert _kinds(table) == _kinds_of(results.RESULTS_SCHEMA), name
        for history in (results.history_table(records), pd.read_parquet(history_path)):
            assert _kinds(history) == _kinds_of(results.HISTORY_SCHEMA), name


def _kinds(table):
    """Each column's dtype, named as the schema's kinds name them."""
    names = {"category": "towers", "object": "ints"}
    return {column: names.get(str(dtype), str(dtype)) for column, dtype in table.dtypes.items()}


def _kinds_of(schema):
    return {name: "str" if c.kind == "json" else c.kind for name, c in schema.items()}


def test_nulls_where_absent_and_lists_that_survive_parquet(tmp_path):
    resumed = {**_record("b", "1", 1, 0.9), "resumed_at": [1, 3]}
    records = [_record("a", "1", 0, 0.8), resumed, _failed_at_setup("c", "4", 0)]
    results_path, _ = _write(tmp_path, records)
    for table in (results.load(results_path), results.load(tmp_path)):
        table = table.set_index("trial_id")
        assert pd.isna(table.loc["a", "error"]) and table.loc["c", "error"].startswith("DataE")
        assert table["resumed_at"].tolist() == [[], [1, 3], []]  # real lists, [] when none
        assert table.loc["a", "group_widths"] == [16] and table.loc["c", "group_widths"] == []
        failed = table.loc["c"]  # failed before it had a model: nothing built, nothing measured
        assert failed[["params", "flops", "towers_min", "final_val_acc", "position"]].isna().all()
        assert pd.isna(failed["realized_towers"]) and failed["epochs_run"] == 0
        for column in results.JSON_COLUMNS:  # JSON text where present
            assert isinstance(json.loads(table.loc["a", column]), dict)
        assert json.loads(table.loc["c", "point"]) == {"model.towers": "4"}
    raw = pd.read_parquet(results_path).set_index("trial_id")  # pyarrow gives lists as arrays
    assert [list(v) for v in raw["resumed_at"]] == [[], [1, 3], []]
    assert isinstance(raw.loc["b", "resumed_at"], np.ndarray)
    assert raw["error"].dtype == "str" and raw["error"].isna().tolist() == [True, True, False]


def _docs_table(name):
    text = SCHEMA_PAGE.read_text()
    found = re.search(rf"<!-- {name} schema -->\n(.*?)\n<!-- end {name} schema -->", text, re.S)
    assert found, f"docs/results.md: no '<!-- {name} schema -->' block"
    return found.group(1)


@pytest.mark.parametrize("name", ["results", "history"])
def test_docs_list_exactly_the_schema(name):
    schema = results.RESULTS_SCHEMA if name == "results" else results.HISTORY_SCHEMA
    table = _docs_table(name)
    listed = re.findall(r"^\| `([a-z0-9_]+)` \|", table, re.M)
    assert listed == list(schema)  # every column, in the table's order, and no other
    assert table == results.schema_markdown(schema), (
        f"docs/results.md's {name} columns differ from the schema: run make docs "
        f"(it writes results.schema_markdown(results.{name.upper()}_SCHEMA) there)"
    )


@pytest.mark.slow
def test_a_real_records_fields_all_have_a_column(tiny_sweep):
    records = results.read_records(tiny_sweep.sweep_dir)
    assert records and all(r["status"] == "finished" for r in records)
    derived = {"history", "realized"}  # realized_towers, towers_min/max, position, group_widths
    for record in records:
        assert set(record) - derived <= set(results.RESULTS_SCHEMA), "a field with no column"
        for epoch in record["history"]:
            assert set(epoch) <= set(results.HISTORY_SCHEMA), "a metric with no column"
    table = results.load(tiny_sweep.results_path)
    assert table[["params", "final_val_acc", "version", "position"]].notna().all().all()
