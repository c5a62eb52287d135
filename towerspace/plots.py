"""Continuum plots: a results DataFrame in, a matplotlib Figure out (the caller saves or shows)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from towerspace import analysis, files
from towerspace.status import Status
from towerspace.towers import label_order

# Okabe-Ito: distinguishable with the common colour-vision deficiencies
COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
AXES = {  # x: (column in summaries/derived tables, axis label, log2 scale)
    "towers": ("effective_towers", "towers (log2 scale)", True),
    "group_width": ("group_width", "channels per tower (log2 scale)", True),
    "position": ("position", "position on the continuum (0 regular, 1 depthwise)", False),
}
LONG_TICK = 10  # characters: longer tick labels (per-flow points) are slanted
COSTS = {
    "params": ("params", "parameters", False),
    "flops": ("flops", "forward FLOPs per image", False),
    "throughput": ("images_per_s", "training throughput (images/s)", True),
}


def _names(table: pd.DataFrame, column: str) -> str:
    return ", ".join(sorted(map(str, table[column].dropna().unique()))) if column in table else ""


def _title(table: pd.DataFrame, what: str) -> str:
    """'experiment on data: what', with whatever of the two the table names."""
    exp, data = _names(table, "experiment"), _names(table, "data")
    head = f"{exp or 'sweep'} on {data}" if data else exp
    return f"{head}: {what}" if head else what


def _label(key: tuple | str) -> str:
    return " / ".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _x(table: pd.DataFrame, x: str) -> pd.Series:
    if x not in AXES:
        raise ValueError(f"x={x!r} is not one of: {', '.join(AXES)}")
    if x == "group_width":
        return 2 ** table["log2_group_width"]
    return table[AXES[x][0]]


def _lines(summary: pd.DataFrame):
    keys = [c for c in analysis.GROUPS if c in summary and summary[c].nunique() > 1]
    if not keys:
        yield "all", summary
        return
    yield from summary.groupby(keys, sort=False, observed=True)


def _linestyle(summary: pd.DataFrame) -> str:
    # models drawn at random have no order along the continuum: points, not a line through them
    return "none" if analysis.is_population(summary) else "-"


def _axis(ax, x: str, summary: pd.DataFrame) -> None:
    ax.set_xlabel(AXES[x][1])
    if AXES[x][2]:
        ax.set_xscale("log", base=2)
    if x == "towers" and analysis.is_population(summary):  # too many points to name
        ax.xaxis.set_major_formatter(ScalarFormatter())
    elif x == "towers":  # points are named as asked; they sit at the geometric mean over layers
        ticks = summary.drop_duplicates("towers")
        labels = [str(t) for t in ticks["towers"]]
        long = max(map(len, labels), default=0) > LONG_TICK  # per-flow labels: slant, not overlap
        ax.set_xticks(ticks["effective_towers"], labels, fontsize=7 if long else 8,
                      rotation=30 if long else 0, ha="right" if long else "center")  # fmt: skip
        ax.minorticks_off()


def _shade_regimes(ax, summary: pd.DataFrame, x: str) -> None:
    """Shade the regular and depthwise ends and label the three regimes."""
    xs = _x(summary, x)
    for regime, color in (("regular", "#999999"), ("depthwise", "#56B4E9")):
        at = xs[summary["regime"] == regime]
        if at.empty:
            continue
        lo, hi = at.min(), at.max()
        pad = (lambda v, s: v * 2**s) if AXES[x][2] else (lambda v, s: v + 0.03 * s)
        ax.axvspan(pad(lo, -0.3), pad(hi, 0.3), color=color, alpha=0.15, lw=0)
    for regime in analysis.REGIMES:
        at = xs[summary["regime"] == regime]
        if not at.empty:
            mid = float(np.exp(np.log(at).mean())) if AXES[x][2] else float(at.mean())
            ax.annotate({"inception": "Inception-style"}.get(regime, regime), (mid, 1.0),
                        xycoords=("data", "axes fraction"), ha="center", va="bottom",
                        fontsize=8, color="#555555")  # fmt: skip


def continuum(results: pd.DataFrame, x: str = "towers", metric: str = analysis.METRIC) -> Figure:
    """Accuracy across the continuum: mean over seeds with 95% intervals (analysis.summarize's),
    seeds as faint dots."""
    summary = analysis.summarize(results, metric=metric)
    trials = analysis.derive(results)
    trials = trials[trials["status"] == Status.FINISHED]
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    _shade_regimes(ax, summary, x)
    for i, (key, line) in enumerate(_lines(summary)):
        color = COLORS[i % len(COLORS)]
        xs, mean = _x(line, x), line["mean"]
        low, high = line["asin_ci_low"], line["asin_ci_high"]  # within [0, 1]
        err = np.nan_to_num(np.vstack([mean - low, high - mean]).clip(0))
        sampled = analysis.is_population(line)  # a model's few seeds: its dots say enough
        ax.errorbar(xs, mean, yerr=None if sampled else err, color=color, marker="o", capsize=3,
                    ls=_linestyle(line), label=_label(key))  # fmt: skip
        keys = [c for c in analysis.GROUPS if c in line and line[c].nunique() == 1]
        mine = trials.merge(line[keys].drop_duplicates(), on=keys) if keys else trials
        ax.scatter(_x(mine, x), mine[metric], color=color, alpha=0.45, s=18, lw=0, zorder=3)
    _axis(ax, x, summary)
    ax.set_ylabel("validation accuracy (top-1, final epoch)")
    ax.set_title(_title(results, "accuracy across the tower continuum"), fontsize=10, pad=14)
    if len(list(_lines(summary))) > 1:
        fig.legend(loc="outside right upper", fontsize=8, title="order / mid / match")
    return fig


def cost(results: pd.DataFrame, x: str = "towers") -> Figure:
    """Parameters, FLOPs and measured training throughput across the continuum."""
    summary = analysis.summarize(results)
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (column, label, _) in zip(axes, COSTS.values(), strict=True):
        for i, (key, line) in enumerate(_lines(summary)):
            ax.plot(_x(line, x), line[column], marker="o", color=COLORS[i % len(COLORS)],
                    ls=_linestyle(line), label=_label(key))  # fmt: skip
        _axis(ax, x, summary)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    fig.suptitle(_title(results, "cost across the tower continuum (per image)"), fontsize=10)
    return fig


def pareto(results: pd.DataFrame, cost: str = "flops", metric: str = analysis.METRIC) -> Figure:
    """Accuracy against a cost: one colour and one Pareto front per order / mid / match group."""
    if cost not in COSTS:
        raise ValueError(f"cost={cost!r} is not one of: {', '.join(COSTS)}")
    column, label, higher_is_better = COSTS[cost]
    lines = list(_lines(analysis.summarize(results, metric=metric)))
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (key, line) in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        front = pareto_front(line, column, higher_is_better)
        ax.scatter(line[column], line["mean"], color=color, zorder=3)
        ax.plot(front[column], front["mean"], color=color, marker="D", mfc="none", ms=10,
                label=_label(key) if len(lines) > 1 else "Pareto front", zorder=2)  # fmt: skip
        _name_points(ax, front if analysis.is_population(line) else line, column)
    ax.set_xscale("log")
    ax.set_xlabel(label + (" (higher is better)" if higher_is_better else ""))
    ax.set_ylabel("validation accuracy (mean over seeds)")
    if len(lines) > 1:
        title = "Pareto front of\norder / mid / match"
        fig.legend(loc="outside right upper", fontsize=8, title=title)
    else:
        ax.legend(loc="best", fontsize=8)
    ax.set_title(_title(results, f"accuracy against {label}"), fontsize=10)
    return fig


def _name_points(ax, points: pd.DataFrame, column: str) -> None:
    """Label each point with its towers as asked."""
    for _, row in points.iterrows():
        ax.annotate(str(row["towers"]), (row[column], row["mean"]), xytext=(4, 4),
                    textcoords="offset points", fontsize=8)  # fmt: skip


def pareto_front(summary: pd.DataFrame, column: str, higher_is_better: bool) -> pd.DataFrame:
    """Points no other point beats on both accuracy and cost, sorted by cost."""
    # on a tie in cost the more accurate point comes first, so the other is dominated
    ordered = summary.sort_values([column, "mean"], ascending=[not higher_is_better, False])
    best, keep = -np.inf, []
    for index, acc in ordered["mean"].items():
        if acc > best:
            keep.append(index)
            best = acc
    return summary.loc[keep].sort_values(column)


def edf(results: pd.DataFrame, by: str = "towers", metric: str = analysis.METRIC) -> Figure:
    """Empirical distribution of error per group (the RegNet paper's EDF).

    By towers, models drawn at random ('random/<seed>') make one curve per population (and per
    order / mid / match if those vary), each model counted once at its mean over seeds.
    """
    trials = analysis.derive(results)
    keys, samples = _edf_samples(trials[trials["status"] == Status.FINISHED], by, metric)
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    groups = samples.groupby(keys, sort=False, observed=True)
    order = groups["position"].mean().sort_values(kind="stable").index  # regular end first
    for i, name in enumerate(order):
        group = groups.get_group(name if isinstance(name, tuple) else (name,))
        errors = np.sort(1.0 - group[metric].to_numpy())
        errors = np.concatenate([errors[:1], errors])  # the EDF rises from 0 at the best model
        fraction = np.arange(len(errors)) / (len(errors) - 1)
        ax.step(errors, fraction, where="post", color=COLORS[i % len(COLORS)],
                label=f"{_label(name)} (n={len(errors) - 1})")  # fmt: skip
    ax.set_xlabel("validation error (1 - top-1 accuracy)")
    ax.set_ylabel("cumulative fraction of models")
    ax.set_ylim(0, 1.02)
    fig.legend(loc="outside right upper", fontsize=8, title=" / ".join(keys))
    ax.set_title(_title(results, f"error EDF by {' / '.join(keys)}"), fontsize=10)
    return fig


def _edf_samples(trials: pd.DataFrame, by: str, metric: str) -> tuple[list[str], pd.DataFrame]:
    """The columns an EDF groups by, and its rows: trials, or one row per sampled model."""
    if by != "towers" or not analysis.is_population(trials):
        return [by], trials
    keys = ["population", *(c for c in analysis.GROUPS if c in trials and trials[c].nunique() > 1)]
    models = trials.groupby(["towers", *keys], sort=False, dropna=False, observed=True)
    models = models[[metric, "position"]]
    return keys, models.mean().reset_index()


def curves(
    history: pd.DataFrame, metric: str = "val_acc", results: pd.DataFrame | None = None
) -> Figure:
    """Validation accuracy per epoch, one line per point (mean over seeds).

    Models drawn at random are one line per population (their mean) over a faint line per model.
    The title names the experiment and data from `results` (the history table lacks them).
    """
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    history = history.assign(population=[analysis.population(t) for t in history["towers"]])
    groups = history.groupby("population", sort=False)
    for i, name in enumerate(label_order(history["population"])):  # regular end first
        rows = groups.get_group(name)
        models = rows.groupby(["towers", "epoch"], sort=False, observed=True)[metric].mean()
        models = models.unstack("towers")
        color, n = COLORS[i % len(COLORS)], models.shape[1]
        if n > 1:
            ax.plot(models.index, models.to_numpy(), color=color, alpha=0.25, lw=0.8)
        ax.plot(models.index, models.mean(axis=1).to_numpy(), color=color,
                label=f"{name} (n={n})" if n > 1 else str(name))  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (top-1, mean over seeds)")
    fig.legend(loc="outside right upper", fontsize=8, title="towers")
    ax.set_title(_title(history if results is None else results, "validation accuracy per epoch"),
                 fontsize=10)  # fmt: skip
    return fig


def speed(
    profile: pd.DataFrame,
    roofs: dict[str, float] | None = None,
    title: str = "TowerConv2d time and achieved FLOP/s per tower count",
) -> Figure:
    """Time and achieved FLOP/s against towers, one line per implementation (profile tables).

    With roofs (profile.machine_roofs), the right panel draws the machine's measured dense-conv
    FLOP/s and the bandwidth roof: copy bandwidth × the layer's arithmetic intensity.
    """
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for i, (impl, rows) in enumerate(profile.groupby("impl", sort=False)):
        rows = rows.sort_values("towers")
        for ax, column in ((left, "time_ms"), (right, "gflops_per_s")):
            ax.plot(rows["towers"], rows[column], marker="o", color=COLORS[i % len(COLORS)],
                    label=impl)  # fmt: skip
    if roofs:
        right.axhline(roofs["dense_conv_gflops_per_s"], color="#555555", ls="--",
                      label="dense conv (measured)")  # fmt: skip
        if "bytes" in profile:
            rows = profile.drop_duplicates("towers").sort_values("towers")
            roof = roofs["bandwidth_gb_per_s"] * rows["flops"] / rows["bytes"]
            right.plot(rows["towers"], roof, color="#555555", ls=":", label="bandwidth roof")
    for ax, label in ((left, "time per batch (ms, median)"), (right, "achieved GFLOP/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("towers (log2 scale)")
        ax.set_ylabel(label)
    fig.legend(*left.get_legend_handles_labels(), loc="outside right upper", fontsize=8,
               title="implementation")  # fmt: skip
    if roofs:
        right.legend(loc="lower left", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def save(
    fig: Figure, stem: Path, formats: Sequence[str] = ("png", "svg"), root: Path | None = None
) -> list[Path]:
    """Write a figure as stem.png and stem.svg (by default), each whole (a temporary file
    renamed) and, with root, never through a link; return the paths."""
    paths = [stem.with_suffix(f".{fmt}") for fmt in formats]
    for path, fmt in zip(paths, formats, strict=True):
        files.write_atomic(path, lambda tmp, f=fmt: fig.savefig(tmp, dpi=150, format=f), root=root)
    return paths
