"""Experiment and search-space files → validated, frozen config objects; errors worded here."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import numbers
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from towerspace.data import DataConfig
from towerspace.errors import ConfigError
from towerspace.models import ModelConfig
from towerspace.models.builders import has_width_knob, split_builder, syntax_problem
from towerspace.towers import TowerSpec
from towerspace.train import TrainConfig

SEARCHERS = ("grid", "random", "optuna")
DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
RANGE_KINDS = ("uniform", "loguniform", "randint")  # values are (low, high); randint: high excluded
OVERRIDES = "model.overrides."  # a tower override's site prefix may itself hold dots
SPACE_PARAMS = "space.params."  # so may a space parameter's key
# what a trial's point never sets
NOT_SPACE_PARAMS = ("name", "space", "seeds", "source", "retries", "faults")
# one folder name: no separators, no '.', '..' or hidden folder, no leading '-' (an option)
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
NAME_RULE = ("a sweep name is one folder name: letters, digits, '_', '-' and '.', not starting "
             "with '.' or '-' (at most 100 characters)")  # fmt: skip
SEED_MAX = 2**32 - 1  # NumPy's and torch's common seed range: 0 to this
# what a YAML document (file or --set value) may be: small, shallow, and not an alias bomb
YAML_MAX_BYTES = 2**20
YAML_MAX_DEPTH = 32  # nested mappings and lists
YAML_MAX_NODES = 10_000  # values once aliases are expanded (a document that uses aliases)
FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # 1e-3: a str to PyYAML


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

    name: str = field(default="fifo", metadata={"choices": ("fifo", "asha")})
    grace_period: int = field(default=1, metadata={"min": 1})  # asha: epochs before a stop
    reduction_factor: int = field(default=2, metadata={"min": 2})  # asha: keep 1/this per rung


@dataclass(frozen=True)
class FaultConfig:
    """For testing a sweep's fault handling: make chosen trials fail on purpose (off: no kind)."""

    kind: str | None = field(default=None, metadata={"choices": ("raise", "diverge")})
    epoch: int = field(default=1, metadata={"min": 1})  # the epoch at which the fault strikes
    times: int = field(default=1, metadata={"min": 1})  # attempts that fail before one passes
    point: dict[str, Any] = field(default_factory=dict)  # which trials: {model.towers: 4, seed: 0}


@dataclass(frozen=True)
class Domain:
    """The values a space parameter takes."""

    kind: str  # grid | choice | uniform | loguniform | randint
    values: tuple[Any, ...]  # grid/choice: the values; uniform/loguniform/randint: (low, high)


@dataclass(frozen=True)
class SpaceConfig:
    """A search space: which experiment fields vary, and how they are searched."""

    name: str  # the file's stem: search_spaces/<name>.yaml
    description: str = ""
    searcher: str = field(default="grid", metadata={"choices": SEARCHERS})  # optuna: TPE
    num_samples: int = field(default=1, metadata={"min": 1})  # random/optuna: points drawn
    metric: str = "val_acc"  # what optuna and asha look at
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
    retries: int = field(default=0, metadata={"min": 0})  # a raising trial is retried this often
    faults: FaultConfig = field(default_factory=FaultConfig)  # for testing only
    source: str = ""  # the file it was loaded from (filled by the loader)


# ---------------------------------------------------------------- wording


def _fail(where: str, path: str, problem: str) -> typing.NoReturn:
    raise ConfigError(": ".join(part for part in (where, path, problem) if part))


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML: 'text', true, null, 0.5."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range(meta: Mapping[str, Any]) -> str:
    if "min" in meta and "max" in meta:
        return f"{_show(meta['min'])} to {_show(meta['max'])}"
    bounds = (("gt", ">"), ("min", ">="), ("max", "<="))
    return " and ".join(f"{sign} {_show(meta[key])}" for key, sign in bounds if key in meta)


def _kind_of(value: Any) -> str:
    """What a top-level document is, in words."""
    if value is None:
        return "an empty file"
    if isinstance(value, list):
        return "a list"
    return _show(value)


# ---------------------------------------------------------------- generic validation


def _check_meta(value: Any, meta: Mapping[str, Any], where: str, path: str) -> None:
    if value is None:
        return
    if "choices" in meta and value is not None and value not in meta["choices"]:
        hint = _did_you_mean(str(value), meta["choices"])
        allowed = f"(allowed: {', '.join(meta['choices'])})"
        _fail(where, path, f"{_show(value)} is not allowed; {hint}{allowed}" if hint
                           else f"{_show(value)} is not allowed {allowed}")  # fmt: skip
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    low_ok = value >= meta.get("min", value) and ("gt" not in meta or value > meta["gt"])
    if not low_ok or value > meta.get("max", value):
        _fail(where, path, f"{_show(value)} is out of range; allowed: {_range(meta)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_float(value: Any) -> float | None:
    """value as a float if it is a number (or YAML 1.1's '1e-3' string), else None."""
    if isinstance(value, str) and FLOAT_TEXT.match(value):
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            return math.inf if value > 0 else -math.inf
    return None


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, (hint, False) otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        (inner,) = [a for a in args if a is not type(None)]
        return inner, type(None) in args
    return hint, False


def _coerce_scalar(hint: Any, value: Any, where: str, path: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            _fail(where, path, f"expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if not _is_int(value):
            _fail(where, path, f"expected an integer, got {_show(value)}")
        return int(value)
    if hint is float:
        number = _as_float(value)
        if number is None:
            _fail(where, path, f"expected a number, got {_show(value)}")
        if not math.isfinite(number):  # .inf, .nan, 1e400
            _fail(where, path, f"expected a finite number, got {_show(number)}")
        return number
    if not isinstance(value, str):
        _fail(where, path, f"expected a string, got {_show(value)}")
    return str(value)


def _coerce(hint: Any, value: Any, where: str, path: str) -> Any:
    hint, optional = _unwrap_optional(hint)
    if value is None and optional:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, path)
    if hint is Any:
        return value
    if hint in (bool, int, float, str):
        return _coerce_scalar(hint, value, where, path)
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
    if cls is SchedulerConfig and isinstance(data, str):
        data = {"name": data}  # the shorthand `scheduler: asha`
    if not isinstance(data, Mapping):
        _fail(where, path, f"expected a mapping of fields, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            name = f"{path}.{key}" if path else str(key)
            hint = _did_you_mean(str(key), list(fields))
            allowed = f"(allowed: {', '.join(sorted(fields))})"
            _fail(where, name, f"unknown field; {hint}{allowed}" if hint
                               else f"unknown field {allowed}")  # fmt: skip
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
    if not isinstance(values, list | tuple) or not values:
        _fail(where, path, f"{kind} needs a non-empty list, got {_show(values)}")
    if kind in RANGE_KINDS:
        values = _range_bounds(kind, list(values), where, path)
    for value in values:
        number = _as_float(value)
        if number is not None and not math.isfinite(number):
            _fail(where, path, f"{kind} values must be finite numbers, got {_show(number)}")
    return Domain(kind, tuple(values))


def _range_bounds(kind: str, values: list[Any], where: str, path: str) -> list[Any]:
    """[low, high] of a uniform / loguniform / randint domain, checked."""
    if kind == "randint":
        bounds = [int(v) if _is_int(v) else None for v in values]
        wanted = "integers low < high"
    else:
        bounds = [_as_float(v) for v in values]
        wanted = "0 < low < high" if kind == "loguniform" else "low < high"
    if len(bounds) == 2 and None not in bounds and not all(map(math.isfinite, bounds)):
        _fail(where, path, f"{kind} needs finite bounds [low, high], got {_show(values)}")
    if len(bounds) != 2 or None in bounds or bounds[0] >= bounds[1]:
        _fail(where, path, f"{kind} needs [low, high] with {wanted}, got {_show(values)}")
    if kind == "loguniform" and bounds[0] <= 0:
        _fail(where, path, f"{kind} needs [low, high] with {wanted}, got {_show(values)}")
    return bounds


# ---------------------------------------------------------------- dotted paths


def _field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted field path of a config dataclass (for --set and space params)."""
    paths, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = f"{prefix}{f.name}"
        paths.append(sub)
        if dataclasses.is_dataclass(hints[f.name]):
            paths += _field_paths(hints[f.name], sub + ".")
    return paths


def _split(key: str) -> list[str]:
    """The parts of a dotted path; a site prefix or a space parameter's key stays whole."""
    for head in (OVERRIDES, SPACE_PARAMS):
        if key.startswith(head) and len(key) > len(head):
            return [*head.rstrip(".").split("."), key.removeprefix(head)]
    return key.split(".")


def _known_path(key: str) -> bool:
    overrides = key.startswith(OVERRIDES) and len(key) > len(OVERRIDES)
    return overrides or key in _field_paths(ExperimentConfig)


def _field_hint(key: str) -> Any:
    """The type of the field a known dotted path names (Any for a tower override)."""
    if key.startswith(OVERRIDES):
        return Any
    hint: Any = ExperimentConfig
    for part in key.split("."):
        hint = typing.get_type_hints(hint)[part]
    return _unwrap_optional(hint)[0]


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted path in a nested dict, making (or replacing) the mappings on the way."""
    node = raw
    parts = _split(key)
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, Mapping) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------- files and overrides


class _Refused(Exception):
    """A YAML document outside the bounds of _BoundedLoader: what, and where it starts."""

    def __init__(self, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem)
        self.problem, self.mark = problem, mark


class _BoundedLoader(yaml.SafeLoader):
    """safe_load's loader, refusing deep nesting, alias bombs and recursive aliases while the
    node graph is composed, before any Python object is built from it."""

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open: dict[str, yaml.Node | None] = {}  # anchors whose node is being composed
        self._aliased = False

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliased = True
            if event.anchor in self._open:  # `&a [*a]`: the node would contain itself
                raise _Refused(f"recursive alias *{event.anchor} inside &{event.anchor}",
                               event.start_mark)  # fmt: skip
            return super().compose_node(parent, index)
        if not isinstance(event, yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        if self._depth == YAML_MAX_DEPTH:
            raise _Refused(f"nesting deeper than {YAML_MAX_DEPTH} levels", event.start_mark)
        self._depth += 1
        anchor = event.anchor
        if anchor is not None:
            self._open[anchor] = None
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.pop(anchor, None)

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        if self._aliased:  # without aliases the composed graph is the document as written
            _expanded_size(node, 1, {})
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than int() reads (sys.get_int_max_str_digits)
            digits = sys.get_int_max_str_digits()
            raise _Refused(f"an integer of more than {digits} digits", node.start_mark) from None


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _expanded_size(node: yaml.Node, depth: int, seen: dict[int, tuple[int, int]]) -> int:
    """How many nodes `node` stands for once aliases are expanded; refuses more than
    YAML_MAX_NODES, or nesting past YAML_MAX_DEPTH through aliases. seen: id → (size, height),
    so each shared node is counted once however often it is referred to."""
    if not isinstance(node, yaml.CollectionNode):
        return 1
    if id(node) not in seen:
        if depth > YAML_MAX_DEPTH:
            raise _Refused(f"nesting deeper than {YAML_MAX_DEPTH} levels once aliases are "
                           f"expanded", node.start_mark)  # fmt: skip
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            part for pair in node.value for part in pair)  # fmt: skip
        size, height = 1, 1
        for child in children:
            size += _expanded_size(child, depth + 1, seen)
            if isinstance(child, yaml.CollectionNode):
                height = max(height, 1 + seen[id(child)][1])
        seen[id(node)] = (size, height)
    size, height = seen[id(node)]
    if depth + height - 1 > YAML_MAX_DEPTH:
        raise _Refused(f"nesting deeper than {YAML_MAX_DEPTH} levels once aliases are "
                       f"expanded", node.start_mark)  # fmt: skip
    if size > YAML_MAX_NODES:
        raise _Refused(f"aliases expand to more than {YAML_MAX_NODES:,} values",
                       node.start_mark)  # fmt: skip
    return size


def _load_yaml(text: str | bytes, where: str, *, lines: bool = True) -> Any:
    """yaml.safe_load within bounds: a refused document is a ConfigError naming `where`; bad
    YAML raises yaml.YAMLError as safe_load does. lines: say where in the text it starts."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > YAML_MAX_BYTES:
        raise ConfigError(f"{where}: not accepted: {size:,} bytes is more than the limit of "
                          f"1 MiB ({YAML_MAX_BYTES:,} bytes)")  # fmt: skip
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as err:
        line = f" (line {err.mark.line + 1})" if lines and err.mark else ""
        raise ConfigError(f"{where}: not accepted: {err.problem}{line}") from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    size = path.stat().st_size
    if size > YAML_MAX_BYTES:  # before reading it
        raise ConfigError(f"{path}: not accepted: {size:,} bytes is more than the limit of "
                          f"1 MiB ({YAML_MAX_BYTES:,} bytes)")  # fmt: skip
    with path.open("rb") as file:
        text = file.read(YAML_MAX_BYTES + 1)  # a file that grew since is refused by _load_yaml
    try:
        return _load_yaml(text, str(path))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join((err.problem or "unreadable").split())
        if "could not determine a constructor" in problem:
            problem = "tags like !!python/... are not allowed (files are read with safe_load)"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None


def _read_mapping(path: Path) -> dict[str, Any]:
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top, got {_kind_of(raw)}")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """('train.epochs', 1) from 'train.epochs=1'; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value")
    key, _, value = text.partition("=")
    key = key.strip()
    shown = text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"
    if not _known_path(key) and not key.startswith("space."):
        hint = _did_you_mean(key, _field_paths(ExperimentConfig))
        raise ConfigError(f"--set {shown}: unknown field{'; ' + hint.strip() if hint else ''}")
    try:
        return key, _load_yaml(value, f"--set {shown}", lines="\n" in value)
    except yaml.YAMLError:
        raise ConfigError(f"--set {shown}: the value is not valid YAML") from None


def space_dirs(experiment_file: str | Path) -> tuple[Path, ...]:
    """Where a bare space name is looked up: beside the experiment's folder, then ./."""
    return (Path(experiment_file).resolve().parent.parent / "search_spaces", Path("search_spaces"))


def _relative(path: Path) -> Path:
    """path relative to the working directory when it lies below it, for shorter messages."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def _space_file(name: Any, search_dirs: Sequence[Path], where: str) -> Path:
    """The file a space name (or a path ending in .yaml) refers to."""
    if not isinstance(name, str):
        _fail(where, "space", f"expected a space name, got {_show(name)}")
    if name.endswith(".yaml"):
        return Path(name)
    found = [Path(d) / f"{name}.yaml" for d in search_dirs if (Path(d) / f"{name}.yaml").is_file()]
    if not found:
        available = sorted({p.stem for d in map(Path, search_dirs) for p in d.glob("*.yaml")})
        if not available:
            looked = ", ".join(str(d) for d in search_dirs)
            _fail(where, "space", f"no search space {name!r} (no .yaml files in: {looked})")
        hint = _did_you_mean(name, available)
        _fail(where, "space", f"no search space {name!r}; {hint}"
                              f"(available: {', '.join(available)})")  # fmt: skip
    return _relative(found[0])


def _read_space(name: Any, search_dirs: Sequence[Path], where: str) -> tuple[dict, str]:
    """The raw mapping of a space (its name filled from the file's stem), and its file."""
    path = _space_file(name, search_dirs, where)
    return {"name": path.stem, **_read_mapping(path)}, str(path)


def load_space(
    name_or_path: str | Path, search_dirs: Sequence[str | Path] = ("search_spaces",)
) -> SpaceConfig:
    """A search space by name (looked up in search_dirs) or by its .yaml path, validated."""
    dirs = [Path(d) for d in search_dirs]
    raw, space_file = _read_space(str(name_or_path), dirs, "")
    space = _build(SpaceConfig, raw, space_file)
    _check_params(space, space_file)
    return space


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read, override, validate and resolve an experiment file; nothing is written."""
    path = Path(path)
    raw = _read_mapping(path)
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
        _fail(str(path), "space", "missing (required)")
    if isinstance(raw["space"], Mapping):
        space_raw, space_file = {"name": "inline", **raw["space"]}, str(path)
    else:
        space_raw, space_file = _read_space(raw["space"], space_dirs(path), str(path))
    resolved = {**raw, "space": space_raw}
    for key, value in space_sets:
        _set(resolved, key, value)
    return _validate(resolved, str(path), space_file)


# ---------------------------------------------------------------- whole-config checks


def _validate(raw: dict[str, Any], where: str, space_file: str) -> ExperimentConfig:
    data = {**raw, "source": where}
    if "space" in raw:
        data["space"] = _build(SpaceConfig, raw["space"], space_file)
    cfg = _build(ExperimentConfig, data, where)
    if not NAME_PATTERN.fullmatch(cfg.name):
        shown = repr(cfg.name)
        if len(cfg.name) > 100:
            shown = f"{cfg.name[:40]!r}... ({len(cfg.name):,} characters)"
        _fail(where, "name", f"{shown} is not allowed; {NAME_RULE}")
    if not cfg.seeds:
        _fail(where, "seeds", "needs at least one seed")
    seeds = {f"seeds[{i}]": seed for i, seed in enumerate(cfg.seeds)}
    for path, seed in {**seeds, "data.split_seed": cfg.data.split_seed}.items():
        if not 0 <= seed <= SEED_MAX:
            _fail(where, path, f"{seed} is out of range; allowed: 0 to {SEED_MAX}")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        _fail(where, "seeds", f"{list(cfg.seeds)} repeats a seed")
    if cfg.scheduler.name == "asha" and cfg.scheduler.grace_period > cfg.train.epochs:
        _fail(where, "scheduler.grace_period", f"{cfg.scheduler.grace_period} is more than "
                                               f"train.epochs ({cfg.train.epochs})")  # fmt: skip
    _check_workers(cfg, where)
    _check_towers(cfg, where)
    _check_model(cfg.model, where)
    _check_params(cfg.space, space_file)
    _check_space_values(cfg, space_file)
    return cfg


def _check_workers(cfg: ExperimentConfig, where: str) -> None:
    """Data-parallel trials: whole GPUs per worker, and a global batch that splits evenly."""
    res = cfg.resources
    if res.workers == 1:
        return
    if res.gpus not in (0, 1):
        _fail(where, "resources.gpus", f"{_show(res.gpus)} per worker with workers="
                                       f"{res.workers}; data-parallel workers each take one "
                                       f"whole GPU or none (allowed: 0, 1)")  # fmt: skip
    if cfg.train.batch_size % res.workers:
        _fail(where, "train.batch_size", f"{cfg.train.batch_size} does not split evenly over "
                                         f"resources.workers={res.workers} (the global batch "
                                         f"is divided among the workers)")  # fmt: skip


def _check_model(model: ModelConfig, where: str) -> None:
    """The builder a custom model needs, and no budget matching without a width knob."""
    if model.name == "custom" and model.builder is None:
        _fail(where, "model.builder", "missing; model.name 'custom' needs one: "
                                      "'path/to/file.py:function'")  # fmt: skip
    if model.name != "custom" and model.builder is not None:
        _fail(where, "model.builder", f"{_show(model.builder)} is only used with model.name "
                                      f"'custom' (got {_show(model.name)})")  # fmt: skip
    if model.builder is not None:
        try:
            path, _ = split_builder(model.builder)
        except ValueError as err:
            _fail(where, "model.builder", str(err))
        if not path.is_file():
            _fail(where, "model.builder", f"{_show(model.builder)}: no such file {path} (relative "
                                          f"to the working directory)")  # fmt: skip
        if problem := syntax_problem(path):  # now, not in every trial
            _fail(where, "model.builder", problem)
    if not has_width_knob(model.name):
        if model.match != "none":
            _fail(where, "model.match", f"{_show(model.match)}: {model.name} has no width knob "
                                        f"to match a budget with (allowed: none)")  # fmt: skip
        if model.width != 1.0:
            _fail(where, "model.width", f"{_show(model.width)}: {model.name} has no width knob "
                                        f"(allowed: 1)")  # fmt: skip


def _check_towers(cfg: ExperimentConfig, where: str) -> None:
    specs = {"model.towers": cfg.model.towers, "model.reference": cfg.model.reference}
    specs |= {f"{OVERRIDES}{k}": v for k, v in cfg.model.overrides.items()}
    for path, spec in specs.items():
        try:
            TowerSpec.parse(spec)
        except ValueError as err:
            _fail(where, path, str(err))


def _check_params(space: SpaceConfig, space_file: str) -> None:
    """Every space parameter names a field, with a domain its searcher and type can draw."""
    for key, domain in space.params.items():
        path = f"params.{key}"
        if key == "seed":
            _fail(space_file, path, "seeds come from the experiment's seeds, not the space")
        if not _known_path(key) or key.split(".")[0] in NOT_SPACE_PARAMS:
            hint = _did_you_mean(key, _field_paths(ExperimentConfig))
            _fail(space_file, path, f"names no experiment field; {hint}".rstrip("; "))
        if domain.kind == "grid" and space.searcher != "grid":
            _fail(space_file, path, f"grid needs searcher: grid ({space.searcher} samples; "
                                    f"use choice)")  # fmt: skip
        hint = _field_hint(key)
        draws = "integers" if domain.kind == "randint" else "real numbers"
        allowed = (int, float, Any) if domain.kind == "randint" else (float,)
        if domain.kind in RANGE_KINDS and hint not in allowed:
            _fail(space_file, path, f"{domain.kind} draws {draws}, but {key} takes "
                                    f"{_type_words(hint)}; use choice")  # fmt: skip
        for value in _points(domain):
            if key in ("model.towers", "model.reference") or key.startswith(OVERRIDES):
                _check_spec(value, space_file, path)


def _type_words(hint: Any) -> str:
    words = {bool: "true or false", int: "integers", str: "strings", Any: "tower specs"}
    return words.get(hint, "a list" if typing.get_origin(hint) is tuple else "a mapping")


def _points(domain: Domain) -> tuple[Any, ...]:
    """The values a domain can take that are checked up front: all of them, or its ends."""
    if domain.kind == "randint":
        return (domain.values[0], domain.values[1] - 1)  # Ray's randint excludes high
    return domain.values


def _check_spec(value: Any, space_file: str, path: str) -> None:
    try:
        TowerSpec.parse(value)
    except ValueError as err:
        _fail(space_file, path, f"{_show(value)}: {err}")


def _check_space_values(cfg: ExperimentConfig, space_file: str) -> None:
    """Every value a space parameter can take (or a range's ends) validates in this experiment."""
    base = to_dict(cfg)
    for key, domain in cfg.space.params.items():
        for value in _points(domain):
            try:
                _validate(_set_copy(base, key, value), space_file, space_file)
            except ConfigError as err:
                problem = str(err).removeprefix(f"{space_file}: ").removeprefix(f"{key}: ")
                shown = "" if problem.startswith(_show(value)) else f"{_show(value)}: "
                _fail(space_file, f"params.{key}", f"{shown}{problem}")


def _set_copy(base: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(base)
    raw["space"] = {"name": raw["space"]["name"]}  # values are checked without the space
    _set(raw, key, value)
    return raw


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
    """A new validated config with dotted fields set (a trial's sampled point, say)."""
    raw = to_dict(cfg)
    for key, value in assignments.items():
        if not _known_path(key):
            hint = _did_you_mean(key, _field_paths(ExperimentConfig))
            _fail(cfg.source or "<config>", key, f"unknown field; {hint}".rstrip("; "))
        _set(raw, key, value)
    return from_dict(raw)
