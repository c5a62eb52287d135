"""Summaries and paired comparisons against values computed by hand."""

import json
import math

import pandas as pd
import pytest

from towerspace import analysis


def _realized(towers, channels=8):
    regime = "regular" if towers == 1 else "depthwise" if towers == channels else "inception"
    site = {"channels": channels, "towers": towers, "group_width": channels // towers,
            "position": math.log(towers) / math.log(channels), "regime": regime}  # fmt: skip
    return json.dumps({"a": site, "b": dict(site)})


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
