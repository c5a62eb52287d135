"""Every plot from a real sweep's results: lines, points, labels, scales, and files on disk."""

import pytest
from matplotlib.figure import Figure

from towerspace import plots, results
from towerspace.cli import main
from towerspace.report import write_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tables(tiny_sweep):
    return results.load(tiny_sweep.results_path), results.load_history(tiny_sweep.history_path)


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
    curves = plots.curves(history)
    assert len(curves.axes[0].get_lines()) == 3 and curves.axes[0].get_xlabel() == "epoch"
    with pytest.raises(ValueError, match="cost='speed' is not one of: params, flops, throughput"):
        plots.pareto(table, cost="speed")


def test_pareto_front():
    import pandas as pd

    summary = pd.DataFrame({"flops": [1, 2, 3, 4], "mean": [0.5, 0.7, 0.6, 0.8]})
    assert plots.pareto_front(summary, "flops", False)["flops"].tolist() == [1, 2, 4]


def test_saving_writes_png_and_svg(tables, tmp_path):
    paths = plots.save(plots.continuum(tables[0]), tmp_path / "c")
    assert [p.name for p in paths] == ["c.png", "c.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].stat().st_size > 10_000
    assert "<svg" in paths[1].read_text()[:500]


def test_plot_command_with_a_corrupt_and_a_missing_trial(tiny_sweep, tmp_path, capsys):
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_sweep.sweep_dir, sweep)
    records = sorted((sweep / "records").glob("*.json"))
    records[0].write_text(records[0].read_text()[:100])  # truncated mid-write
    records[1].unlink()  # missing: Ray's trial folder says the trial was there
    assert main(["plot", str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert err == (f"towerspace: warning: skipped damaged trial records: {records[0].name} "
                   f"(JSONDecodeError)\ntowerspace: warning: no record for trials: "
                   f"{records[1].stem}\n")  # fmt: skip
    assert f"  {sweep / 'plots' / 'continuum.png'}" in out
    assert len(results.load(sweep / "results.parquet")) == 4
    report = write_report(sweep)
    assert len(report.figures) == 14 and all(p.stat().st_size > 0 for p in report.figures)


def test_plot_command_refuses_a_folder_without_a_sweep(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"towerspace: error: {tmp_path}: no sweep here (no records/ folder)\n"
    )
