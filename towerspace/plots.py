"""Continuum plots: a results DataFrame in, a matplotlib Figure out (the caller saves or shows)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from matplotlib.transforms import Bbox

from towerspace import analysis, files
from towerspace.status import Status
from towerspace.towers import TowerLabel, label_order

# Okabe-Ito: distinguishable with the common colour-vision deficiencies
COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
AXES = {  # x: (column in summaries/derived tables, axis label, log2 scale)
    "towers": ("effective_towers", "towers (log2 scale)", True),
    "group_width": ("group_width", "channels per tower (log2 scale)", True),
    "position": ("position", "position on the continuum (0 regular, 1 depthwise)", False),
}
OFF_AXIS = "geometric mean towers (log2 scale)"  # over layers: where no point is on the axis
COSTS = {
    "params": ("params", "parameters", False),
    "flops": ("flops", "forward FLOPs per image", False),
    "throughput": ("images_per_s", "training throughput (images/s)", True),
    "latency": ("latency_ms", "measured step time (ms, sum of layers)", False),
}


def _names(table: pd.DataFrame, column: str) -> str:
    return ", ".join(sorted(map(str, table[column].dropna().unique()))) if column in table else ""


def _title(table: pd.DataFrame, what: str) -> str:
    """'experiment on data: what', with whatever of the two the table names."""
    exp, data = _names(table, "experiment"), _names(table, "data")
    head = f"{exp or 'sweep'} on {data}" if data else exp
    return f"{head}: {what}" if head else what


def _set_title(ax, text: str, **kwargs) -> None:
    """The axes' title, in two lines ('experiment on data:', 'what') where one would run under
    a legend beside the axes (long legend labels narrow the axes). Lays the figure out."""
    title = ax.set_title(text, fontsize=10, **kwargs)
    if ax.figure.legends and ": " in text:
        renderer = _laid_out(ax.figure)
        box = title.get_window_extent(renderer)
        if any(box.overlaps(legend.get_window_extent(renderer)) for legend in ax.figure.legends):
            title.set_text(text.replace(": ", ":\n", 1))


def _laid_out(fig: Figure):
    """Lay the figure out (constrained layout) and return a renderer to measure text with."""
    FigureCanvasAgg(fig)  # savefig still picks its own canvas per format
    fig.draw_without_rendering()
    return fig.canvas.get_renderer()


def _label(key: tuple | str) -> str:
    return " / ".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _x(table: pd.DataFrame, x: str) -> pd.Series:
    if x not in AXES:
        raise ValueError(f"x={x!r} is not one of: {', '.join(AXES)}")
    if x == "group_width":
        return 2 ** table["log2_group_width"]
    return table[AXES[x][0]]


def _compact(value: float, _position: object = None) -> str:
    """A tick label in plain digits, thousands as k, M, G, T (no offset, no powers of ten)."""
    for power, suffix in ((12, "T"), (9, "G"), (6, "M"), (3, "k")):
        if abs(value) >= 10**power:
            return f"{value / 10**power:.4g}{suffix}"
    return f"{value:.4g}"


def _on_axis(summary: pd.DataFrame) -> pd.Series:
    """Which points are one place on the continuum: a count, group width or position asked for
    every layer. A schedule with per-flow overrides or a model drawn at random is not: it sits
    at its geometric mean over layers, a point among others, not on a line through them."""
    labels = [TowerLabel.parse(t) for t in summary["towers"]]
    return pd.Series([not (t.sampled or t.overrides) for t in labels], index=summary.index)


def _parts(line: pd.DataFrame):
    """(points, joined): the points on the axis, joined by a line, then those off it."""
    on = _on_axis(line)
    yield from ((part, joined) for part, joined in ((line[on], True), (line[~on], False))
                if not part.empty)  # fmt: skip


def _lines(summary: pd.DataFrame):
    keys = [c for c in analysis.GROUPS if c in summary and summary[c].nunique() > 1]
    if not keys:
        yield "all", summary
        return
    yield from summary.groupby(keys, sort=False, observed=True)


def _axis(ax, x: str, summary: pd.DataFrame) -> None:
    ax.set_xlabel(AXES[x][1])
    if AXES[x][2]:
        ax.set_xscale("log", base=2)
    if x != "towers":
        return
    on = _on_axis(summary)
    if not on.any():  # schedules and sampled models: numbers, not names
        ax.set_xlabel(OFF_AXIS)
        _log_ticks(ax.xaxis, summary["effective_towers"], base=2)
        return
    if not on.all():
        ax.set_xlabel("towers (log2 scale)\nschedules at their geometric mean")
    ticks = summary[on].drop_duplicates("towers")  # named as asked, at the mean over layers
    ax.set_xticks(ticks["effective_towers"], [str(t) for t in ticks["towers"]], fontsize=8)
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
        for j, (part, joined) in enumerate(_parts(line)):
            xs, mean = _x(part, x), part["mean"]
            low, high = part["asin_ci_low"], part["asin_ci_high"]  # within [0, 1]
            err = np.nan_to_num(np.vstack([mean - low, high - mean]).clip(0))
            sampled = analysis.is_population(part)  # a model's few seeds: its dots say enough
            ax.errorbar(xs, mean, yerr=None if sampled else err, color=color, marker="o",
                        capsize=3, ls="-" if joined else "none",
                        label=_label(key) if j == 0 else "_nolegend_")  # fmt: skip
        keys = [c for c in analysis.GROUPS if c in line and line[c].nunique() == 1]
        mine = trials.merge(line[keys].drop_duplicates(), on=keys) if keys else trials
        ax.scatter(_x(mine, x), mine[metric], color=color, alpha=0.45, s=18, lw=0, zorder=3)
    _axis(ax, x, summary)
    ax.set_ylabel("validation accuracy (top-1, final epoch)")
    if len(list(_lines(summary))) > 1:
        fig.legend(loc="outside right upper", fontsize=8, title="order / mid / match")
    _set_title(ax, _title(results, "accuracy across the tower continuum"), pad=14)
    drawn = np.array([TowerLabel.parse(t).sampled for t in summary["towers"]], dtype=bool)
    named = summary[~_on_axis(summary) & ~drawn]  # schedules (not random models): named
    named = named.sort_values("mean", ascending=False, kind="stable")  # the best first
    _name_points(ax, zip(_x(named, x), named["mean"], named["towers"], strict=True), fontsize=7)
    return fig


def cost(results: pd.DataFrame, x: str = "towers") -> Figure:
    """Parameters, FLOPs, measured training throughput and (where measured) step time across
    the continuum."""
    summary = analysis.summarize(results)
    shown = [c for c in COSTS.values() if c[0] in summary and summary[c[0]].notna().any()]
    shown = shown or list(COSTS.values())[:3]
    fig = Figure(figsize=(3.7 * len(shown), 3.6), layout="constrained")
    axes = fig.subplots(1, len(shown))
    for ax, (column, label, _) in zip(axes, shown, strict=True):
        for i, (key, line) in enumerate(_lines(summary)):
            for j, (part, joined) in enumerate(_parts(line)):
                ax.plot(_x(part, x), part[column], marker="o", color=COLORS[i % len(COLORS)],
                        ls="-" if joined else "none",
                        label=_label(key) if j == 0 else "_nolegend_")  # fmt: skip
        _axis(ax, x, summary)
        ax.set_ylabel(label)
        top = summary[column].max()
        # from zero, with headroom: equal (matched) costs are a flat line, not one on the frame
        ax.set_ylim(0, 1.15 * top if np.isfinite(top) and top > 0 else None)
        ax.yaxis.set_major_formatter(FuncFormatter(_compact))
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
    fronts, others = [], []
    for i, (key, line) in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        front = analysis.pareto_front(line, column, higher_is_better)
        ax.scatter(line[column], line["mean"], color=color, zorder=3)
        ax.plot(front[column], front["mean"], color=color, marker="D", mfc="none", ms=10,
                label=_label(key) if len(lines) > 1 else "Pareto front", zorder=2)  # fmt: skip
        fronts.append(front)
        if not analysis.is_population(line):  # models drawn at random: only the front is named
            others.append(line.drop(front.index).sort_values("mean", ascending=False))
    ax.margins(0.08)
    ax.set_xscale("log")
    _log_ticks(ax.xaxis, pd.concat([line for _, line in lines])[column], base=10)
    ax.set_xlabel(label + (" (higher is better)" if higher_is_better else ""))
    ax.set_ylabel("validation accuracy (mean over seeds)")
    title = "Pareto front of\norder / mid / match" if len(lines) > 1 else None
    fig.legend(loc="outside right upper", fontsize=8, title=title)  # beside: never on a point
    _set_title(ax, _title(results, f"accuracy against {label}"))
    named = pd.concat([*fronts, *others])  # fronts first: they keep their names when crowded
    _name_points(ax, zip(named[column], named["mean"], named["towers"], strict=True))
    return fig


def _log_ticks(axis, values: pd.Series, base: int) -> None:
    """Plain tick labels on a log axis (base 10 or 2) over values: within a factor of base, a
    few round values (powers would give one label or none); wider, 1, 2 and 5 times powers of
    ten, or 1 and 1.5 times powers of two."""
    low, high = values.min(), values.max()
    narrow = np.isfinite([low, high]).all() and low > 0 and high < base * low
    subs = (1.0, 2.0, 5.0) if base == 10 else (1.0, 1.5)
    axis.set_major_locator(MaxNLocator(nbins=4) if narrow else LogLocator(base, subs=subs))
    axis.set_major_formatter(FuncFormatter(_compact))
    axis.set_minor_formatter(NullFormatter())


# beside the point: right-up, right-down, left-up, left-down, above, below (points, alignment)
PLACES = (
    (5, 2, "left", "bottom"),
    (5, -2, "left", "top"),
    (-5, 2, "right", "bottom"),
    (-5, -2, "right", "top"),
    (0, 6, "center", "bottom"),
    (0, -6, "center", "top"),
)
MARKER = 5.0  # points: half a pareto diamond's width, the room a marker takes
LABEL_BOX = {"fc": "white", "ec": "none", "alpha": 0.7, "pad": 0.5}  # legible over lines


def _name_points(ax, points, fontsize: float = 8) -> None:
    """Name points (x, y, name), most important first, without overlap: each name takes the
    first of PLACES that stays inside the axes, clear of other markers, the legends and the
    names placed before it; a name with no such place is left out. Lays the figure out to
    measure text, so it comes last; the names take no part in the layout."""
    points = [(float(x), float(y), str(name)) for x, y, name in points]
    if not points:
        return
    fig = ax.figure
    renderer = _laid_out(fig)
    inside = ax.get_window_extent(renderer)
    r = MARKER * fig.dpi / 72
    centres = ax.transData.transform([(x, y) for x, y, _ in points])
    markers = [Bbox.from_extents(cx - r, cy - r, cx + r, cy + r) for cx, cy in centres]
    legends = [lg.get_window_extent(renderer) for lg in (ax.get_legend(), *fig.legends) if lg]
    taken: list[Bbox] = []
    for i, (x, y, name) in enumerate(points):
        blocked = [*taken, *legends, *(m for j, m in enumerate(markers) if j != i)]
        for dx, dy, ha, va in PLACES:
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points",
                               ha=ha, va=va, fontsize=fontsize, bbox=LABEL_BOX)  # fmt: skip
            text.set_in_layout(False)
            box = text.get_window_extent(renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0
            if fits and box.y1 <= inside.y1 and not any(box.overlaps(b) for b in blocked):
                taken.append(box)
                break
            text.remove()


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
    _set_title(ax, _title(results, f"error EDF by {' / '.join(keys)}"))
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
        marker = "o" if len(models.index) < 2 else None  # one epoch is a point, not a line
        if n > 1:
            ax.plot(models.index, models.to_numpy(), color=color, alpha=0.25, lw=0.8,
                    marker=marker, ms=3)  # fmt: skip
        ax.plot(models.index, models.mean(axis=1).to_numpy(), color=color, marker=marker,
                label=f"{name} (n={n})" if n > 1 else str(name))  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are whole
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (top-1, mean over seeds)")
    fig.legend(loc="outside right upper", fontsize=8, title="towers")
    _set_title(ax, _title(history if results is None else results, "validation accuracy per epoch"))
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
    one_legend(fig, loc="outside right upper", fontsize=8,
               title="implementation / roof" if roofs else "implementation")  # fmt: skip
    fig.suptitle(title, fontsize=10)
    return fig


def one_legend(fig: Figure, **kwargs) -> None:
    """One figure legend of every labelled line in the figure's axes, each label once (axes
    that share their lines would otherwise list them twice)."""
    handles: dict[str, object] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), **kwargs)


def save(
    fig: Figure, stem: Path, formats: Sequence[str] = ("png", "svg"), root: Path | None = None
) -> list[Path]:
    """Write a figure as stem.png and stem.svg (by default), each whole (a temporary file
    renamed) and, with root, never through a link; return the paths."""
    paths = [stem.with_suffix(f".{fmt}") for fmt in formats]
    for path, fmt in zip(paths, formats, strict=True):
        files.write_atomic(path, lambda tmp, f=fmt: fig.savefig(tmp, dpi=150, format=f), root=root)
    return paths
