"""Summaries and paired comparisons against values computed by hand."""

import json
import math

import pandas as pd
import pytest

from towerspace import analysis


def _site(towers, channels=8):
    regime = "regular" if towers == 1 else "depthwise" if towers == channels else "inception"
    return {"channels": channels, "towers": towers, "group_width": channels // towers,
            "position": math.log(towers) / math.log(channels), "regime": regime}  # fmt: skip


def _realized(towers, channels=8, other=None):
    """Two layers with `towers` (and `other` in the second layer, when given)."""
    return json.dumps({"a": _site(towers, channels), "b": _site(other or towers, channels)})


def _relabel(table, labels):
    return table.assign(towers=table["towers"].map(labels))


@pytest.fixture
def table():
    rows = []
    accs = {"1": [0.80, 0.84, 0.82], "2": [0.85, 0.85, 0.88], "depthwise": [0.83, 0.86, 0.83]}
    towers = {"1": 1, "2": 2, "depthwise": 8}
    for point, values in accs.items():
        for seed, acc in enumerate(values):
            rows.append({"experiment": "e", "data": "digits", "trial_id": f"{point}-{seed}",
                         "status": "finished", "seed": seed, "towers": point,
                         "order": "spatial_first", "mid": "none", "match": "params",
                         "final_val_acc": acc, "params": 100, "flops": 1000 * towers[point],
                         "images_per_s": 500.0 / towers[point],
                         "realized_towers": _realized(towers[point])})  # fmt: skip
    rows.append({**rows[0], "trial_id": "bad", "seed": 3, "status": "error",
                 "final_val_acc": math.nan})  # fmt: skip
    rows.append({**rows[3], "trial_id": "nan", "seed": 4, "status": "diverged"})
    return pd.DataFrame(rows)


def test_derived_columns(table):
    derived = analysis.derive(table)
    first = derived.iloc[0]
    assert (first["effective_towers"], first["log2_group_width"], first["regime"]) == (
        1.0, 3.0, "regular")  # fmt: skip
    dw = derived[derived["towers"] == "depthwise"].iloc[0]
    assert (dw["position"], dw["regime"], dw["log2_group_width"]) == (1.0, "depthwise", 0.0)
    two = derived[derived["towers"] == "2"].iloc[0]
    assert two["position"] == pytest.approx(1 / 3) and two["regime"] == "inception"


def test_summarize_by_hand(table):
    summary = analysis.summarize(table)
    assert list(summary["towers"]) == ["1", "2", "depthwise"]
    one = summary.iloc[0]
    assert one["n"] == 3 and one["mean"] == pytest.approx(0.82)
    assert one["std"] == pytest.approx(0.02)  # sample std of 0.80, 0.84, 0.82
    angles = [math.asin(math.sqrt(p)) for p in (0.80, 0.84, 0.82)]  # the interval's scale
    mean, sd = sum(angles) / 3, math.sqrt(sum((a - sum(angles) / 3) ** 2 for a in angles) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n)
    assert (one["asin_ci_low"], one["asin_ci_high"]) == pytest.approx(
        (math.sin(mean - half) ** 2, math.sin(mean + half) ** 2))  # fmt: skip
    assert (one["asin_ci_low"], one["asin_ci_high"]) == pytest.approx((0.76802, 0.86719), abs=1e-5)
    assert one["flops"] == 1000 and one["images_per_s"] == 500.0
    assert list(summary["failed"]) == [1, 1, 0]
    assert summary.attrs["excluded"] == ["bad (error)", "nan (diverged)"]
    assert summary["towers"].dtype == pd.CategoricalDtype(["1", "2", "depthwise"], ordered=True)
    assert summary.attrs["interval"] == "95% t-interval on the arcsine-square-root scale"


def test_accuracy_interval_of_a_known_case():
    # accuracies sin²(1.0), sin²(1.1), sin²(1.2): angles with mean 1.1 and standard deviation 0.1
    accuracies = [math.sin(a) ** 2 for a in (1.0, 1.1, 1.2)]
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n)
    low, high = analysis.accuracy_interval(accuracies)
    assert (low, high) == pytest.approx((math.sin(1.1 - half) ** 2, math.sin(1.1 + half) ** 2))
    assert (low, high) == pytest.approx((0.565995, 0.951356), abs=1e-6)
    assert analysis.accuracy_interval([*accuracies, math.nan]) == (low, high)  # NaN left out


def test_accuracy_intervals_stay_within_0_and_1():
    # two seeds near 1: a plain t-interval (t = 12.71 for one degree of freedom) reaches 1.059
    low, high = analysis.accuracy_interval([0.99, 1.0])
    assert (low, high) == pytest.approx((0.598296, 1.0), abs=1e-6)
    assert analysis.accuracy_interval([1.0, 1.0]) == (1.0, 1.0)  # no spread: no width
    # angles 0, 0, asin(0.1): mean 0.03339, sd 0.05783; the low end is cut at 0
    assert analysis.accuracy_interval([0.0, 0.0, 0.01]) == pytest.approx((0.0, 0.031021), abs=1e-6)
    for values in ([0.999, 0.98, 1.0], [0.5, 0.99], [0.0, 1.0], [0.97, 0.99, 0.995, 1.0, 1.0]):
        low, high = analysis.accuracy_interval(values)
        assert 0.0 <= low <= high <= 1.0
    assert all(math.isnan(v) for v in analysis.accuracy_interval([0.9]))  # one seed: no interval
    assert all(math.isnan(v) for v in analysis.accuracy_interval([]))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\], got \[0.5, 1.5\]"):
        analysis.accuracy_interval([0.5, 1.5])


def test_summary_intervals_near_1(table):
    near = table.assign(final_val_acc=[0.99, 1.0, 1.0, 0.995, 0.999, 1.0, 1.0, 0.98, 1.0,
                                       math.nan, 0.9])  # fmt: skip
    summary = analysis.summarize(near[near["seed"] < 2])  # two seeds per point
    assert list(summary["n"]) == [2, 2, 2]
    assert (summary["asin_ci_low"] >= 0).all() and (summary["asin_ci_high"] <= 1).all()
    assert summary.loc[0, ["asin_ci_low", "asin_ci_high"]].tolist() == pytest.approx(
        [0.598296, 1.0], abs=1e-6)  # fmt: skip
    single = analysis.summarize(near[near["seed"] == 0])
    assert single["n"].tolist() == [1, 1, 1] and single["asin_ci_low"].isna().all()


def test_compare_pairs_by_seed_against_depthwise(table):
    diffs = analysis.compare(table, n_boot=2000, seed=1)
    assert set(diffs["reference"]) == {"depthwise"}
    one = diffs[diffs["towers"] == "1"].iloc[0]
    # pairs by seed: 0.80-0.83, 0.84-0.86, 0.82-0.83 → -0.03, -0.02, -0.01
    assert one["n_pairs"] == 3 and one["diff_mean"] == pytest.approx(-0.02)
    assert -0.03 <= one["ci_low"] <= one["diff_mean"] <= one["ci_high"] <= -0.01
    two = diffs[diffs["towers"] == "2"].iloc[0]
    assert two["diff_mean"] == pytest.approx((0.02 - 0.01 + 0.05) / 3)
    ref = diffs[diffs["towers"] == "depthwise"].iloc[0]
    assert (ref["diff_mean"], ref["ci_low"], ref["ci_high"]) == (0.0, 0.0, 0.0)
    assert diffs["towers"].dtype == pd.CategoricalDtype(["1", "2", "depthwise"], ordered=True)


def test_compare_needs_a_finished_reference(table):
    with pytest.raises(ValueError, match=r"reference '16' is not a finished point; points: 1, 2"):
        analysis.compare(table, reference="16")


def test_compare_without_depthwise_uses_the_point_nearest_it(table):
    # a group_width sweep: gw1 is depthwise (position 1), gw8 regular (position 0)
    widths = _relabel(table, {"1": "gw8", "2": "gw4", "depthwise": "gw1"})
    assert analysis.reference_point(widths) == "gw1"
    diffs = analysis.compare(widths, n_boot=2000, seed=1)
    assert list(diffs["towers"]) == ["gw8", "gw4", "gw1"] and set(diffs["reference"]) == {"gw1"}
    assert diffs["diff_mean"].tolist() == pytest.approx([-0.02, 0.02, 0.0])
    with pytest.raises(ValueError, match=r"^reference 'depthwise' is not a finished point; "
                       r"points: gw8, gw4, gw1$"):  # fmt: skip
        analysis.compare(widths, reference="depthwise")


def test_reference_is_the_highest_mean_position_then_the_first_label(table):
    # per-flow labels: layers a and b get different towers, the position is their mean
    flows = _relabel(table, {"1": "1 [exit=depthwise]", "2": "4 [entry=2, exit=depthwise]",
                             "depthwise": "8 [exit=2]"})  # fmt: skip
    realized = {"1 [exit=depthwise]": _realized(1, other=8), "8 [exit=2]": _realized(8, other=2),
                "4 [entry=2, exit=depthwise]": _realized(2, other=8)}  # fmt: skip
    flows["realized_towers"] = flows["towers"].map(realized)  # positions 0.5, 2/3, 2/3
    assert analysis.reference_point(flows) == "4 [entry=2, exit=depthwise]"  # tie: first label
    diffs = analysis.compare(flows, n_boot=2000, seed=1).set_index("towers")
    assert diffs.loc["8 [exit=2]", "diff_mean"] == pytest.approx((-0.02 + 0.01 - 0.05) / 3)
    assert diffs.loc["1 [exit=depthwise]", "position"] == pytest.approx(0.5)


def test_compare_needs_finished_trials(table):
    with pytest.raises(ValueError, match="no finished trials: nothing to compare against"):
        analysis.compare(table.assign(status="error"))


def test_sampled_models_form_one_population(table):
    sampled = _relabel(table, {"1": "random/11", "2": "random/7", "depthwise": "random/3"})
    assert analysis.is_population(sampled) and not analysis.is_population(table)
    assert not analysis.is_population(pd.concat([sampled, table]))
    derived = analysis.derive(sampled.assign(towers=sampled["towers"] + " [entry=2]"))
    assert set(derived["population"]) == {"sampled models [entry=2]"}
    assert list(analysis.derive(table)["population"]) == list(table["towers"])


def test_the_residual_ablation_is_its_own_curve(table):
    plain = table.assign(residual=False, final_val_acc=table["final_val_acc"] - 0.1,
                         trial_id=table["trial_id"] + "-plain")  # fmt: skip
    both = pd.concat([table.assign(residual=True), plain], ignore_index=True)
    summary = analysis.summarize(both)
    assert list(zip(summary["towers"], summary["residual"], strict=True)) == [
        ("1", False), ("2", False), ("depthwise", False),
        ("1", True), ("2", True), ("depthwise", True),
    ]  # fmt: skip
    assert summary["mean"].iloc[0] == pytest.approx(summary["mean"].iloc[3] - 0.1)
    diffs = analysis.compare(both)  # each curve against its own depthwise point
    assert diffs["diff_mean"].tolist() == pytest.approx([-0.02, 0.02, 0.0, -0.02, 0.02, 0.0])


def test_a_record_from_before_the_residual_option_reads_as_residual():
    from towerspace.results import results_table

    record = {"trial_id": "t", "status": "finished", "seed": 0, "towers": "4"}
    assert results_table([record])["residual"].tolist() == [True]
    assert str(results_table([record])["residual"].dtype) == "boolean"
