"""Dashboards: a sweep's Optuna study in its folder, and its trials' costs in TensorBoard."""

import json

import optuna
import pytest

from towerspace import results
from towerspace.spaces import Domain
from towerspace.study import STUDY_FILE, category, distribution, load_study

pytestmark = pytest.mark.slow  # a real sweep (the session's tiny_sweep)


def test_a_sweep_folder_holds_its_optuna_study(tiny_sweep):
    sweep_dir = tiny_sweep.sweep_dir
    assert (sweep_dir / STUDY_FILE).is_file()
    study = load_study(sweep_dir, "digits_continuum")  # what optuna-dashboard opens
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.metric_names == ["val_acc"]
    table = results.load(tiny_sweep.results_path)
    means = table.groupby("towers", observed=True)["final_val_acc"].mean()
    trials = study.get_trials(deepcopy=False)
    assert [t.params["model.towers"] for t in trials] == [1, 4, "depthwise"]
    for trial in trials:  # one trial per point: the mean over its seeds, as Tune's Repeater
        towers = trial.user_attrs["towers"]
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["seeds"] == [
            0,
            1,
        ]
        assert trial.value == pytest.approx(means[towers], abs=1e-12)
        assert sorted(trial.user_attrs["trial_ids"]) == sorted(
            table.loc[table["towers"] == towers, "trial_id"]
        )
    assert study.best_trial.value == pytest.approx(means.max(), abs=1e-12)


def test_tensorboard_reads_each_trials_params_and_flops(tiny_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    table = results.load(tiny_sweep.results_path).set_index("trial_id")
    events = sorted(tiny_sweep.sweep_dir.glob("*/events.out.tfevents.*"))
    assert len(events) == len(table) == 6  # one log per trial, in the sweep folder
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        trial_id = json.loads((path.parent / "result.json").read_text().splitlines()[-1])[
            "trial_id"
        ]
        row = table.loc[trial_id]
        scalars = acc.Tags()["scalars"]
        for name in ("params", "flops", "training_flops", "width", "towers_min", "towers_max"):
            assert f"ray/tune/{name}" in scalars, name
        assert acc.Scalars("ray/tune/params")[-1].value == row["params"]
        assert acc.Scalars("ray/tune/flops")[-1].value == pytest.approx(row["flops"], rel=1e-6)


def test_space_domains_as_optuna_distributions():
    assert distribution(
        Domain("loguniform", (1e-3, 1e-1))
    ) == optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)
    assert distribution(Domain("randint", (1, 5))) == optuna.distributions.IntDistribution(1, 4)
    grid = distribution(Domain("grid", (1, "depthwise", {"group_width": 64})))
    assert grid.choices == (1, "depthwise", '{"group_width": 64}')
    assert category({"entry": 2, "middle": 4}) == '{"entry": 2, "middle": 4}'
