"""Faults inside a real sweep: a raising trial is retried from its checkpoint or recorded as an
error, a diverging one stops at once; the other trials finish either way."""

from pathlib import Path

import pandas as pd
import pytest

from towerspace import config, results
from towerspace.cli import main
from towerspace.sweep import run_sweep

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = str(REPO / "experiments/digits_continuum.yaml")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]
TINY = ("train.epochs=3", "train.max_steps=2", "train.batch_size=32", "model.width=0.125",
        "model.middle_blocks=1", "seeds=[0]",
        "space.params={model.towers: {grid: [1, depthwise]}}")  # fmt: skip


def _sweep(tmp_path, *sets):
    cfg = config.load_experiment(EXPERIMENT, [*TINY, *sets])
    outcome = run_sweep(cfg, storage=tmp_path)
    return outcome, results.load(outcome.results_path).set_index("towers")


def test_a_raising_trial_is_retried_from_its_last_checkpoint(tmp_path):
    outcome, table = _sweep(tmp_path, "retries=1", "faults={kind: raise, epoch: 2, times: 1, "
                                                   "point: {model.towers: 1}}")  # fmt: skip
    assert outcome.statuses == {"finished": 2}
    hit = table.loc["1"]
    assert hit["resumed_at"] == [1]  # continued after epoch 1, not from scratch
    assert hit["epochs_run"] == 3 and pd.isna(hit["error"])
    assert table.loc["depthwise", "resumed_at"] == []


def test_a_trial_out_of_retries_is_an_error_and_the_sweep_goes_on(tmp_path, capsys):
    sets = ["retries=1", "faults={kind: raise, epoch: 2, times: 2, point: {model.towers: 1}}"]
    argv = ["sweep", EXPERIMENT, "--storage", str(tmp_path)]
    assert main([*argv, *[f"--set={s}" for s in (*TINY, *sets)]]) == 1  # failures: exit 1
    out, err = capsys.readouterr()
    assert "digits_continuum: 2 trials (1 error, 1 finished)" in out
    table = results.load(tmp_path / "digits_continuum").set_index("towers")
    assert table.loc["1", "status"] == "error"
    assert table.loc["1", "error"].endswith("RuntimeError: injected fault at epoch 2 (attempt 2)")
    assert table.loc["depthwise", "status"] == "finished"
    trial = table.loc["1", "trial_id"]
    assert f"left out of summaries and plots: {trial} (error)" in err


def test_a_diverging_trial_stops_at_once_and_is_left_out(tmp_path):
    outcome, table = _sweep(tmp_path, "faults={kind: diverge, epoch: 2, point: {model.towers: 1}}")
    assert outcome.statuses == {"diverged": 1, "finished": 1} and outcome.failed == 1
    bad = table.loc["1"]
    assert bad["status"] == "diverged" and bad["epochs_run"] == 1
    assert bad["error"] == "loss is nan at epoch 2, step 1"
    from towerspace import analysis

    summary = analysis.summarize(results.load(outcome.results_path))
    assert list(summary["towers"]) == ["depthwise"] and summary["failed"].sum() == 0
    assert summary.attrs["excluded"] == [f"{bad['trial_id']} (diverged)"]


def test_an_out_of_memory_trial_is_an_error_and_its_neighbours_finish(tmp_path):
    # the allocator's own error (CUDA's OutOfMemoryError on a GPU: tests/test_gpu.py)
    outcome, table = _sweep(tmp_path, "faults={kind: oom, epoch: 2, point: {model.towers: 1}}")
    assert outcome.statuses == {"error": 1, "finished": 1}
    assert table.loc["1", "epochs_run"] == 1
    assert "can't allocate memory" in table.loc["1", "error"]
    assert table.loc["depthwise", "epochs_run"] == 3


def test_the_same_experiment_twice_gives_identical_metrics(tmp_path):
    sets = ("train.epochs=2", "train.max_steps=3", "space.params={model.towers: {grid: [1, 4]}}")
    runs = []
    for name in ("a", "b"):
        outcome, _ = _sweep(tmp_path / name, *sets)
        history = results.load_history(outcome.history_path).sort_values(["towers", "epoch"])
        runs.append(history[["towers", "epoch", "train_loss", "val_loss", "val_acc"]])
    assert len(runs[0]) == 4
    assert runs[0].reset_index(drop=True).equals(runs[1].reset_index(drop=True))


def test_resume_retries_errored_trials_only_when_asked(tmp_path, capsys):
    sets = [f"--set={s}" for s in (*TINY, "faults={kind: raise, epoch: 2, times: 1, "
                                          "point: {model.towers: 1}}")]  # fmt: skip
    argv = ["sweep", EXPERIMENT, "--storage", str(tmp_path), *sets]
    assert main(argv) == 1  # the fault strikes once; no retries: an error
    assert main([*argv, "--resume"]) == 1  # errored trials stay errors by default
    table = results.load(tmp_path / "digits_continuum").set_index("towers")
    assert table.loc["1", "status"] == "error"
    assert main([*argv, "--resume", "--retry-errored"]) == 0  # now retried from its checkpoint
    table = results.load(tmp_path / "digits_continuum").set_index("towers")
    assert set(table["status"]) == {"finished"} and len(table) == 2
    assert table.loc["1", "resumed_at"] == [1] and table.loc["1", "epochs_run"] == 3
    capsys.readouterr()
