"""Seed planning: the paired t-test's power against published sample sizes and a simulation,
seeds_needed on results with a known spread, and `towerspace plan` on a real sweep."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from towerspace import analysis
from towerspace.cli import main


@pytest.mark.parametrize(("effect", "seeds"), [(1.0, 10), (0.8, 15), (0.5, 34), (0.2, 199)])
def test_seeds_for_matches_the_published_sample_sizes(effect, seeds):
    # one-sample / paired t-test, two-sided, alpha 0.05, power 0.8 (Cohen 1988; G*Power)
    assert analysis.seeds_for(effect * 0.01, 0.01) == seeds
    assert (
        analysis.paired_power(seeds - 1, effect, 1.0)
        < 0.8
        <= analysis.paired_power(seeds, effect, 1.0)
    )


def test_seeds_for_gives_the_power_asked_for_in_a_simulation():
    delta, sd = 0.005, 0.004
    n = analysis.seeds_for(delta, sd)
    rng = np.random.default_rng(0)
    trials = 20_000

    def rejected(seeds: int) -> float:
        diffs = rng.normal(delta, sd, size=(trials, seeds))
        return float((stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05).mean())

    assert n == 8
    assert rejected(n) == pytest.approx(analysis.paired_power(n, delta, sd), abs=0.01)
    assert rejected(n) >= 0.79 and rejected(n - 1) < 0.79


def test_seeds_for_refuses_what_has_no_answer():
    with pytest.raises(ValueError, match="delta must be > 0"):
        analysis.seeds_for(0.0, 0.01)
    assert analysis.seeds_for(0.01, 0.0) == 2  # no spread: the fewest pairs a test can use


def _results(spreads: dict[str, float], seeds: int = 4) -> pd.DataFrame:
    """Points whose differences to depthwise, seed by seed, have exactly the given spread."""
    z = np.array([-1.5, -0.5, 0.5, 1.5])[:seeds]
    z = (z - z.mean()) / z.std(ddof=1)
    base = 0.9 + 0.01 * np.arange(seeds)
    rows = []
    for label, sd in {"depthwise": None, **spreads}.items():
        accs = base if sd is None else base - 0.02 + sd * z
        for seed, acc in enumerate(accs):
            rows.append({"trial_id": f"{label}-{seed}", "status": "finished", "seed": seed,
                         "towers": label, "order": "spatial_first", "mid": "none",
                         "match": "params", "residual": True, "final_val_acc": float(acc),
                         "train_time_s": 36.0,
                         "realized_towers": json.dumps({"a": {"towers": 1, "group_width": 8,
                                                              "position": 0.0,
                                                              "regime": "regular"}})})  # fmt: skip
    return pd.DataFrame(rows)


def test_seeds_needed_per_point_and_pooled_from_a_known_spread():
    plan = analysis.seeds_needed(_results({"1": 0.01, "4": 0.02}), delta=0.01)
    assert list(plan["towers"]) == ["1", "4", "pooled"]
    assert (plan["reference"] == "depthwise").all()
    assert plan["sd_diff"].tolist() == pytest.approx([0.01, 0.02, math.sqrt(0.00025)])
    assert plan["seeds"].tolist() == [10, analysis.seeds_for(0.01, 0.02),
                                      analysis.seeds_for(0.01, math.sqrt(0.00025))]  # fmt: skip
    assert plan.loc[0, "diff_mean"] == pytest.approx(-0.02)
    assert plan.loc[2, "df"] == 6 and (plan["seeds_upper"] > plan["seeds"]).all()
    upper = 0.01 * math.sqrt(3 / stats.chi2.ppf(0.2, 3))  # the 80% upper bound on sd from 3 df
    assert plan.loc[0, "seeds_upper"] == analysis.seeds_for(0.01, upper)


def test_plan_adds_hours_at_the_measured_trial_time():
    from towerspace import plan

    results = _results({"1": 0.01})
    table = plan.add_hours(analysis.seeds_needed(results, delta=0.01), results, devices=2.0)
    assert table.loc[0, "hours"] == pytest.approx(10 * 36 * 2 / 3600)
    assert table.loc[1, "hours"] == pytest.approx(2 * 10 * 36 * 2 / 3600)  # both points


def test_plan_command_refuses_a_sweep_of_one_seed(tmp_path, capsys):
    assert main(["plan", str(tmp_path), "--delta", "0.01"]) == 2
    assert "no sweep here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(tmp_path), "--delta", "1.5"])
    assert exit_.value.code == 2
    assert "--delta: must be a number in (0, 1), got 1.5" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_command_on_a_real_sweep(tiny_sweep, capsys):
    assert main(["plan", str(tiny_sweep.sweep_dir), "--delta", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "to resolve a difference of 0.05 in final_val_acc against depthwise" in out
    assert "pooled" in out and "CPU-hours of training for 3 points" in out


def test_a_pilot_of_one_seed_is_refused_in_one_line():
    from towerspace import plan

    one = _results({"1": 0.01}).query("seed == 0")
    with pytest.raises(ValueError, match=r"needs at least 2 finished seeds of a point and its "
                                         r"reference; this sweep has 1: run a pilot"):  # fmt: skip
        plan.plan(one, 0.01)
