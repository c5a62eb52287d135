"""The command line: `towerspace sweep | estimate | plot | profile | blocks | models` run and cost
tower sweeps, `towerspace spaces | experiments | init` find and copy the shipped files. Each
command imports what it uses when it runs, so --help and --version load no torch."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from towerspace.choices import DEVICES, EXPORT_FORMATS, MATCHES, MIDS, ORDERS, STEMS
from towerspace.errors import UserError
from towerspace.objectstore import is_uri
from towerspace.status import FAILED

if TYPE_CHECKING:  # a command imports what it uses when it runs: --help loads no torch
    import pandas as pd

    from towerspace import results

CONFIRM_HOURS = 24.0  # a sweep estimated above this many device-hours asks before it starts
CONFIRM_ENV = "TOWERSPACE_CONFIRM_HOURS"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (where its help does not say it in words), and
    descriptions with the line breaks they were written with."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        off = action.default is None or action.default is False or action.default == []
        if "default: " in text or off or action.default == argparse.SUPPRESS:  # (0 is a default)
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit with code 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


class _Version(argparse.Action):
    """--version: the installed package's version, read only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"towerspace {version()}")
        parser.exit()


def version() -> str:
    """The version in the installed package's metadata (a bare checkout: the package's own)."""
    from importlib import metadata

    try:
        return metadata.version("towerspace")
    except metadata.PackageNotFoundError:
        import towerspace

        return towerspace.__version__


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a difference in accuracy, a power)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _print_table(table: pd.DataFrame, title: str) -> None:
    import pandas as pd

    print(title)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False))


def cmd_blocks(args: argparse.Namespace) -> int:
    """Cost of one layer at every valid tower count."""
    from towerspace import tables

    table = tables.block_table(
        args.channels, args.size, out_channels=args.out_channels, kernel_size=args.kernel_size,
        stride=args.stride, order=args.order, mid=args.mid,
    )  # fmt: skip
    out = args.out_channels or args.channels
    title = f"TowerConv2d({args.channels}, {out}, {args.kernel_size}) at {args.size}x{args.size}"
    _print_table(table, f"{title}, {args.order}, mid={args.mid} (per image)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Cost of a whole Xception at each point of a tower list, matched or not."""
    from towerspace import tables

    points = tables.parse_points(args.towers)
    table = tables.model_table(
        points, size=args.size, match=args.match, width=args.width, stem=args.stem,
        middle_blocks=args.middle_blocks, num_classes=args.classes, in_chans=args.in_chans,
        order=args.order, mid=args.mid,
    )  # fmt: skip
    matched = f", matched on {args.match}" if args.match != "none" else ""
    _print_table(table, f"Xception width {args.width}, {args.middle_blocks} middle blocks, "
                        f"{args.size}px{matched} (per image)")  # fmt: skip
    return 0


def _experiment(args: argparse.Namespace):
    """The experiment a command names, with its --set overrides, cut down by --smoke."""
    from towerspace import config  # config loads fast; Ray loads with the sweep package only

    overrides = [*(config.SMOKE_OVERRIDES if args.smoke else ()), *args.set]
    cfg = config.load_experiment(args.experiment, overrides)
    return config.smoke(cfg) if args.smoke else cfg


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run an experiment's sweep on Ray Tune and print where its results are."""
    cfg = _experiment(args)
    storage = args.storage or cfg.storage or "runs"
    threshold = _confirm_threshold(args.confirm_above)
    from towerspace import sweep

    if args.resume and args.restart:
        raise UserError("--resume and --restart exclude each other: continue, or start over")

    def finish(outcome) -> None:  # under the sweep's lock, before a store's last upload
        counts = ", ".join(f"{n} {status}" for status, n in sorted(outcome.statuses.items()))
        print(f"\n{cfg.name}: {sum(outcome.statuses.values())} trials ({counts})")
        _print_failures(outcome.results_path)
        _report(outcome.sweep_dir, tables=outcome.tables, shown_as=outcome.uri)

    outcome = sweep.run_sweep(
        cfg, storage=storage, address=args.address, restart=args.restart, resume=args.resume,
        retry_errored=args.retry_errored,  # a resumed sweep was confirmed when it started
        confirm=lambda checked, built: _confirm_cost(checked, args.throughput, threshold,
                                                     yes=args.yes, stdin=sys.stdin, built=built),
        finish=finish,
    )  # fmt: skip
    from towerspace.progress import tensorboard_line

    board = tensorboard_line(outcome.sweep_dir)  # Ray's banner named a staging copy instead
    if board and outcome.uri is None:
        print(board)
    if outcome.unfinished:
        print(f"{cfg.name}: interrupted with {outcome.unfinished} trials unfinished; the same "
              f"command with --resume continues them", file=sys.stderr)  # fmt: skip
        return 130
    return 1 if outcome.failed else 0


def _print_failures(results_path: Path) -> None:
    """One line per trial that failed: its point, seed and error."""
    import pandas as pd

    table = pd.read_parquet(results_path)
    failed = table[table["status"].isin(FAILED)]
    for row in failed.itertuples(index=False):
        print(f"  {row.status:8} towers={row.towers} seed={row.seed} ({row.trial_id}): "
              f"{row.error}")  # fmt: skip


def _confirm_threshold(option: float | None) -> float:
    """Device-hours above which a sweep asks: --confirm-above, else the environment, else 24."""
    if option is not None:
        return option
    text = os.environ.get(CONFIRM_ENV, str(CONFIRM_HOURS))
    try:
        hours = float(text)
    except ValueError:
        hours = -1.0
    if not hours >= 0:
        raise UserError(f"{CONFIRM_ENV}={text}: not allowed; allowed: a number of hours >= 0")
    return hours


def _confirm_cost(
    cfg, throughput: str | None, threshold: float, *, yes: bool, stdin: TextIO, built=None
) -> None:
    """Print a sweep's estimated cost; above the threshold, ask on a terminal or refuse.
    `built`: the models the sweep's checks built (estimate.MetaModels), reused."""
    from towerspace import estimate

    sizes = built.sizes if built is not None else estimate.sizes_or_given(cfg)
    table = estimate.cost_table(cfg, sizes, built)
    if throughput is not None:
        rates = estimate.rates_for(table, estimate.read_throughput(throughput))
        table = estimate.add_hours(table, cfg, rates)
    print(f"{cfg.name}: estimate: {estimate.summary_line(table, cfg)}", flush=True)
    hours = estimate.total_hours(table, cfg)
    hours = estimate.lower_bound_hours(table, cfg) if hours is None else hours
    if yes or hours <= threshold:
        return
    spent = f"{cfg.name}: {estimate.number(hours)} {estimate.device_kind(cfg).upper()}-hours"
    if not stdin.isatty():
        raise UserError(f"{spent} is above the confirmation threshold of {threshold:g} "
                         f"(--confirm-above, {CONFIRM_ENV}) and stdin is not a terminal to ask "
                         f"on; pass --yes to launch")  # fmt: skip
    print(f"{spent} is above {threshold:g}: launch? [y/N] ", end="", flush=True)
    if stdin.readline().strip().lower() not in ("y", "yes"):
        raise UserError(f"{cfg.name}: not launched (answered no)")


def cmd_estimate(args: argparse.Namespace) -> int:
    """Cost of every point of an experiment before it runs: a table, totals and a CSV."""
    from towerspace import estimate

    if args.measure and args.throughput:
        raise UserError("--measure and --throughput exclude each other: time the steps here, "
                         "or take the figures from a file")  # fmt: skip
    _check_device(args.device)
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise UserError(f"--out {out}: {out.parent} is not a folder")
    cfg = _experiment(args)
    sizes = estimate.sizes_or_given(cfg, args.train_images, args.classes)
    rates = estimate.read_throughput(args.throughput) if args.throughput else None
    table = estimate.cost_table(cfg, sizes)
    if args.measure:
        measured = estimate.measure(cfg, sizes, args.device)
        table = estimate.add_hours(table, cfg, list(measured["images_per_s"]))
        if "peak_memory_mb" in measured:
            table["peak_memory_mb"] = measured["peak_memory_mb"].to_numpy()
    elif rates is not None:
        table = estimate.add_hours(table, cfg, estimate.rates_for(table, rates))
    if args.gpu_price is not None and "gpu_hours" in table:
        table["cost_usd"] = table["gpu_hours"] * args.gpu_price
    _print_estimate(table, cfg, sizes, args)
    out = out or Path(f"{cfg.name}_estimate.csv")
    table.to_csv(out, index=False)
    print(f"wrote: {out}")
    return 0


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here (allowed: cpu)")


def _print_estimate(table: pd.DataFrame, cfg, sizes, args: argparse.Namespace) -> None:
    import pandas as pd

    from towerspace import estimate
    from towerspace.train import choose_device

    res, space, train = cfg.resources, cfg.space, cfg.train
    seeds = f"{len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''}"
    rows = f"{len(table)} points" if space.searcher == "grid" else "the base model"
    each = f"{seeds} x {space.num_samples} samples" if space.num_samples > 1 else seeds
    steps = f", at most {train.max_steps} steps of" if train.max_steps else ","
    print(f"{cfg.name}: space {space.name} ({space.searcher}), {rows} x {each}; "
          f"{sizes.train_images:,} train images x {train.epochs} epochs{steps} batch "
          f"{train.batch_size}, {sizes.image_size} px; per trial {res.workers} x "
          f"({res.gpus:g} GPU, {res.cpus:g} CPUs); training FLOPs = 3x forward")  # fmt: skip
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False, float_format=estimate.number))
    cost = f", {estimate.number(table['cost_usd'].sum())} USD" if "cost_usd" in table else ""
    print(f"total: {estimate.summary_line(table, cfg)}{cost}")
    if "images_per_s" not in table:
        print(estimate.hours_hint())
    elif table["images_per_s"].isna().any():
        missing = ", ".join(table.loc[table["images_per_s"].isna(), "towers"].astype(str))
        print(f"no throughput in {args.throughput} for towers: {missing} (their hours are empty)")
    if args.measure:
        device = choose_device(args.device).type
        kind = estimate.device_kind(cfg)
        if device != kind.replace("gpu", "cuda"):
            print(f"note: measured on {device}, but the trials take {kind.upper()}s: the hours "
                  f"are at {device} speed")  # fmt: skip
        print(f"measured: {estimate.TIMED_STEPS} training steps per point after "
              f"{estimate.WARMUP_STEPS} warm-up steps, on {device}; memory_mb_est is a "
              f"formula, peak_memory_mb (CUDA only) is measured")  # fmt: skip
        if cfg.data.name == "imagefolder" and args.train_images is None:
            _print_loader_speed(cfg, args.device)


def _print_loader_speed(cfg, device: str) -> None:
    """The data path alone: what the DataLoader workers of one trial deliver."""
    import dataclasses

    from towerspace import data as datasets

    workers = datasets.loader_workers(cfg.resources.cpus)
    data_cfg = dataclasses.replace(cfg.data, stream="always")
    bundle = datasets.load(data_cfg, device=device, num_workers=workers)
    speed = datasets.loader_throughput(bundle.train, cfg.train.batch_size)
    print(f"data path: {speed['workers']} DataLoader workers deliver "
          f"{speed['images_per_s']:,.0f} train images/s "
          f"({speed['images_per_s_per_worker']:,.0f} per worker)")  # fmt: skip


def _report(
    sweep_dir: Path,
    out: Path | None = None,
    tables: results.Tables | None = None,
    shown_as: str | None = None,
) -> None:
    """Write a sweep's report and print its summary and files (shown_as: the sweep's URI, for
    a staging folder that is uploaded there)."""
    import pandas as pd

    from towerspace.report import write_report

    report = write_report(sweep_dir, out=out, tables=tables)
    for note in report.warnings:
        print(f"towerspace: warning: {note}", file=sys.stderr)
    if not report.summary.empty:
        columns = ["towers", "n", "mean", "std", "asin_ci_low", "asin_ci_high", "params", "flops",
                   "images_per_s", "latency_ms", "pareto_latency", "failed"]  # fmt: skip
        if report.summary.get("latency_ms", pd.Series(dtype=float)).isna().all():
            columns = [c for c in columns if c not in ("latency_ms", "pareto_latency")]
        from towerspace.analysis import GROUPS

        varied = [g for g in GROUPS if g in report.summary and report.summary[g].nunique() > 1]
        columns[1:1] = varied  # the curves' own keys (residual, order, ...) beside the point
        rows = report.summary[[c for c in columns if c in report.summary]].round(4)
        interval = report.summary.attrs["interval"]
        _print_table(rows, f"final validation accuracy over seeds ({interval}), by towers:")
    from towerspace.files import shown

    where = shown(out or sweep_dir)
    if shown_as is not None and out is None:  # the files as they are on the store
        where = shown_as
    print(f"results: {where}/results.parquet\nhistory: {where}/history.parquet")
    pngs = [shown(p) for p in report.figures if p.suffix == ".png"]
    if shown_as is not None and out is None:
        pngs = [f"{where}/{p.relative_to(sweep_dir).as_posix()}" for p in report.figures
                if p.suffix == ".png"]  # fmt: skip
    print("figures:\n" + "\n".join(f"  {p}" for p in pngs))


def cmd_plot(args: argparse.Namespace) -> int:
    """Rebuild a sweep's tables and draw its figures (on a store: uploaded there)."""
    out = Path(args.out) if args.out else None
    if is_uri(args.results_dir):
        from towerspace.objectstore import staged

        with staged(args.results_dir, write=out is None) as sweep_dir:
            _report(sweep_dir, out, shown_as=args.results_dir.rstrip("/"))
        return 0
    sweep_dir = Path(args.results_dir)
    if not (sweep_dir / "records").is_dir():
        raise UserError(f"{sweep_dir}: no sweep here (no records/ folder)")
    _report(sweep_dir, out)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Time the block at every tower count and implementation; table and plot."""
    import torch

    from towerspace import plots, profile

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        return _profile_model(args)
    towers = [int(t) for t in args.towers.split(",")] if args.towers else None
    impls = args.impls.split(",") if args.impls else None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    table = profile.block_speed(
        args.channels, args.size, batch=args.batch, towers=towers, impls=impls,
        stride=args.stride, mid=args.mid, folded=not impls or "as_conv2d" in impls,
        backward=not args.forward_only, channels_last=args.channels_last,
        dtype=dtype[args.dtype], device=args.device, repeats=args.repeats,
    )  # fmt: skip
    roofs = profile.machine_roofs(args.device, dtype[args.dtype])
    table = profile.with_roof_efficiency(table, roofs)
    mode = "forward" if args.forward_only else "forward+backward"
    title = (f"TowerConv2d({args.channels}, {args.channels}) at {args.size}x{args.size}, batch "
             f"{args.batch}, {mode}, {args.dtype}, {'NHWC' if args.channels_last else 'NCHW'}, "
             f"{args.device}, {torch.get_num_threads()} threads")  # fmt: skip
    _print_table(table.drop(columns=["flops", "bytes"]).round(3), title)
    csv = _write_table(table, roofs, Path(args.out))
    print("wrote:", csv, *plots.save(plots.speed(table, roofs, title=title), Path(args.out)))
    return 0


def _profile_model(args: argparse.Namespace) -> int:
    import torch

    from towerspace import plots, profile, tables

    points = tables.parse_points(args.towers or "1,2,4,8,16,depthwise")
    impl = (args.impls or "native").split(",")[0]
    table = profile.model_speed(
        points, size=args.size, batch=args.batch, impl=impl, device=args.device,
        repeats=args.repeats, width=args.width, middle_blocks=args.middle_blocks,
        stem="small" if args.size <= 64 else "imagenet", match=args.match,
    )  # fmt: skip
    roofs = profile.machine_roofs(args.device)
    table = profile.with_roof_efficiency(table, roofs)
    title = (f"Xception width {args.width}, {args.middle_blocks} middle blocks, {args.size}px, "
             f"batch {args.batch}, training step, impl={impl}, match={args.match}, "
             f"{args.device}, {torch.get_num_threads()} threads")  # fmt: skip
    _print_table(table.drop(columns=["flops", "bytes"]).round(3), title)
    csv = _write_table(table, roofs, Path(args.out))
    fig = profile.model_speed_figure(table, roofs, title=title)
    print("wrote:", csv, *plots.save(fig, Path(args.out)))
    return 0


def _write_table(table: pd.DataFrame, roofs: dict[str, float], out: Path) -> Path:
    """Print the machine's roofs and write the profile table as out.csv."""
    print(f"machine: dense 3x3 conv {roofs['dense_conv_gflops_per_s']:.1f} GFLOP/s, copy "
          f"bandwidth {roofs['bandwidth_gb_per_s']:.1f} GB/s")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False)
    return out.with_suffix(".csv")


def cmd_spaces(args: argparse.Namespace) -> int:
    """The search spaces an experiment can name, with where each comes from."""
    from towerspace import catalog

    _print_entries(catalog.SPACES, catalog.user_space_dirs(),
                   "search spaces, for an experiment's space field")  # fmt: skip
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    """The experiments `towerspace sweep NAME` runs, with where each comes from."""
    from towerspace import catalog

    _print_entries(catalog.EXPERIMENTS, catalog.USER_EXPERIMENT_DIRS,
                   "experiments, for towerspace sweep NAME")  # fmt: skip
    return 0


def _print_entries(kind: str, user_dirs: Sequence[Path], title: str) -> None:
    """One line per name: the name, where it comes from, and its description."""
    from towerspace import catalog
    from towerspace.files import shown

    entries = catalog.entries(kind, user_dirs)
    folders = " and ".join(f"{d}/" for d in user_dirs)
    print(f"{title} (found in {folders} first, then in the package):")
    origins = [e.origin + (" (over the package's)" if e.shadows else "") for e in entries]
    name_width = max((len(e.name) for e in entries), default=0)
    origin_width = max(map(len, origins), default=0)
    for entry, origin in zip(entries, origins, strict=True):
        print(f"  {entry.name:<{name_width}}  {origin:<{origin_width}}  {entry.description}")
    print(f"package: {shown(catalog.shipped_dir(kind))}")


def cmd_init(args: argparse.Namespace) -> int:
    """Copy an experiment into a folder to edit; never over an existing file."""
    from towerspace import catalog
    from towerspace.files import shown
    from towerspace.yamlfile import read_mapping

    source = catalog.experiment_file(args.experiment)
    folder = Path(args.dir)
    target = folder / source.name
    if folder.exists() and not folder.is_dir():
        raise UserError(f"init: {folder}: not a folder")
    if os.path.lexists(target):
        raise UserError(f"init: {target} exists already; nothing written (edit it, or name "
                        f"another folder)")  # fmt: skip
    read_mapping(source)  # a YAML mapping, or one line that says why not
    text = source.read_bytes()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        file = target.open("xb")  # never over a file or through a link made meanwhile
    except FileExistsError:
        raise UserError(f"init: {target} exists already; nothing written") from None
    except OSError as err:  # a folder we may not write, a full disk
        raise UserError(f"init: {target}: not written: {err.strerror}") from None
    with file:
        try:
            file.write(text)
        except BaseException:
            target.unlink()
            raise
    package = catalog.shipped_dir(catalog.EXPERIMENTS)
    made_from = (f"the package's {source.stem}" if source.resolve().parent == package.resolve()
                 else str(shown(source)))  # fmt: skip
    print(f"wrote {shown(target)}, a copy of {made_from}\nedit it, then run it: towerspace "
          f"sweep {shown(target)} (with --smoke first: the whole path in seconds)")  # fmt: skip
    return 0


DESCRIPTION = """\
towerspace makes a convolution's tower count a knob: split the channels of a k x k convolution
into towers and follow it with a 1x1, and 1 tower is a regular convolution, a few are Inception
modules, one per channel is a depthwise separable convolution (Xception's continuum). It builds
budget-matched models at any point of that continuum, sweeps them on Ray Tune, and writes
results tables and figures.

start here:
  towerspace experiments                       the shipped experiments (and yours)
  towerspace sweep digits_continuum --smoke    the demo's whole path, in seconds
  towerspace sweep digits_continuum            the demo: 14 trials, minutes on a CPU
  towerspace init digits_continuum myproject   a copy of it to edit
"""
EXPERIMENT_HELP = ("an experiment file, or the name of one (towerspace experiments lists them), "
                   "e.g. {}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The towerspace command line."""
    parser = _Parser(prog="towerspace", description=DESCRIPTION)
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="COMMAND")  # fmt: skip

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.")

    sweep = command("sweep", "run an experiment's tower sweep on Ray Tune")
    sweep.add_argument("experiment", help=EXPERIMENT_HELP.format("digits_continuum"))
    sweep.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set train.epochs=1 (repeatable; default: none)",
    )
    sweep.add_argument(
        "--storage",
        default=None,
        help="folder for sweeps, or a URI (s3://bucket/prefix, gs://, hdfs://, file://: see "
        "docs/scaling.md) (default: the experiment's storage, else ./runs)",
    )
    sweep.add_argument(
        "--address",
        default=None,
        help="a running Ray cluster (default: RAY_ADDRESS, else a local Ray)",
    )
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep in --storage: finished trials are kept, "
        "unfinished ones continue from their last epoch checkpoint",
    )
    sweep.add_argument(
        "--retry-errored",
        action="store_true",
        help="with --resume: also retry trials that ended in error, from their "
        "last checkpoint (default: keep them as errors)",
    )
    sweep.add_argument("--restart", action="store_true",
                       help="replace an existing sweep of the same name")  # fmt: skip
    sweep.add_argument(
        "--smoke",
        action="store_true",
        help="tiny, synthetic-data, CPU-only run of the experiment (seconds)",
    )
    sweep.add_argument(
        "--yes",
        action="store_true",
        help="launch without asking, whatever the estimated cost",
    )
    sweep.add_argument(
        "--confirm-above",
        type=_non_negative_float,
        default=None,
        metavar="HOURS",
        help=f"ask before launching a sweep estimated above this many device-hours (default: "
        f"{CONFIRM_ENV}, else {CONFIRM_HOURS:g}); without a terminal, refuse instead",
    )
    sweep.add_argument(
        "--throughput",
        default=None,
        metavar="FILE.csv",
        help="images/s per tower count (columns towers,images_per_s) for the estimate's hours "
        "(default: a lower bound from FLOPs)",
    )
    sweep.set_defaults(func=cmd_sweep)

    est = command("estimate", "an experiment's cost per point, before it runs")
    est.add_argument("experiment", help=EXPERIMENT_HELP.format("imagenet_xception"))
    est.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, as for sweep (repeatable; default: none)")  # fmt: skip
    est.add_argument("--smoke", action="store_true", help="the experiment as --smoke runs it")
    est.add_argument(
        "--measure",
        action="store_true",
        help="time a few training steps of every point here (after a warm-up) for images/s",
    )
    est.add_argument(
        "--throughput",
        default=None,
        metavar="FILE.csv",
        help="images/s per tower count measured elsewhere (columns towers,images_per_s; "
        "default: none, so hours only with --measure)",
    )
    est.add_argument("--device", choices=("auto", *DEVICES[1:]), default="auto",
                     help="--measure: where to time the steps (auto: cuda if present)")  # fmt: skip
    est.add_argument("--out", default=None, metavar="FILE.csv",
                     help="the table as CSV (default: <name>_estimate.csv)")  # fmt: skip
    est.add_argument("--gpu-price", type=_non_negative_float, default=None, metavar="USD",
                     help="price of a GPU-hour: adds a cost column (default: none)")  # fmt: skip
    est.add_argument("--train-images", type=_positive_int, default=None,
                     help="imagefolder not here: train images (ImageNet-1k: 1281167; "
                     "default: counted in data.root)")  # fmt: skip
    est.add_argument("--classes", type=_positive_int, default=None,
                     help="imagefolder not here: classes (ImageNet-1k: 1000; default: "
                     "counted in data.root)")  # fmt: skip
    est.set_defaults(func=cmd_estimate)

    plot = command("plot", "rebuild a sweep's tables and draw its figures")
    plot.add_argument("results_dir", help="a sweep's folder, e.g. runs/digits_continuum, or "
                      "its URI (the figures are uploaded there)")  # fmt: skip
    plot.add_argument("--out", default=None, metavar="FOLDER",
                      help="write the tables and figures there, for a sweep folder you cannot "
                      "or should not write (default: the sweep's folder)")  # fmt: skip
    plot.set_defaults(func=cmd_plot)

    prof = command("profile", "time the block at every tower count and impl")
    prof.add_argument("--channels", type=_positive_int, default=256,
                      help="the block's input and output channels")  # fmt: skip
    prof.add_argument("--size", type=_positive_int, default=16, help="input height = width")
    prof.add_argument("--batch", type=_positive_int, default=32, help="images per timed batch")
    prof.add_argument("--stride", type=_positive_int, default=1, help="the k x k conv's stride")
    prof.add_argument(
        "--towers",
        default=None,
        help="comma list (default: every divisor; with --model 1,2,4,8,16,depthwise)",
    )
    prof.add_argument(
        "--impls",
        default=None,
        help="comma list of implementations, as_conv2d for the folded dense conv "
        "(default: the candidates per count and as_conv2d)",
    )
    prof.add_argument(
        "--mid", choices=MIDS, default="none", help="between the two convs (none: as_conv2d row)"
    )
    prof.add_argument("--forward-only", action="store_true", help="time inference only")
    prof.add_argument("--channels-last", action="store_true", help="NHWC inputs and weights")
    prof.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                      help="inputs and weights")  # fmt: skip
    prof.add_argument("--device", default="cpu", help="where to time: cpu, cuda, cuda:1, ...")
    prof.add_argument("--threads", type=_positive_int, default=None,
                      help="torch's CPU threads (default: torch's own choice)")  # fmt: skip
    prof.add_argument("--repeats", type=_positive_int, default=5,
                      help="interleaved timed repeats per point (the median is shown)")  # fmt: skip
    prof.add_argument("--out", default="profile", help="output stem for .csv, .png and .svg")
    prof.add_argument(
        "--model",
        action="store_true",
        help="time whole Xception training steps per tower spec instead",
    )
    prof.add_argument("--width", type=float, default=0.25, help="--model: width multiplier")
    prof.add_argument("--middle-blocks", type=int, default=2, help="--model: middle blocks")
    prof.add_argument("--match", choices=MATCHES, default="params", help="--model: budget")
    prof.set_defaults(func=cmd_profile)

    blocks = command("blocks", "one layer's cost at every valid tower count")
    blocks.add_argument("--channels", type=_positive_int, default=728, help="input channels")
    blocks.add_argument("--out-channels", type=_positive_int, default=None,
                        help="output channels (default: --channels)")  # fmt: skip
    blocks.add_argument("--size", type=_positive_int, default=19, help="input height = width")
    blocks.add_argument("--kernel-size", type=_positive_int, default=3,
                        help="the spatial conv's kernel size k")  # fmt: skip
    blocks.add_argument("--stride", type=_positive_int, default=1, help="the k x k conv's stride")
    blocks.add_argument("--order", choices=ORDERS, default="spatial_first",
                        help="which conv comes first")  # fmt: skip
    blocks.add_argument("--mid", choices=MIDS, default="none", help="between the two convs")
    blocks.set_defaults(func=cmd_blocks)

    models = command("models", "a whole Xception's cost across tower counts")
    models.add_argument(
        "--towers",
        default="1,2,4,8,16,depthwise",
        help="comma list of counts, regular, depthwise, gw<width>, t=<position>",
    )
    models.add_argument("--width", type=float, default=1.0, help="width multiplier")
    models.add_argument("--middle-blocks", type=_positive_int, default=8,
                        help="middle-flow blocks (the paper: 8)")  # fmt: skip
    models.add_argument("--stem", choices=STEMS, default="imagenet",
                        help="small: padded, stride 1, for 32 px and smaller")  # fmt: skip
    models.add_argument("--size", type=_positive_int, default=299, help="input height = width")
    models.add_argument("--classes", type=_positive_int, default=1000, help="output classes")
    models.add_argument("--in-chans", type=_positive_int, default=3, help="input channels")
    models.add_argument("--order", choices=ORDERS, default="spatial_first",
                        help="which conv comes first")  # fmt: skip
    models.add_argument("--mid", choices=MIDS, default="none", help="between the two convs")
    models.add_argument(
        "--match",
        choices=MATCHES,
        default="none",
        help="solve widths so every point costs what depthwise costs",
    )
    models.set_defaults(func=cmd_models)

    spaces = command("spaces", "list the search spaces an experiment can name")
    spaces.set_defaults(func=cmd_spaces)
    experiments = command("experiments", "list the experiments towerspace sweep NAME runs")
    experiments.set_defaults(func=cmd_experiments)
    init = command("init", "copy an experiment into a folder, to edit")
    init.add_argument("experiment", nargs="?", default="digits_continuum",
                      help=EXPERIMENT_HELP.format("cifar10_continuum"))  # fmt: skip
    init.add_argument("dir", nargs="?", default=".", metavar="DIR",
                      help="the folder to write <name>.yaml into (made if missing; an existing "
                      "file is never replaced)")  # fmt: skip
    init.set_defaults(func=cmd_init)
    _add_status_parser(command)
    _add_plan_parser(command)
    _add_export_parser(command)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    """Seeds per point that resolve an accuracy difference, from a sweep's (or a pilot's) seeds."""
    import pandas as pd

    from towerspace import plan, results

    sweep_dir = args.sweep_dir if is_uri(args.sweep_dir) else Path(args.sweep_dir)
    if not is_uri(sweep_dir) and not (sweep_dir / results.RECORDS).is_dir():
        raise UserError(f"{sweep_dir}: no sweep here (no {results.RECORDS}/ folder)")
    table, lines = plan.plan(results.load(sweep_dir), args.delta, reference=args.reference,
                             power=args.power)  # fmt: skip
    shown = table[[c for c in plan.COLUMNS if c in table]]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("\n".join(lines))
    return 0


def _add_plan_parser(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    plan = command("plan", "seeds per point that resolve an accuracy difference, and their cost")
    plan.add_argument("sweep_dir", help="a sweep (or pilot) with 2 or more seeds per point "
                      "(a folder or a URI)")  # fmt: skip
    plan.add_argument("--delta", type=_fraction, required=True,
                      help="the true difference in accuracy to detect, e.g. 0.005")  # fmt: skip
    plan.add_argument("--power", type=_fraction, default=0.8,
                      help="chance of detecting it (default: 0.8)")  # fmt: skip
    plan.add_argument("--reference", default=None,
                      help="the point every other is paired with (default: depthwise, or the "
                      "finished point nearest it)")  # fmt: skip
    plan.set_defaults(func=cmd_plan)


def cmd_status(args: argparse.Namespace) -> int:
    """A sweep's progress from its folder, without Ray and writing nothing."""
    import dataclasses
    import json

    from towerspace import progress

    if is_uri(args.sweep_dir):
        from towerspace.objectstore import SweepStore, staged

        store = SweepStore(args.sweep_dir, Path("."), what=args.sweep_dir)  # its lease
        with staged(args.sweep_dir) as sweep_dir:
            report = progress.read_progress(sweep_dir, holder=lambda _: store.holder())
        report = dataclasses.replace(report, sweep_dir=args.sweep_dir.rstrip("/"))
    else:
        report = progress.read_progress(Path(args.sweep_dir))
    print(
        json.dumps(report.to_json(), indent=1) if args.json else "\n".join(progress.lines(report))
    )
    return 0


def _add_status_parser(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    status = command(
        "status",
        "a sweep's progress: trials by status, best so far, elapsed, ETA (reads its folder "
        "only, without Ray: safe while it runs)",
    )
    status.add_argument("sweep_dir", help="a sweep's folder, e.g. runs/digits_continuum, or its "
                        "URI, e.g. s3://bucket/runs/digits_continuum")  # fmt: skip
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)


def cmd_export(args: argparse.Namespace) -> int:
    """An experiment's model, or a sweep trial's checkpoint, as ONNX or a torch.export program."""
    from towerspace import export

    try:
        line = export.export_command(
            args.source, args.out, fmt=args.format, trial=args.trial, sets=args.set, seed=args.seed
        )
    except export.ExportMismatch as err:  # not the input's fault; nothing was written
        print(f"towerspace: error: {err}", file=sys.stderr)
        return 1
    print(line)
    return 0


def _add_export_parser(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    export = command(
        "export",
        "an experiment's model, or a sweep trial's checkpoint, as ONNX or a torch.export "
        "program, checked against eager PyTorch",
    )
    export.add_argument(
        "source",
        help="an experiment file (its model, random weights), or a sweep's folder (with --trial)",
    )
    export.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="the file to write, .onnx or .pt2 (written whole, after the check, or not at all)",
    )
    export.add_argument(
        "--trial",
        default=None,
        metavar="ID",
        help="a sweep's trial (records/ID.json): its newest complete checkpoint (default: none, "
        "the source is an experiment file)",
    )
    export.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an experiment file's field, e.g. --set model.towers=4 (repeatable; default: none)",
    )
    export.add_argument(
        "--format", choices=EXPORT_FORMATS, default=None, help="default: from --out's suffix"
    )
    export.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the random weights of an experiment's model, and the check's random inputs",
    )
    export.set_defaults(func=cmd_export)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line (exit 2), bugs their traceback (exit 1)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        sys.stderr.close()
        return 0
    except UserError as err:  # config, data, storage and argument errors are worded for users
        if os.environ.get("TOWERSPACE_DEBUG"):
            raise
        print(f"towerspace: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("towerspace: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # anything else is a bug: say so, with its traceback
        traceback.print_exc()
        problem = f"{type(err).__name__}: {_first_line(err)}"
        print(f"towerspace: internal error (a bug, not your input): {problem}; please report "
              f"it with the traceback above", file=sys.stderr)  # fmt: skip
        return 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


if __name__ == "__main__":
    raise SystemExit(main())
