"""Results tables from trial records on disk: tidy rows, parquet, damaged records named."""

import json
import warnings

import pandas as pd
import pytest

from towerspace import files, results


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
        "error": None if status == "finished" else "boom",
    }  # fmt: skip


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
