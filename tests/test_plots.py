"""Every plot from a real sweep's results and from synthetic tables: lines, points, labels,
scales, colours, and files on disk."""

import io
import itertools
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from towerspace import analysis, files, plots, results
from towerspace.cli import main
from towerspace.report import write_report

slow = pytest.mark.slow  # the tests of a real sweep; the synthetic ones take a second


def _site(towers, channels=8):
    regime = "regular" if towers == 1 else "depthwise" if towers == channels else "inception"
    return {"channels": channels, "towers": towers, "group_width": channels // towers,
            "position": math.log(towers) / math.log(channels), "regime": regime}  # fmt: skip


def _trial(label, layers, seed, acc, order="spatial_first"):
    """One finished trial (as results.load gives it) whose two layers get `layers` towers."""
    trial_id = f"{label}-{order}-{seed}".replace("/", "_")
    realized = {"a": _site(layers[0]), "b": _site(layers[1])}
    return {"experiment": "e", "data": "digits", "trial_id": trial_id,
            "status": "finished", "seed": seed, "towers": label, "order": order, "mid": "none",
            "match": "params", "final_val_acc": acc, "params": 100,
            "flops": 8000 // max(layers), "images_per_s": 100.0 * max(layers),
            "realized_towers": json.dumps(realized)}  # fmt: skip


GRID = {"1": (1, 1), "2": (2, 2), "4": (4, 4), "depthwise": (8, 8)}
MEANS = {  # mean accuracy per order and point; the seeds are the mean - 0.01 and + 0.01
    "spatial_first": {"1": 0.90, "2": 0.85, "4": 0.84, "depthwise": 0.86},
    "pointwise_first": {"1": 0.80, "2": 0.88, "4": 0.75, "depthwise": 0.70},
}


def _grid(orders=("spatial_first",), points=("1", "2", "depthwise")):
    """A grid sweep: every point of every order over seeds 0 and 1."""
    return pd.DataFrame([_trial(p, GRID[p], seed, MEANS[o][p] + 0.02 * seed - 0.01, o)
                         for o in orders for p in points for seed in (0, 1)])  # fmt: skip


SAMPLED = [(1, 1), (1, 2), (2, 4), (4, 8), (8, 8), (2, 2)]  # towers per layer of six random models


def _sampled(orders=("spatial_first",)):
    """A layerwise_random sweep: model m is 'random/<m>', mean accuracy 0.70 + 0.03 m, two seeds."""
    return pd.DataFrame([_trial(f"random/{m}", layers, seed, 0.69 + 0.03 * m + 0.02 * seed, o)
                         for o in orders for m, layers in enumerate(SAMPLED)
                         for seed in (0, 1)])  # fmt: skip


def _legend(fig):
    return [t.get_text() for t in fig.legends[0].get_texts()]


@pytest.fixture(scope="module")
def tables(tiny_sweep):
    return results.load(tiny_sweep.results_path), results.load_history(tiny_sweep.history_path)


@slow
def test_continuum(tables):
    fig = plots.continuum(tables[0])
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    (bars,) = ax.containers  # one line with error bars: one order / mid op / budget
    assert len(bars.lines[0].get_xdata()) == 3  # three points
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "depthwise"]
    assert ax.get_ylabel() == "validation accuracy (top-1, final epoch)"
    assert ax.get_title() == "digits_continuum on digits: accuracy across the tower continuum"
    assert len(ax.collections[-1].get_offsets()) == 6  # every seed as a faint point
    assert plots.continuum(tables[0], x="position").axes[0].get_xscale() == "linear"


@slow
def test_cost_pareto_edf_curves(tables):
    table, history = tables
    cost = plots.cost(table)
    assert [ax.get_ylabel() for ax in cost.axes] == [
        "parameters", "forward FLOPs per image", "training throughput (images/s)"]  # fmt: skip
    assert all(len(ax.get_lines()[0].get_xdata()) == 3 for ax in cost.axes)
    pareto = plots.pareto(table, cost="params")
    assert len(pareto.axes[0].collections[0].get_offsets()) == 3
    assert pareto.axes[0].get_lines()[0].get_label() == "Pareto front"
    edf = plots.edf(table)
    assert len(edf.axes[0].get_lines()) == 3
    assert edf.axes[0].get_xlabel() == "validation error (1 - top-1 accuracy)"
    curves = plots.curves(history, results=table)
    assert len(curves.axes[0].get_lines()) == 3 and curves.axes[0].get_xlabel() == "epoch"
    assert curves.axes[0].get_title() == "digits_continuum on digits: validation accuracy per epoch"
    with pytest.raises(ValueError, match="cost='speed' is not one of: params, flops, throughput"):
        plots.pareto(table, cost="speed")


def test_pareto_front():
    summary = pd.DataFrame({"flops": [1, 2, 3, 4], "mean": [0.5, 0.7, 0.6, 0.8]})
    assert analysis.pareto_front(summary, "flops", False)["flops"].tolist() == [1, 2, 4]
    tied = pd.DataFrame({"flops": [1, 1, 2], "mean": [0.5, 0.6, 0.55]})
    assert analysis.pareto_front(tied, "flops", False)["mean"].tolist() == [0.6]
    speed = pd.DataFrame({"images_per_s": [10, 20, 30], "mean": [0.9, 0.8, 0.7]})
    assert analysis.pareto_front(speed, "images_per_s", True)["mean"].tolist() == [0.9, 0.8, 0.7]


@slow
def test_saving_writes_png_and_svg(tables, tmp_path):
    paths = plots.save(plots.continuum(tables[0]), tmp_path / "c")
    assert [p.name for p in paths] == ["c.png", "c.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].stat().st_size > 10_000
    assert "<svg" in paths[1].read_text()[:500]


@slow
def test_plot_command_with_a_corrupt_and_a_missing_trial(tiny_sweep, tmp_path, capsys):
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_sweep.sweep_dir, sweep)
    records = sorted((sweep / "records").glob("*.json"))
    records[0].write_text(records[0].read_text()[:100])  # truncated mid-write
    records[1].unlink()  # missing: Ray's trial folder says the trial was there
    assert main(["plot", str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert err == (f"towerspace: warning: skipped damaged trial records: records/"
                   f"{records[0].name} (not valid JSON)\ntowerspace: warning: no record for "
                   f"trials: {records[1].stem}\n")  # fmt: skip
    assert f"  {sweep / 'plots' / 'continuum.png'}" in out
    assert len(results.load(sweep / "results.parquet")) == 4
    report = write_report(sweep)
    assert len(report.figures) == 14 and all(p.stat().st_size > 0 for p in report.figures)


@slow
def test_plot_command_refuses_a_folder_without_a_sweep(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"towerspace: error: {tmp_path}: no sweep here (no records/ folder)\n"
    )


def test_continuum_draws_one_line_per_order():
    fig = plots.continuum(_grid(orders=("spatial_first", "pointwise_first")))
    (ax,) = fig.axes
    assert len(ax.containers) == 2 and all(c.has_yerr for c in ax.containers)  # one per order
    orders = ["pointwise_first", "spatial_first"]  # the summary's order
    for bars, order, color in zip(ax.containers, orders, plots.COLORS, strict=False):
        line = bars.lines[0]
        assert list(line.get_xdata()) == pytest.approx([1, 2, 8])  # effective towers
        means = [MEANS[order][p] for p in ("1", "2", "depthwise")]
        assert list(line.get_ydata()) == pytest.approx(means)
        assert to_hex(line.get_color()) == color.lower()
    assert _legend(fig) == orders
    assert fig.legends[0].get_title().get_text() == "order / mid / match"
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert [len(c.get_offsets()) for c in dots] == [6, 6]  # each order's seeds, faintly
    assert not plots.continuum(_grid()).legends  # one line: no legend


def test_continuum_shades_each_end_present_in_the_data():
    ax = plots.continuum(_grid(points=("1", "2", "depthwise"))).axes[0]
    regular, depthwise = ax.patches  # one axvspan per end
    assert (regular.get_x(), regular.get_x() + regular.get_width()) == pytest.approx(
        (2**-0.3, 2**0.3))  # fmt: skip
    assert (depthwise.get_x(), depthwise.get_x() + depthwise.get_width()) == pytest.approx(
        (8 * 2**-0.3, 8 * 2**0.3))  # fmt: skip
    assert [to_hex(p.get_facecolor()) for p in ax.patches] == ["#999999", "#56b4e9"]
    assert [t.get_text() for t in ax.texts] == ["regular", "Inception-style", "depthwise"]
    inner = plots.continuum(_grid(points=("2", "4"))).axes[0]
    assert not inner.patches and [t.get_text() for t in inner.texts] == ["Inception-style"]
    (band,) = plots.continuum(_grid(points=("2", "depthwise")), x="position").axes[0].patches
    assert (band.get_x(), band.get_x() + band.get_width()) == pytest.approx((0.991, 1.009))


def test_cost_and_pareto_axis_scales():
    table = _grid()
    for ax in plots.cost(table).axes:
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "depthwise"]
        assert ax.get_ylim()[0] == 0
    assert all(ax.get_xscale() == "linear" for ax in plots.cost(table, x="position").axes)
    for cost in ("flops", "params", "throughput"):
        ax = plots.pareto(table, cost=cost).axes[0]
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 10


def test_pareto_colours_groups_and_draws_a_front_per_group():
    fig = plots.pareto(_grid(orders=("spatial_first", "pointwise_first"), points=tuple(GRID)))
    (ax,) = fig.axes
    colors = [c.lower() for c in plots.COLORS[:2]]
    assert [to_hex(c.get_facecolor()[0]) for c in ax.collections] == colors
    assert [len(c.get_offsets()) for c in ax.collections] == [4, 4]
    first, second = ax.get_lines()
    # flops are 8000 / towers: depthwise is cheapest; what beats it differs between the orders
    assert first.get_label() == "pointwise_first" and second.get_label() == "spatial_first"
    assert list(first.get_xdata()) == [1000, 2000, 4000]
    assert list(first.get_ydata()) == pytest.approx([0.70, 0.75, 0.88])
    assert list(second.get_xdata()) == [1000, 8000]
    assert list(second.get_ydata()) == pytest.approx([0.86, 0.90])
    assert [to_hex(line.get_color()) for line in (first, second)] == colors
    assert _legend(fig) == ["pointwise_first", "spatial_first"] and ax.get_legend() is None
    single_fig = plots.pareto(_grid())
    single = single_fig.axes[0]  # the legend beside the axes: never on the best point
    assert _legend(single_fig) == ["Pareto front"] and single.get_legend() is None
    names = [t.get_text() for t in single.texts]  # every point named, the front's first
    assert names[:2] == ["depthwise", "1"] and sorted(names) == ["1", "2", "depthwise"]


def test_edf_of_a_grid_has_a_curve_per_point():
    fig = plots.edf(_grid())
    assert _legend(fig) == ["1 (n=2)", "2 (n=2)", "depthwise (n=2)"]
    one = fig.axes[0].get_lines()[0]
    assert list(one.get_xdata()) == pytest.approx([0.09, 0.09, 0.11])  # errors, best first
    assert list(one.get_ydata()) == [0, 0.5, 1]


def test_edf_of_a_sampled_space_is_one_curve_per_population():
    fig = plots.edf(_sampled())
    assert _legend(fig) == ["sampled models (n=6)"]  # six models, each its mean over two seeds
    assert fig.axes[0].get_title() == "e on digits: error EDF by population"
    (line,) = fig.axes[0].get_lines()
    errors = [0.15, 0.15, 0.18, 0.21, 0.24, 0.27, 0.30]
    assert list(line.get_xdata()) == pytest.approx(errors)
    assert list(line.get_ydata()) == pytest.approx(np.arange(7) / 6)
    both = plots.edf(_sampled(orders=("spatial_first", "pointwise_first")))
    assert _legend(both) == ["sampled models / spatial_first (n=6)",
                             "sampled models / pointwise_first (n=6)"]  # fmt: skip
    assert both.legends[0].get_title().get_text() == "population / order"
    regime = plots.edf(_sampled(), by="regime")  # trials, regular end first
    assert _legend(regime) == ["regular (n=2)", "inception (n=8)", "depthwise (n=2)"]
    assert regime.axes[0].get_title() == "e on digits: error EDF by regime"


def test_sampled_space_plots_points_not_lines():
    table = _sampled()
    ax = plots.continuum(table).axes[0]
    (bars,) = ax.containers
    assert list(bars.lines[0].get_xdata()) == pytest.approx(
        [1, 2**0.5, 2, 8**0.5, 32**0.5, 8])  # effective towers, regular end first  # fmt: skip
    assert bars.lines[0].get_linestyle() == "None" and not bars.has_yerr  # seeds as dots only
    assert not any(t.get_text().startswith("random/") for t in ax.get_xticklabels())
    assert len(ax.patches) == 2  # random/0 is regular, random/4 depthwise
    assert all(ax.get_lines()[0].get_linestyle() == "None" for ax in plots.cost(table).axes)
    pareto = plots.pareto(table).axes[0]
    # only the front is named; random/3 costs what random/4 does but is less accurate
    assert [t.get_text() for t in pareto.texts] == ["random/4", "random/5"]
    assert list(pareto.get_lines()[0].get_ydata()) == pytest.approx([0.82, 0.85])


def test_curves_title_and_populations():
    history = pd.DataFrame([{"trial_id": f"{p}-{s}", "towers": p, "seed": s, "epoch": e,
                             "val_acc": 0.1 * e + 0.01 * s + (p == "2") * 0.05}
                            for p in ("1", "2") for s in (0, 1) for e in (1, 2, 3)])  # fmt: skip
    ax = plots.curves(history).axes[0]
    assert ax.get_title() == "validation accuracy per epoch"  # the history names no experiment
    one, two = ax.get_lines()
    assert list(one.get_ydata()) == pytest.approx([0.105, 0.205, 0.305])  # mean over seeds
    assert list(two.get_ydata()) == pytest.approx([0.155, 0.255, 0.355])
    titled = plots.curves(history, results=_grid()).axes[0].get_title()
    assert titled == "e on digits: validation accuracy per epoch"
    sampled = history.assign(towers=history["towers"].map({"1": "random/1", "2": "random/2"}))
    fig = plots.curves(sampled)
    assert len(fig.axes[0].get_lines()) == 3  # each model faintly, then the population's mean
    assert list(fig.axes[0].get_lines()[-1].get_ydata()) == pytest.approx([0.13, 0.23, 0.33])
    assert _legend(fig) == ["sampled models (n=2)"]


def test_report_of_a_sampled_space(tmp_path):
    for row in _sampled().to_dict("records"):
        realized = json.loads(row.pop("realized_towers"))
        history = [{"epoch": 1, "val_acc": row["final_val_acc"] - 0.1},
                   {"epoch": 2, "val_acc": row["final_val_acc"]}]  # fmt: skip
        record = {**row, "realized": realized, "history": history}
        files.write_json(tmp_path / "records" / f"{row['trial_id']}.json", record)
    report = write_report(tmp_path)
    assert len(report.figures) == 14 and all(p.stat().st_size > 5_000 for p in report.figures)
    assert report.warnings == [] and len(report.summary) == 6
    table = results.load(tmp_path)
    (bars,) = plots.continuum(table).axes[0].containers
    assert list(bars.lines[0].get_xdata()) == pytest.approx([1, 2**0.5, 2, 8**0.5, 32**0.5, 8])
    assert _legend(plots.edf(table)) == ["sampled models (n=6)"]


SITES = {"entry.block2.convs.0": 16, "middle.block5.convs.0": 32, "exit.block13.convs.0": 64}
FLOWS = {  # per-flow schedules (entry, middle, exit towers; depthwise is the channels) and accuracy
    "depthwise [entry=2, middle=4, exit=2]": ((2, 4, 2), 0.80),
    "depthwise [entry=8, middle=8, exit=8]": ((8, 8, 8), 0.84),
    "depthwise [entry=1, middle=depthwise, exit=16]": ((1, 32, 16), 0.79),
}


def _per_flow(points=tuple(FLOWS)):
    """A per_flow sweep: each schedule over seeds 0 and 1 (accuracy -0.01 and +0.01)."""
    rows = []
    for label in points:
        towers, acc = FLOWS[label]
        realized = {site: _site(t, c) for (site, c), t in zip(SITES.items(), towers, strict=True)}
        for seed in (0, 1):
            rows.append({**_trial(label, (1, 1), seed, acc + 0.02 * seed - 0.01),
                         "flops": 1000 * sum(towers), "images_per_s": 10.0 * towers[1],
                         "realized_towers": json.dumps(realized)})  # fmt: skip
    return pd.DataFrame(rows)


def _names(fig, ax):
    """The point names an axes shows, and their boxes (in pixels) once the figure is saved."""
    fig.savefig(io.BytesIO(), format="png", dpi=150)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    names = [t for t in ax.texts if t.get_text() not in (*analysis.REGIMES, "Inception-style")]
    return [t.get_text() for t in names], [t.get_window_extent(renderer) for t in names]


def _shown(axis):
    """The tick labels an axis shows (within its view; the locator gives some beyond it)."""
    low, high = sorted(axis.get_view_interval())
    ticks = zip(axis.get_ticklocs(), axis.get_ticklabels(), strict=True)
    return [label.get_text() for at, label in ticks if low <= at <= high]


def _apart(fig, ax, boxes):
    inside = ax.get_window_extent(fig.canvas.get_renderer())
    assert all(inside.contains(b.x0, b.y0) and inside.contains(b.x1, b.y1) for b in boxes)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


def test_per_flow_points_sit_at_their_mean_unjoined():
    fig = plots.continuum(_per_flow())
    (ax,) = fig.axes
    (bars,) = ax.containers
    geomeans = [16 ** (1 / 3), 8, 8]  # of the three flows' towers, regular end first
    assert list(bars.lines[0].get_xdata()) == pytest.approx(sorted(geomeans))
    assert bars.lines[0].get_linestyle() == "None" and bars.has_yerr  # seeds: intervals shown
    assert ax.get_xlabel() == "geometric mean towers (log2 scale)" == plots.OFF_AXIS
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert ticks and not any("[" in t for t in ticks)  # numbers, not schedules
    names, boxes = _names(fig, ax)
    assert names == [  # each schedule named beside its point, the most accurate first
        "depthwise [entry=8, middle=8, exit=8]", "depthwise [entry=2, middle=4, exit=2]",
        "depthwise [entry=1, middle=depthwise, exit=16]"]  # fmt: skip
    _apart(fig, ax, boxes)
    (bars,) = plots.continuum(_per_flow(), x="position").axes[0].containers
    assert bars.lines[0].get_linestyle() == "None"
    for ax in plots.cost(_per_flow()).axes:
        assert [line.get_linestyle() for line in ax.get_lines()] == ["None"]
        assert ax.get_xlabel() == plots.OFF_AXIS


def test_a_grid_with_per_flow_points_keeps_its_line():
    table = pd.concat([_grid(), _per_flow(points=list(FLOWS)[:1])], ignore_index=True)
    fig = plots.continuum(table)
    (ax,) = fig.axes
    grid, flows = ax.containers  # the grid joined, the schedule apart
    assert list(grid.lines[0].get_xdata()) == pytest.approx([1, 2, 8])
    assert grid.lines[0].get_linestyle() == "-" and flows.lines[0].get_linestyle() == "None"
    assert list(flows.lines[0].get_xdata()) == pytest.approx([16 ** (1 / 3)])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "depthwise"]
    assert ax.get_xlabel() == "towers (log2 scale)\nschedules at their geometric mean"
    assert not fig.legends  # one order: one line, one colour, no legend
    assert _names(fig, ax)[0] == ["depthwise [entry=2, middle=4, exit=2]"]
    params, _, _ = plots.cost(table).axes
    assert [line.get_linestyle() for line in params.get_lines()] == ["-", "None"]
    assert [len(line.get_xdata()) for line in params.get_lines()] == [3, 1]


def test_pareto_names_do_not_overlap():
    # six points within 0.5% of each other's cost and 0.3 points of accuracy, one far away
    table = pd.DataFrame([_trial(str(2**k), (1, 1), seed, 0.9 + 0.0005 * k * (-1) ** k)
                          for k in range(6) for seed in (0, 1)]
                         + [_trial("depthwise", (1, 1), seed, 0.6) for seed in (0, 1)])  # fmt: skip
    table["flops"] = [100_000 + 100 * (i // 2) for i in range(12)] + [1_000_000] * 2
    fig = plots.pareto(table)
    ax = fig.axes[0]
    names, boxes = _names(fig, ax)
    front = analysis.pareto_front(analysis.summarize(table), "flops", False)["towers"]
    assert names[: len(front)] == [str(t) for t in front]  # the front keeps its names
    assert 1 < len(names) <= 7
    _apart(fig, ax, boxes)
    again = plots.pareto(table)
    assert [(t.get_text(), t.xyann) for t in again.axes[0].texts] == [
        (t.get_text(), t.xyann) for t in ax.texts]  # fmt: skip
    for cost in ("flops", "throughput"):  # long schedule names too
        fig = plots.pareto(_per_flow(), cost=cost)
        _apart(fig, fig.axes[0], _names(fig, fig.axes[0])[1])


def test_cost_keeps_equal_parameters_off_the_frame_with_plain_ticks():
    table = _grid().assign(params=728_937, flops=lambda t: 7_000_000 + 1000 * t.index)
    fig = plots.cost(table)
    fig.draw_without_rendering()
    params, flops, _ = fig.axes
    (line,) = params.get_lines()
    assert set(line.get_ydata()) == {728_937}  # matched: one value
    assert params.get_ylim()[0] == 0 and params.get_ylim()[1] >= 1.1 * 728_937
    for ax in fig.axes:
        assert ax.yaxis.get_offset_text().get_text() == ""  # no 1e6 above the axis
        shown = _shown(ax.yaxis)
        assert shown and not any(c in t for t in shown for c in "e×$")
    assert _shown(params.yaxis) == ["0", "100k", "200k", "300k", "400k", "500k", "600k", "700k",
                                    "800k"]  # fmt: skip
    assert _shown(flops.yaxis)[-2:] == ["7M", "8M"]
    assert [plots._compact(v) for v in (0, 950, 1500, 2.5e6, 16.7e9, 0.25)] == [
        "0", "950", "1.5k", "2.5M", "16.7G", "0.25"]  # fmt: skip


def test_curves_of_one_epoch_are_points():
    history = pd.DataFrame([{"trial_id": f"{p}-{s}", "towers": p, "seed": s, "epoch": 1,
                             "val_acc": 0.5 + 0.1 * s} for p in ("1", "random/3", "random/4")
                            for s in (0, 1)])  # fmt: skip
    fig = plots.curves(history)
    fig.draw_without_rendering()
    ax = fig.axes[0]
    assert [line.get_marker() for line in ax.get_lines()] == ["o"] * 4  # models faintly, means
    assert all(list(line.get_xdata()) == [1] for line in ax.get_lines())
    assert _shown(ax.xaxis) == ["1"]
    longer = pd.concat([history, history.assign(epoch=2)])
    assert {line.get_marker() for line in plots.curves(longer).axes[0].get_lines()} == {"None"}


def test_a_title_beside_a_wide_legend_takes_two_lines():
    table = _per_flow().assign(experiment="digits_continuum")
    history = table[["trial_id", "towers", "seed"]].assign(epoch=1, val_acc=table["final_val_acc"])
    fig = plots.curves(history, results=table)  # a legend of schedules: narrow axes
    title = fig.axes[0].title
    assert title.get_text() == "digits_continuum on digits:\nvalidation accuracy per epoch"
    fig.savefig(io.BytesIO(), format="png")
    renderer = fig.canvas.get_renderer()
    assert not title.get_window_extent(renderer).overlaps(
        fig.legends[0].get_window_extent(renderer)
    )


def _report_figures(sweep_dir, out, monkeypatch):
    """write_report's figures (each saved as PNG and SVG) and every warning raised meanwhile."""
    drawn, save = {}, plots.save
    monkeypatch.setattr(plots, "save", lambda fig, stem, **kw: drawn.setdefault(stem.name, fig)
                        and save(fig, stem, **kw))  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = write_report(sweep_dir, out=out)
    assert len(report.figures) == 14
    return drawn, [f"{w.category.__name__}: {w.message}" for w in caught]


def _assert_clean(drawn, caught):
    assert caught == []
    assert list(drawn) == ["continuum", "continuum_position", "cost", "pareto_flops",
                           "pareto_throughput", "edf", "curves"]  # fmt: skip
    for name, fig in drawn.items():
        assert fig.axes and all(ax.has_data() for ax in fig.axes), name


def test_report_of_a_per_flow_sweep_renders_cleanly(tmp_path, monkeypatch):
    for row in _per_flow().to_dict("records"):
        realized = json.loads(row.pop("realized_towers"))
        history = [{"epoch": 1, "val_acc": row["final_val_acc"]}]  # one epoch: points
        record = {**row, "realized": realized, "history": history}
        files.write_json(tmp_path / "records" / f"{row['trial_id']}.json", record)
    _assert_clean(*_report_figures(tmp_path, tmp_path / "out", monkeypatch))


@slow
def test_report_of_a_one_epoch_grid_renders_cleanly(tiny_sweep, tmp_path, monkeypatch):
    drawn, caught = _report_figures(tiny_sweep.sweep_dir, tmp_path, monkeypatch)
    _assert_clean(drawn, caught)
    markers = {line.get_marker() for line in drawn["curves"].axes[0].get_lines()}
    assert markers == {"o"}  # one epoch: points, not invisible one-point lines


def test_plots_skip_tower_labels_without_trials():
    # results.load gives towers as an ordered categorical of the sweep's labels; a label whose
    # trials all failed ("8" here) is a category without finished rows: no point, no line
    dtype = results.towers_dtype(["depthwise", "8", "2", "1"])
    table = _grid().astype({"towers": dtype})
    assert analysis.summarize(table)["towers"].tolist() == ["1", "2", "depthwise"]
    ax = plots.continuum(table).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "depthwise"]
    assert _legend(plots.edf(table)) == ["1 (n=2)", "2 (n=2)", "depthwise (n=2)"]
    history = pd.DataFrame([{"trial_id": f"{p}-0", "towers": p, "seed": 0, "epoch": e,
                             "val_acc": 0.1 * e} for p in ("1", "2") for e in (1, 2)])  # fmt: skip
    fig = plots.curves(history.astype({"towers": dtype}))
    assert _legend(fig) == ["1", "2"] and len(fig.axes[0].get_lines()) == 2
