"""Sweeps end to end on a real local Ray: grid, Optuna, ASHA, and every experiment's smoke mode."""

import json
import os
from pathlib import Path

import pytest

from towerspace import config, results
from towerspace.cli import main
from towerspace.impls import IMPLS
from towerspace.models import build_model
from towerspace.sweep import run_sweep

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def _digits(*sets):
    base = ("train.epochs=1", "model.width=0.125", "model.middle_blocks=1", "seeds=[0]",
            "model.match=params")  # fmt: skip
    return config.load_experiment(REPO / "experiments/digits_continuum.yaml", [*base, *sets])


def test_grid_sweep_writes_one_finished_row_per_trial(tiny_sweep):
    outcome = tiny_sweep
    assert outcome.statuses == {"finished": 6} and outcome.failed == 0
    table = results.load(outcome.results_path)
    assert len(table) == 6 and table["trial_id"].is_unique
    assert sorted(table["towers"].unique()) == ["1", "4", "depthwise"]
    assert sorted(table["seed"]) == [0, 0, 0, 1, 1, 1]
    for _, row in table.iterrows():
        realized = json.loads(row["realized_towers"])
        assert len(realized) == 2 * 3 + 1 * 3 + 2 + 2  # every separable conv of the model
        counts = {r["towers"] for r in realized.values()}
        if row["towers"] == "depthwise":
            assert all(r["group_width"] == 1 for r in realized.values())
        else:
            assert counts == {int(row["towers"])}  # matched widths realize the asked count
        assert abs(row["budget_error"]) <= 0.02
        assert row["epochs_run"] == 1 and 0.0 <= row["final_val_acc"] <= 1.0
        assert row["params"] > 0 and row["training_flops"] == 3 * row["flops"]
        assert row["version"] and json.loads(row["config"])["name"] == "digits_continuum"
    history = results.load_history(outcome.history_path)
    assert len(history) == 6 and set(history["epoch"]) == {1}
    # the same seed and point gives the same parameters: the budget solve is deterministic
    assert table.groupby("towers")["params"].nunique().max() == 1
    for _, row in table.drop_duplicates("towers").iterrows():  # against the built model itself
        cfg = config.from_dict(json.loads(row["config"]))
        model = build_model(cfg.model, in_chans=1, num_classes=10, image_size=16)
        assert row["params"] == sum(p.numel() for p in model.parameters())


def test_asha_closes_every_trial(tmp_path):
    asha = "scheduler={name: asha, grace_period: 1, reduction_factor: 2}"
    grid = "space.params={model.towers: {grid: [1, 2, 4, depthwise]}}"
    cfg = _digits(grid, asha, "train.epochs=3", "train.max_steps=2")
    outcome = run_sweep(cfg, storage=tmp_path)
    table = results.load(outcome.results_path)
    assert len(table) == 4 and set(table["status"]) <= {"finished", "stopped"}
    assert "finished" in set(table["status"])
    stopped = table[table["status"] == "stopped"]
    assert (stopped["epochs_run"] < 3).all() and (table["epochs_run"] >= 1).all()


def test_an_existing_sweep_is_not_overwritten(tmp_path, capsys):
    exp = str(REPO / "experiments/digits_continuum.yaml")
    (tmp_path / "digits_continuum" / "records").mkdir(parents=True)
    (tmp_path / "digits_continuum" / "records" / "old.json").write_text("{}")
    assert main(["sweep", exp, "--smoke", "--storage", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"towerspace: error: {tmp_path}/digits_continuum: a sweep named 'digits_continuum' is "
        f"already there; pass --resume to continue it or --restart to replace it (or --storage "
        f"to write elsewhere)\n"
    )
    assert (tmp_path / "digits_continuum" / "records" / "old.json").read_text() == "{}"


@pytest.mark.parametrize(
    "path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_experiment_runs_in_smoke_mode(path, tmp_path, capsys):
    assert main(["sweep", str(path), "--smoke", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = results.load(tmp_path / path.stem)
    axes = [d for d in config.load_experiment(path).space.params.values() if d.kind == "grid"]
    expected = 2 ** len(axes) if axes else 2  # the ends of each grid axis, or 2 samples; 1 seed
    assert len(table) == expected and set(table["status"]) == {"finished"}
    assert f"results: {tmp_path / path.stem / 'results.parquet'}" in out
    assert f"  {tmp_path / path.stem / 'plots' / 'continuum.png'}" in out  # the sweep ends in plots


def test_impl_auto_trials_share_one_file_of_kernel_choices(tmp_path):
    cfg = _digits("model.impl=auto", "model.match=none", "train.max_steps=2",
                  "space.params={model.towers: {grid: [4, depthwise]}}")  # fmt: skip
    outcome = run_sweep(cfg, storage=tmp_path)
    assert outcome.statuses == {"finished": 2}
    saved = json.loads((outcome.sweep_dir / "impl_choices.json").read_text())
    assert saved["version"] == 2 and set(saved["choices"].values()) <= set(IMPLS)
    table = results.load(outcome.results_path)
    realized = {f"t{layer['towers']}" for r in table["realized_towers"]
                for layer in json.loads(r).values()}  # fmt: skip
    chosen = {key.split("|")[-3] for key in saved["choices"]}
    assert chosen == realized  # every layer shape of both trials, timed once, in one file
    assert {key.split("|")[3] for key in saved["choices"]} == {"train", "eval"}


@pytest.mark.parametrize(
    ("space", "labels"), [("group_width", ["gw1", "gw64"]), ("layerwise_random", None)]
)
def test_the_spaces_no_shipped_experiment_uses_run_too(space, labels, tmp_path, capsys):
    exp = str(REPO / "experiments/digits_continuum.yaml")
    argv = ["sweep", exp, "--smoke", "--set", f"space={space}", "--storage", str(tmp_path)]
    assert main(argv) == 0
    table = results.load(tmp_path / "digits_continuum")
    assert len(table) == 2 and set(table["status"]) == {"finished"}
    if labels:  # the ends of the grid
        assert sorted(table["towers"]) == labels
    else:  # two sampled models, each layer at its own position
        assert all(t.startswith("random/") for t in table["towers"])
        realized = [json.loads(r) for r in table["realized_towers"]]
        assert all(len({s["towers"] for s in r.values()}) > 1 for r in realized)
    assert (tmp_path / "digits_continuum" / "plots" / "edf.png").is_file()


def test_trial_spans_say_how_many_trials_trained_at_once(tiny_sweep):
    from towerspace.progress import most_at_once, trial_spans

    spans = trial_spans(results.read_records(tiny_sweep.sweep_dir))
    table = results.load(tiny_sweep.results_path)
    assert sorted(spans) == sorted(table["trial_id"])
    assert all(start < end for start, end in spans.values())
    history = results.load_history(tiny_sweep.history_path)
    assert history["ended_at"].notna().all() and history["ended_at"].dtype == "float64"
    assert 1 <= most_at_once(spans.values()) <= os.cpu_count()  # a CPU per trial


def test_most_at_once_counts_overlapping_spans_and_not_touching_ones():
    from towerspace.progress import most_at_once

    assert most_at_once([(0, 5), (1, 6), (2, 3), (5, 7)]) == 3
    assert most_at_once([(0, 1), (1, 2), (2, 3)]) == 1 and most_at_once([]) == 0
