"""A sweep's report: its tables built from the records, and every plot as PNG and SVG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from towerspace import analysis, files, plots, results
from towerspace.errors import StorageError
from towerspace.status import Status

PLOTS = "plots"


@dataclass(frozen=True)
class Report:
    """What a report wrote and found."""

    figures: list[Path]
    summary: pd.DataFrame
    warnings: list[str]  # damaged records, trials left out


def write_report(
    sweep_dir: Path, out: Path | None = None, tables: results.Tables | None = None
) -> Report:
    """Rebuild the tables of a sweep directory and draw its figures into <folder>/plots/, where
    folder is out if given (nothing is then written in the sweep directory), else sweep_dir.

    A sweep passes the tables it has just written (with their notes) as tables: they are read,
    not written a second time.
    """
    sweep_dir = Path(sweep_dir)
    folder = Path(out) if out is not None else sweep_dir
    if not files.writable(folder) or (
        (folder / PLOTS).is_dir() and not files.writable(folder / PLOTS)
    ):
        hint = (
            ""
            if out is not None
            else "; pass --out FOLDER to write the tables and figures elsewhere"
        )
        raise StorageError(f"{folder}: not writable{hint}")
    if tables is None:
        tables = results.write_tables_noting(sweep_dir, out=out)
    notes = list(tables.notes)
    table, history = pd.read_parquet(tables.results_path), pd.read_parquet(tables.history_path)
    finished = table[table["status"] == Status.FINISHED]
    left_out = analysis.excluded(table)
    if left_out:
        notes.append(f"left out of summaries and plots: {', '.join(left_out)}")
    if finished.empty:
        return Report([], pd.DataFrame(), [*notes, "no finished trials: nothing to plot"])
    figures = {
        "continuum": plots.continuum(table),
        "continuum_position": plots.continuum(table, x="position"),
        "cost": plots.cost(table),
        "pareto_flops": plots.pareto(table, cost="flops"),
        "pareto_throughput": plots.pareto(table, cost="throughput"),
        **_latency_figures(table),
        "edf": plots.edf(table),
        "curves": plots.curves(
            history[history["trial_id"].isin(finished["trial_id"])], results=table
        ),
    }
    paths = [p for name, fig in figures.items()
             for p in plots.save(fig, folder / PLOTS / name, root=folder)]  # fmt: skip
    return Report(paths, analysis.summarize(table), notes)


def _latency_figures(table: pd.DataFrame) -> dict[str, plots.Figure]:
    """Accuracy against measured step time, where the trials measured it."""
    if not table["latency_ms"].notna().any():
        return {}
    return {"pareto_latency": plots.pareto(table, cost="latency")}
