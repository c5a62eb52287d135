"""Experiments: the schema of an experiment file, loaded and checked once, set field by field for
a trial's point, cut down for smoke runs; the one place an experiment's errors are worded."""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from towerspace.catalog import experiment_file, user_space_dirs
from towerspace.data import DataConfig
from towerspace.errors import ConfigError
from towerspace.models import ModelConfig
from towerspace.models.builders import has_width_knob, split_builder, syntax_problem
from towerspace.schema import (
    build,
    did_you_mean,
    fail,
    field_hint,
    field_paths,
    overlaps,
    rebuild,
    set_path,
    show,
    split_path,
)
from towerspace.spaces import (
    RANGE_KINDS,
    Domain,
    SpaceConfig,
    domain_points,
    param_points,
    read_space,
)
from towerspace.towers import TowerSpec
from towerspace.train import TrainConfig
from towerspace.yamlfile import load_yaml, read_mapping

OVERRIDES = "model.overrides."  # a tower override's site prefix may itself hold dots
# what a trial's point never sets
NOT_SPACE_PARAMS = ("name", "space", "seeds", "source", "retries", "faults")
# one folder name: no separators, no '.', '..' or hidden folder, no leading '-' (an option)
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
NAME_RULE = ("a sweep name is one folder name: letters, digits, '_', '-' and '.', not starting "
             "with '.' or '-' (at most 100 characters)")  # fmt: skip
SEED_MAX = 2**32 - 1  # NumPy's and torch's common seed range: 0 to this


@dataclass(frozen=True)
class ResourcesConfig:
    """What one trial takes from the Ray cluster: `workers` data-parallel workers, each `cpus`
    CPUs and `gpus` GPUs (a single-worker trial is one worker)."""

    cpus: float = field(default=1.0, metadata={"gt": 0.0})  # per worker; also its torch threads
    gpus: float = field(default=0.0, metadata={"min": 0.0})  # per worker; fractions pack trials
    workers: int = field(default=1, metadata={"min": 1, "max": 1024})  # >1: Ray Train DDP


@dataclass(frozen=True)
class SchedulerConfig:
    """Trial scheduling: every trial to the end (fifo) or ASHA early stopping.

    A file may write `scheduler: asha` for `scheduler: {name: asha}`.
    """

    name: str = field(default="fifo", metadata={"choices": ("fifo", "asha")})  # asha: stops early
    grace_period: int = field(default=1, metadata={"min": 1})  # asha: epochs before a stop
    reduction_factor: int = field(default=2, metadata={"min": 2})  # asha: keep 1/this per rung


def _scheduler(data: Any, where: str, path: str) -> SchedulerConfig:
    """The scheduler field, where `asha` is short for `{name: asha}`."""
    return build(SchedulerConfig, {"name": data} if isinstance(data, str) else data, where, path)


@dataclass(frozen=True)
class LatencyConfig:
    """The measured step time (latency_ms): the sum of the model's layers' times on the trial's
    device, each distinct layer timed once per sweep (towerspace.latency)."""

    measure: bool = False  # also without a space that searches on latency_ms
    mode: str = field(default="train", metadata={"choices": ("train", "eval")})  # eval: forward
    batch: int | None = field(default=None, metadata={"min": 1})  # None: a worker's train batch


@dataclass(frozen=True)
class FaultConfig:
    """For testing a sweep's fault handling: make chosen trials fail on purpose (off: no kind)."""

    # raise: the trial raises; diverge: its weights turn NaN, so its loss does; oom: it asks
    # its device for more memory than any has (the allocator's own out-of-memory error)
    kind: str | None = field(default=None, metadata={"choices": ("raise", "diverge", "oom")})
    epoch: int = field(default=1, metadata={"min": 1})  # the epoch at which the fault strikes
    times: int = field(default=1, metadata={"min": 1})  # attempts that fail before one passes
    point: dict[str, Any] = field(default_factory=dict)  # which trials: {model.towers: 4, seed: 0}


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: data, model, recipe, search space, seeds and resources."""

    name: str  # names the sweep's folder
    space: SpaceConfig  # by name (a file in search_spaces/, or the package's), or inline
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    seeds: tuple[int, ...] = (0,)  # every point is repeated once per seed
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig,
                                       metadata={"parse": _scheduler})  # fmt: skip
    storage: str | None = None  # folder or URI (s3://bucket/runs) for sweeps; None: the CLI default
    retries: int = field(default=0, metadata={"min": 0})  # a raising trial is retried this often
    latency: LatencyConfig = field(default_factory=LatencyConfig)  # measured when searched on
    faults: FaultConfig = field(default_factory=FaultConfig)  # for testing only
    source: str = ""  # the file it was loaded from (filled by the loader)


# ---------------------------------------------------------------- dotted paths


def _known_path(key: str) -> bool:
    """Whether a dotted path names an experiment field, or a tower override's site."""
    overrides = key.startswith(OVERRIDES) and len(key) > len(OVERRIDES)
    return overrides or key in field_paths(ExperimentConfig)


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set an experiment's dotted path in its plain form (a site prefix stays one key)."""
    set_path(raw, split_path(ExperimentConfig, key), value)


# ---------------------------------------------------------------- files and overrides


def parse_override(text: str) -> tuple[str, Any]:
    """('train.epochs', 1) from 'train.epochs=1'; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value")
    key, _, value = text.partition("=")
    key = key.strip()
    shown = text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"
    if not _known_path(key) and not key.startswith("space."):
        hint = did_you_mean(key, field_paths(ExperimentConfig))
        raise ConfigError(f"--set {shown}: unknown field{'; ' + hint.strip() if hint else ''}")
    try:
        return key, load_yaml(value, f"--set {shown}", lines="\n" in value)
    except yaml.YAMLError:
        raise ConfigError(f"--set {shown}: the value is not valid YAML") from None


def load_space(
    name_or_path: str | Path, search_dirs: Sequence[str | Path] = ("search_spaces",)
) -> SpaceConfig:
    """A search space by name (looked up in search_dirs, then in the package's) or by its .yaml
    path, checked against the experiment's fields."""
    dirs = [Path(d) for d in search_dirs]
    raw, space_file = read_space(str(name_or_path), dirs, "")
    space = build(SpaceConfig, raw, space_file)
    _check_params(space, space_file)
    return space


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read, override, validate and resolve an experiment file (a path, or a bare name found by
    catalog.experiment_file); nothing is written."""
    path = experiment_file(path)
    raw = read_mapping(path)
    if isinstance(raw.get("scheduler"), str):
        raw["scheduler"] = {"name": raw["scheduler"]}  # so --set scheduler.x keeps the name
    space_sets = []
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("space."):
            space_sets.append((key, value))
        else:
            _set(raw, key, value)
    if "space" not in raw:
        fail(str(path), "space", "missing (required)")
    if isinstance(raw["space"], Mapping):
        space_raw, space_file = {"name": "inline", **raw["space"]}, str(path)
    else:
        space_raw, space_file = read_space(raw["space"], user_space_dirs(path), str(path))
    resolved = {**raw, "space": space_raw}
    for key, value in space_sets:
        _set(resolved, key, value)
    return _validate(resolved, str(path), space_file)


# ---------------------------------------------------------------- checks across fields


def _check_name(where: str, name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        shown = repr(name) if len(name) <= 100 else f"{name[:40]!r}... ({len(name):,} characters)"
        fail(where, "name", f"{shown} is not allowed; {NAME_RULE}")


def _check_seeds(where: str, seeds: tuple[int, ...], split_seed: int) -> None:
    if not seeds:
        fail(where, "seeds", "needs at least one seed")
    each = {f"seeds[{i}]": seed for i, seed in enumerate(seeds)}
    for path, seed in {**each, "data.split_seed": split_seed}.items():
        if not 0 <= seed <= SEED_MAX:
            fail(where, path, f"{seed} is out of range; allowed: 0 to {SEED_MAX}")
    if len(set(seeds)) != len(seeds):
        fail(where, "seeds", f"{list(seeds)} repeats a seed")


def _check_grace(where: str, scheduler: str, grace_period: int, epochs: int) -> None:
    if scheduler == "asha" and grace_period > epochs:
        fail(where, "scheduler.grace_period", f"{grace_period} is more than train.epochs "
                                              f"({epochs})")  # fmt: skip


def _check_workers(where: str, workers: int, gpus: float, batch_size: int) -> None:
    """Data-parallel trials: whole GPUs per worker, and a global batch that splits evenly."""
    if workers == 1:
        return
    if gpus not in (0, 1):
        fail(where, "resources.gpus", f"{show(gpus)} per worker with workers={workers}; "
                                      f"data-parallel workers each take one whole GPU or none "
                                      f"(allowed: 0, 1)")  # fmt: skip
    if batch_size % workers:
        fail(where, "train.batch_size", f"{batch_size} does not split evenly over "
                                        f"resources.workers={workers} (the global batch is "
                                        f"divided among the workers)")  # fmt: skip


def _check_towers(where: str, towers: Any, reference: Any, overrides: dict[str, Any]) -> None:
    specs = {"model.towers": towers, "model.reference": reference}
    specs |= {f"{OVERRIDES}{k}": v for k, v in overrides.items()}
    for path, spec in specs.items():
        try:
            TowerSpec.parse(spec)
        except ValueError as err:
            fail(where, path, str(err))


def _check_model(where: str, name: str, builder: str | None, match: str, width: float) -> None:
    """The builder a custom model needs, and no budget matching without a width knob."""
    if name == "custom" and builder is None:
        fail(where, "model.builder", "missing; model.name 'custom' needs one: "
                                     "'path/to/file.py:function'")  # fmt: skip
    if name != "custom" and builder is not None:
        fail(where, "model.builder", f"{show(builder)} is only used with model.name 'custom' "
                                     f"(got {show(name)})")  # fmt: skip
    if builder is not None:
        try:
            path, _ = split_builder(builder)
        except ValueError as err:
            fail(where, "model.builder", str(err))
        if not path.is_file():
            fail(where, "model.builder", f"{show(builder)}: no such file {path} (relative to "
                                         f"the working directory)")  # fmt: skip
        if problem := syntax_problem(path):  # now, not in every trial
            fail(where, "model.builder", problem)
    if not has_width_knob(name):
        if match != "none":
            fail(where, "model.match", f"{show(match)}: {name} has no width knob to match a "
                                       f"budget with (allowed: none)")  # fmt: skip
        if width != 1.0:
            fail(where, "model.width", f"{show(width)}: {name} has no width knob "
                                       f"(allowed: 1)")  # fmt: skip


def _check_latency_match(where: str, match: str, workers: int) -> None:
    """A latency match is solved in its trial: one process, or workers would solve apart."""
    if match == "latency" and workers > 1:
        fail(where, "model.match", f"'latency' needs resources.workers 1, got {workers} (each "
                                   f"worker would time and solve its own width; allowed: none, "
                                   f"params, flops)")  # fmt: skip


# What field metadata cannot say, in the order a whole experiment is checked. Each check is
# given the fields it reads as its arguments, so this list names them all; setting a field runs
# the checks that read it.
CHECKS: tuple[tuple[Callable[..., None], tuple[str, ...]], ...] = (
    (_check_name, ("name",)),
    (_check_seeds, ("seeds", "data.split_seed")),
    (_check_grace, ("scheduler.name", "scheduler.grace_period", "train.epochs")),
    (_check_workers, ("resources.workers", "resources.gpus", "train.batch_size")),
    (_check_towers, ("model.towers", "model.reference", "model.overrides")),
    (_check_model, ("model.name", "model.builder", "model.match", "model.width")),
    (_check_latency_match, ("model.match", "resources.workers")),
)


def _run_checks(cfg: ExperimentConfig, where: str, touched: Sequence[str] | None) -> None:
    """The checks across fields, in order: every one (touched None), or those reading a path
    that lies in, or holds, a touched one."""
    for check, paths in CHECKS:
        if touched is None or any(overlaps(p, t) for p in paths for t in touched):
            check(where, *(functools.reduce(getattr, p.split("."), cfg) for p in paths))


# ---------------------------------------------------------------- validation


def _validate(raw: dict[str, Any], where: str, space_file: str) -> ExperimentConfig:
    """The whole experiment built and checked: every field, the checks across fields, and
    every value of its space in this experiment."""
    data = {**raw, "source": where}
    if "space" in raw:
        data["space"] = build(SpaceConfig, raw["space"], space_file)
    cfg = build(ExperimentConfig, data, where)
    _run_checks(cfg, where, None)
    _check_params(cfg.space, space_file)
    _check_space_values(cfg, space_file)
    return cfg


def _assign(cfg: ExperimentConfig, raw: dict[str, Any], keys: Sequence[str],
            where: str) -> ExperimentConfig:  # fmt: skip
    """cfg with the fields at keys built again from raw (its plain form, with them set), and
    the checks across fields they take part in."""
    changed = rebuild(cfg, raw, keys, where)
    _run_checks(changed, where, keys)
    return changed


def _check_params(space: SpaceConfig, space_file: str) -> None:
    """Every space parameter names a field, with a domain its searcher and type can draw."""
    for name in ("objectives", "constraints"):
        if getattr(space, name) and space.searcher == "grid":
            fail(space_file, name, "needs a searcher that samples (optuna, nsga2 or random); "
                                   "grid runs every point anyway")  # fmt: skip
    if space.metric in space.objectives:
        fail(space_file, f"objectives.{space.metric}", "is the space's metric already")
    for key, domain in space.params.items():
        path = f"params.{key}"
        if key == "seed":
            fail(space_file, path, "seeds come from the experiment's seeds, not the space")
        if not _known_path(key) or key.split(".")[0] in NOT_SPACE_PARAMS:
            hint = did_you_mean(key, field_paths(ExperimentConfig))
            fail(space_file, path, f"names no experiment field; {hint}".rstrip("; "))
        if domain.kind == "grid" and space.searcher != "grid":
            fail(space_file, path, f"grid needs searcher: grid ({space.searcher} samples; "
                                   f"use choice)")  # fmt: skip
        hint = field_hint(ExperimentConfig, key)
        draws = "integers" if domain.kind == "randint" else "real numbers"
        allowed = (int, float, Any) if domain.kind == "randint" else (float,)
        if domain.kind in RANGE_KINDS and hint not in allowed:
            fail(space_file, path, f"{domain.kind} draws {draws}, but {key} takes "
                                   f"{_type_words(hint)}; use choice")  # fmt: skip
        for value in domain_points(domain):
            if key in ("model.towers", "model.reference") or key.startswith(OVERRIDES):
                _check_spec(value, space_file, path)


def _type_words(hint: Any) -> str:
    words = {bool: "true or false", int: "integers", str: "strings", Any: "tower specs"}
    return words.get(hint, "a list" if typing.get_origin(hint) is tuple else "a mapping")


def _check_spec(value: Any, space_file: str, path: str) -> None:
    try:
        TowerSpec.parse(value)
    except ValueError as err:
        fail(space_file, path, f"{show(value)}: {err}")


def _check_space_values(cfg: ExperimentConfig, space_file: str) -> None:
    """Every value a space parameter can take (a range's ends) is allowed in this experiment:
    each set on its own, with the checks across fields it takes part in."""
    base = to_dict(cfg)
    for key, value in param_points(cfg.space):
        raw = dict(base)  # _set copies the mappings on its way down
        _set(raw, key, value)
        try:
            _assign(cfg, raw, [key], space_file)
        except ConfigError as err:
            problem = str(err).removeprefix(f"{space_file}: ").removeprefix(f"{key}: ")
            shown = "" if problem.startswith(show(value)) else f"{show(value)}: "
            fail(space_file, f"params.{key}", f"{shown}{problem}")


# ---------------------------------------------------------------- smoke mode

# The same experiment, tiny and on the CPU with synthetic data, so every file runs in seconds.
SMOKE_WIDTH = 0.125  # at most, for models with a width knob (see smoke())
SMOKE_OVERRIDES = (
    "train.epochs=1", "train.max_steps=2", "model.middle_blocks=1",
    "data.name=synthetic", "data.root=null", "data.num_samples=64", "resources.gpus=0",
    "resources.cpus=1", "resources.workers=1", "model.impl=native", "scheduler.grace_period=1",
)  # fmt: skip


def smoke(cfg: ExperimentConfig) -> ExperimentConfig:
    """An experiment cut to its plumbing: one seed, the ends of every grid axis, small images."""
    params = {
        key: Domain("grid", (d.values[0], d.values[-1])) if d.kind == "grid" else d
        for key, d in cfg.space.params.items()
    }
    samples = 1 if cfg.space.searcher == "grid" else min(2, cfg.space.num_samples)
    space = dataclasses.replace(cfg.space, params=params, num_samples=samples)
    data = dataclasses.replace(cfg.data, image_size=min(cfg.data.image_size or 16, 32))
    model = cfg.model
    if has_width_knob(model.name):  # ResNet has none, and refuses a width
        model = dataclasses.replace(model, width=min(model.width, SMOKE_WIDTH))
    return dataclasses.replace(cfg, space=space, data=data, model=model, seeds=cfg.seeds[:1])


# ---------------------------------------------------------------- round trips


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """A plain, JSON-ready nested dict of the resolved config (the space included)."""
    raw = dataclasses.asdict(cfg)
    raw["seeds"] = list(cfg.seeds)
    space = raw["space"]
    space["params"] = {k: {d.kind: list(d.values)} for k, d in cfg.space.params.items()}
    return raw


def from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """The config to_dict() described, validated again."""
    raw = dict(raw)
    where = raw.get("source") or "<config>"
    return _validate(raw, where, where)


def apply(cfg: ExperimentConfig, assignments: Mapping[str, Any]) -> ExperimentConfig:
    """A new config with dotted fields set (a trial's sampled point, say): the fields set are
    checked, with the checks across fields they take part in, not the whole experiment again."""
    raw = to_dict(cfg)
    for key, value in assignments.items():
        if not _known_path(key):
            hint = did_you_mean(key, field_paths(ExperimentConfig))
            fail(cfg.source or "<config>", key, f"unknown field; {hint}".rstrip("; "))
        _set(raw, key, value)
    where = raw.get("source") or "<config>"
    keys = list(assignments)
    if any(overlaps(key, "space") for key in keys):  # a space is checked against every field
        return _validate(raw, where, where)
    return _assign(cfg, {**raw, "source": where}, [*keys, "source"], where)
