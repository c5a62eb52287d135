"""Experiment and search-space files → validated, frozen config objects; errors worded here."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from towerspace.data import DataConfig
from towerspace.models import ModelConfig
from towerspace.towers import TowerSpec
from towerspace.train import TrainConfig

SEARCHERS = ("grid", "random", "optuna")
DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
TOWER_FIELDS = ("model.towers", "model.reference")  # and every model.overrides.<prefix>
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


class ConfigError(ValueError):
    """One-line, user-facing: names the file, the field, the value and what is allowed."""


@dataclass(frozen=True)
class ResourcesConfig:
    """What one trial takes from the Ray cluster."""

    cpus: float = field(default=1.0, metadata={"gt": 0.0})  # also the trial's torch threads
    gpus: float = field(default=0.0, metadata={"min": 0.0})  # fractions pack trials on a GPU


@dataclass(frozen=True)
class SchedulerConfig:
    """Trial scheduling: every trial to the end (fifo) or ASHA early stopping."""

    name: str = field(default="fifo", metadata={"choices": ("fifo", "asha")})
    grace_period: int = field(default=1, metadata={"min": 1})  # asha: epochs before a stop
    reduction_factor: int = field(default=2, metadata={"min": 2})  # asha: keep 1/this per rung


@dataclass(frozen=True)
class Domain:
    """The values a space parameter takes."""

    kind: str  # grid | choice | uniform | loguniform | randint
    values: tuple[Any, ...]  # grid/choice: the values; uniform/loguniform/randint: (low, high)


@dataclass(frozen=True)
class SpaceConfig:
    """A search space: which experiment fields vary, and how they are searched."""

    name: str
    description: str = ""
    searcher: str = field(default="grid", metadata={"choices": SEARCHERS})
    num_samples: int = field(default=1, metadata={"min": 1})  # random/optuna: points drawn
    metric: str = "val_acc"
    mode: str = field(default="max", metadata={"choices": ("max", "min")})
    params: dict[str, Domain] = field(default_factory=dict)  # dotted field → domain


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: data, model, recipe, search space, seeds and resources."""

    name: str  # names the sweep's folder
    space: SpaceConfig  # a file in search_spaces/, by name
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    seeds: tuple[int, ...] = (0,)  # every point is repeated once per seed
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    storage: str | None = None  # folder for sweeps; None: the command line's default
    source: str = ""  # the file it was loaded from


# ---------------------------------------------------------------- generic validation


def _fail(where: str, path: str, problem: str) -> typing.NoReturn:
    raise ConfigError(f"{where}: {path}: {problem}" if path else f"{where}: {problem}")


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML: 'text', true, 0.5."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return (
        repr(value)
        if isinstance(value, str)
        else f"{value:g}"
        if isinstance(value, float)
        else str(value)
    )


def _range(meta: Mapping[str, Any]) -> str:
    if "min" in meta and "max" in meta:
        return f"{_show(meta['min'])} to {_show(meta['max'])}"
    bounds = (("gt", ">"), ("min", ">="), ("max", "<="))
    return " and ".join(f"{sign} {_show(meta[key])}" for key, sign in bounds if key in meta)


def _check_meta(value: Any, meta: Mapping[str, Any], where: str, path: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        hint = _did_you_mean(str(value), meta["choices"])
        allowed = f"(allowed: {', '.join(meta['choices'])})"
        _fail(where, path, f"{_show(value)} is not allowed; {hint}{allowed}" if hint
                           else f"{_show(value)} is not allowed {allowed}")  # fmt: skip
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    low_ok = value >= meta.get("min", value) and ("gt" not in meta or value > meta["gt"])
    if not low_ok or value > meta.get("max", value):
        _fail(where, path, f"{_show(value)} is out of range; allowed: {_range(meta)}")


def _coerce(hint: Any, value: Any, where: str, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where, path)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, path)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            _fail(where, path, f"expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, path, f"expected an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(where, path, f"expected a number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            _fail(where, path, f"expected a string, got {_show(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            _fail(where, path, f"expected a list, got {_show(value)}")
        return tuple(_coerce(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            _fail(where, path, f"expected a mapping, got {_show(value)}")
        return {str(k): _coerce(args[1], v, where, f"{path}.{k}") for k, v in value.items()}
    raise TypeError(f"no validation for {hint!r}")  # a programming error, not a user's


def _build(cls: type, data: Any, where: str, path: str = "") -> Any:
    """A dataclass instance from a mapping, every field checked against its type and bounds."""
    if cls is Domain:
        return _domain(data, where, path)
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        _fail(where, path, f"expected a mapping of fields, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            name = f"{path}.{key}" if path else str(key)
            _fail(where, name, f"unknown field; {_did_you_mean(str(key), list(fields))}"
                               f"(allowed: {allowed})")  # fmt: skip
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                _fail(where, sub, "missing (required)")
            continue
        values[name] = _coerce(hints[name], data[name], where, sub)
        _check_meta(values[name], f.metadata, where, sub)
    return cls(**values)


def _domain(data: Any, where: str, path: str) -> Domain:
    kinds = ", ".join(DOMAIN_KINDS)
    if not isinstance(data, Mapping) or len(data) != 1 or next(iter(data)) not in DOMAIN_KINDS:
        _fail(where, path, f"expected one of {{{kinds}}}: [values], got {_show(data)}")
    ((kind, values),) = data.items()
    if not isinstance(values, list) or not values:
        _fail(where, path, f"{kind} needs a non-empty list, got {_show(values)}")
    if kind in ("uniform", "loguniform", "randint"):
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if len(values) != 2 or not numeric or values[0] >= values[1]:
            _fail(where, path, f"{kind} needs [low, high] with low < high, got {values}")
    return Domain(kind, tuple(values))


# ---------------------------------------------------------------- files and overrides


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = err.problem or "unreadable"
        if "could not determine a constructor" in problem:
            problem = "tags like !!python/... are not allowed (files are read with safe_load)"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None


def _field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted field path of a config dataclass (for --set and space params)."""
    paths, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = f"{prefix}{f.name}"
        paths.append(sub)
        if dataclasses.is_dataclass(hints[f.name]):
            paths += _field_paths(hints[f.name], sub + ".")
    return paths


def _known_path(key: str) -> bool:
    return key in _field_paths(ExperimentConfig) or key.startswith("model.overrides.")


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None or not isinstance(child, Mapping) else dict(child)
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """('train.epochs', 1) from 'train.epochs=1'; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value")
    key, _, value = text.partition("=")
    key = key.strip()
    if not _known_path(key) and not key.startswith("space."):
        hint = _did_you_mean(key, _field_paths(ExperimentConfig))
        raise ConfigError(f"--set {text}: unknown field{'; ' + hint.strip() if hint else ''}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"--set {text}: the value is not valid YAML") from None


def load_space(name: Any, experiment_file: Path) -> tuple[dict[str, Any], str]:
    """The raw mapping of a search space, and the file it came from."""
    if isinstance(name, Mapping):
        return {"name": "inline", **name}, str(experiment_file)
    if not isinstance(name, str):
        raise ConfigError(f"{experiment_file}: space: expected a space name, got {_show(name)}")
    if name.endswith(".yaml"):
        path = Path(name)
    else:
        dirs = [experiment_file.resolve().parent.parent / "search_spaces", Path("search_spaces")]
        found = [d / f"{name}.yaml" for d in dirs if (d / f"{name}.yaml").is_file()]
        if not found:
            available = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})
            raise ConfigError(f"{experiment_file}: space: no search space {name!r}; "
                              f"{_did_you_mean(name, available)}"
                              f"(available: {', '.join(available)})")  # fmt: skip
        path = _relative(found[0])
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top")
    return {"name": path.stem, **raw}, str(path)


def _relative(path: Path) -> Path:
    """path relative to the working directory when it lies below it, for shorter messages."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read, override, validate and resolve an experiment file; nothing is written."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top")
    space_sets = []
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("space."):
            space_sets.append((key.removeprefix("space."), value))
        else:
            _set(raw, key, value)
    if "space" not in raw:
        raise ConfigError(f"{path}: space: missing (required)")
    space_raw, space_file = load_space(raw["space"], path)
    for key, value in space_sets:
        _set(space_raw, key, value)
    raw["space"] = space_raw
    return _validate(raw, str(path), space_file)


def _validate(raw: dict[str, Any], where: str, space_file: str) -> ExperimentConfig:
    space = _build(SpaceConfig, raw["space"], space_file)
    cfg = _build(ExperimentConfig, {**raw, "space": space, "source": where}, where)
    if not NAME_PATTERN.match(cfg.name):
        _fail(where, "name", f"{cfg.name!r} may hold only letters, digits, '_', '-' and '.'")
    if not cfg.seeds:
        _fail(where, "seeds", "needs at least one seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        _fail(where, "seeds", f"{list(cfg.seeds)} repeats a seed")
    if cfg.scheduler.name == "asha" and cfg.scheduler.grace_period > cfg.train.epochs:
        _fail(where, "scheduler.grace_period", f"{cfg.scheduler.grace_period} is more than "
                                               f"train.epochs ({cfg.train.epochs})")  # fmt: skip
    _check_towers(cfg, where)
    _check_space(cfg, space_file)
    return cfg


def _check_towers(cfg: ExperimentConfig, where: str) -> None:
    specs = {"model.towers": cfg.model.towers, "model.reference": cfg.model.reference}
    specs |= {f"model.overrides.{k}": v for k, v in cfg.model.overrides.items()}
    for path, spec in specs.items():
        try:
            TowerSpec.parse(spec)
        except ValueError as err:
            _fail(where, path, str(err))


def _check_space(cfg: ExperimentConfig, space_file: str) -> None:
    """Every space parameter names a field, and every value it can take validates."""
    base = to_dict(cfg)
    for key, domain in cfg.space.params.items():
        path = f"params.{key}"
        if key == "seed":
            _fail(space_file, path, "seeds come from the experiment's seeds, not the space")
        if not _known_path(key) or key.split(".")[0] in ("space", "name", "source", "seeds"):
            hint = _did_you_mean(key, _field_paths(ExperimentConfig))
            _fail(space_file, path, f"names no experiment field; {hint}".rstrip("; "))
        if domain.kind == "grid" and cfg.space.searcher != "grid":
            _fail(space_file, path, f"grid needs searcher: grid ({cfg.space.searcher} samples; "
                                    f"use choice)")  # fmt: skip
        for value in domain.values:
            try:
                _validate(_set_copy(base, key, value), space_file, space_file)
            except ConfigError as err:
                problem = str(err).split(": ", 2)[-1]
                _fail(space_file, path, f"{_show(value)}: {problem}")


def _set_copy(base: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(base)
    raw["space"] = {"name": raw["space"]["name"]}  # values are checked without the space
    _set(raw, key, value)
    return raw


# ---------------------------------------------------------------- smoke mode

# The same experiment, tiny and on the CPU with synthetic data, so every file runs in seconds.
SMOKE_OVERRIDES = (
    "train.epochs=1", "train.max_steps=2", "model.width=0.125", "model.middle_blocks=1",
    "data.name=synthetic", "data.root=null", "data.num_samples=64", "resources.gpus=0",
    "resources.cpus=1", "space.num_samples=2", "scheduler.grace_period=1",
)  # fmt: skip


def smoke(cfg: ExperimentConfig) -> ExperimentConfig:
    """An experiment cut to its plumbing: one seed, the ends of every grid axis, small images."""
    params = {
        key: Domain("grid", (d.values[0], d.values[-1])) if d.kind == "grid" else d
        for key, d in cfg.space.params.items()
    }
    space = dataclasses.replace(cfg.space, params=params)
    data = dataclasses.replace(cfg.data, image_size=min(cfg.data.image_size or 16, 32))
    return dataclasses.replace(cfg, space=space, data=data, seeds=cfg.seeds[:1])


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
    return _validate(raw, raw.get("source") or "<config>", raw.get("source") or "<config>")


def apply(cfg: ExperimentConfig, assignments: Mapping[str, Any]) -> ExperimentConfig:
    """A new validated config with dotted fields set (a trial's sampled point, say)."""
    raw = to_dict(cfg)
    for key, value in assignments.items():
        if not _known_path(key):
            raise ConfigError(f"{cfg.source}: {key}: unknown field")
        _set(raw, key, value)
    return from_dict(raw)
