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
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n)
    assert (one["ci_low"], one["ci_high"]) == pytest.approx((0.82 - half, 0.82 + half))
    assert one["flops"] == 1000 and one["images_per_s"] == 500.0
    assert list(summary["failed"]) == [1, 1, 0]
    assert summary.attrs["excluded"] == ["bad (error)", "nan (diverged)"]


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
