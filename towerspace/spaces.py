"""Search spaces: which fields a sweep varies and over what values (search_spaces/*.yaml, found
by name through catalog.py), and the walkers of a space's points that every check, estimate and
count uses."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from towerspace import catalog
from towerspace.files import shown
from towerspace.schema import as_float, coerce, fail, is_int, show
from towerspace.yamlfile import read_mapping

SEARCHERS = ("grid", "random", "optuna", "nsga2")  # optuna: TPE (multi-objective too); nsga2
# what a trial reports, that a space may search on: per epoch, and fixed costs (latency_ms: the
# measured step time, see towerspace.latency)
METRICS = ("val_acc", "val_loss", "val_top5", "train_loss", "latency_ms", "params", "flops",
           "training_flops")  # fmt: skip
DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
RANGE_KINDS = ("uniform", "loguniform", "randint")  # values are (low, high); randint: high excluded


@dataclass(frozen=True)
class Domain:
    """The values a space parameter takes."""

    kind: str  # grid | choice | uniform | loguniform | randint
    values: tuple[Any, ...]  # grid/choice: the values; uniform/loguniform/randint: (low, high)


def parse_domain(data: Any, where: str, path: str) -> Domain:
    """A domain from its plain form, `{kind: [values]}`, with a range's bounds checked."""
    kinds = ", ".join(DOMAIN_KINDS)
    if not isinstance(data, Mapping) or len(data) != 1 or next(iter(data)) not in DOMAIN_KINDS:
        fail(where, path, f"expected one of {{{kinds}}}: [values], got {show(data)}")
    ((kind, values),) = data.items()
    if not isinstance(values, list | tuple) or not values:
        fail(where, path, f"{kind} needs a non-empty list, got {show(values)}")
    if kind in RANGE_KINDS:
        values = _range_bounds(kind, list(values), where, path)
    for value in values:
        number = as_float(value)
        if number is not None and not math.isfinite(number):
            fail(where, path, f"{kind} values must be finite numbers, got {show(number)}")
    return Domain(kind, tuple(values))


def _range_bounds(kind: str, values: list[Any], where: str, path: str) -> list[Any]:
    """[low, high] of a uniform / loguniform / randint domain, checked."""
    if kind == "randint":
        bounds = [int(v) if is_int(v) else None for v in values]
        wanted = "integers low < high"
    else:
        bounds = [as_float(v) for v in values]
        wanted = "0 < low < high" if kind == "loguniform" else "low < high"
    if len(bounds) == 2 and None not in bounds and not all(map(math.isfinite, bounds)):
        fail(where, path, f"{kind} needs finite bounds [low, high], got {show(values)}")
    if len(bounds) != 2 or None in bounds or bounds[0] >= bounds[1]:
        fail(where, path, f"{kind} needs [low, high] with {wanted}, got {show(values)}")
    if kind == "loguniform" and bounds[0] <= 0:
        fail(where, path, f"{kind} needs [low, high] with {wanted}, got {show(values)}")
    return bounds


def parse_params(data: Any, where: str, path: str) -> dict[str, Domain]:
    """A space's params: dotted field → domain."""
    params = coerce(dict[str, Any], data, where, path)
    return {key: parse_domain(value, where, f"{path}.{key}") for key, value in params.items()}


def _metric_name(name: Any, where: str, path: str) -> str:
    if name not in METRICS:
        fail(where, path, f"{show(name)} is not a metric trials report; allowed: "
                          f"{', '.join(METRICS)}")  # fmt: skip
    return name


def parse_objectives(data: Any, where: str, path: str) -> dict[str, str]:
    """Extra objectives: metric → 'max' or 'min'."""
    objectives = coerce(dict[str, Any], data, where, path)
    for name, mode in objectives.items():
        _metric_name(name, where, f"{path}.{name}")
        if mode not in ("max", "min"):
            fail(where, f"{path}.{name}", f"{show(mode)} is not allowed; allowed: max, min")
    return objectives


def parse_constraints(data: Any, where: str, path: str) -> dict[str, float]:
    """Upper bounds: metric → a finite number."""
    bounds = coerce(dict[str, Any], data, where, path)
    for name, bound in bounds.items():
        _metric_name(name, where, f"{path}.{name}")
        number = as_float(bound)
        if number is None or not math.isfinite(number):
            fail(where, f"{path}.{name}", f"{show(bound)} is not a finite number (an upper "
                                          f"bound: {name} <= it)")  # fmt: skip
        bounds[name] = number
    return bounds


@dataclass(frozen=True)
class SpaceConfig:
    """A search space: which experiment fields vary, and how they are searched."""

    name: str  # the file's stem: search_spaces/<name>.yaml
    description: str = ""  # one line, shown by towerspace spaces
    searcher: str = field(default="grid", metadata={"choices": SEARCHERS})  # optuna: TPE
    num_samples: int = field(default=1, metadata={"min": 1})  # random/optuna: points drawn
    metric: str = "val_acc"  # what optuna and asha look at
    mode: str = field(default="max", metadata={"choices": ("max", "min")})  # max: higher is better
    # dotted field → domain
    params: dict[str, Domain] = field(default_factory=dict, metadata={"parse": parse_params})
    # more objectives than metric (multi-objective, optuna or nsga2): name → max or min
    objectives: dict[str, str] = field(default_factory=dict, metadata={"parse": parse_objectives})
    # upper bounds (Optuna constraints: the sampler steers away from points above them)
    constraints: dict[str, float] = field(default_factory=dict,
                                          metadata={"parse": parse_constraints})  # fmt: skip

    @property
    def measures_latency(self) -> bool:
        """Whether the space searches on the measured step time."""
        names = (self.metric, *self.objectives, *self.constraints)
        return "latency_ms" in names


# ---------------------------------------------------------------- points


def domain_points(domain: Domain) -> tuple[Any, ...]:
    """The values of a domain that are checked up front: all of them, or a range's ends."""
    if domain.kind == "randint":
        return (domain.values[0], domain.values[1] - 1)  # Ray's randint excludes high
    return domain.values


def param_points(
    space: SpaceConfig, kinds: Sequence[str] = DOMAIN_KINDS
) -> Iterator[tuple[str, Any]]:
    """(field, value) for each parameter of these kinds on its own, in file order: every value
    its domain_points() give."""
    for key, domain in space.params.items():
        if domain.kind in kinds:
            for value in domain_points(domain):
                yield key, value


def grid_points(space: SpaceConfig) -> list[dict[str, Any]]:
    """Every point of a grid space (field → value: the grid's product); a sampled space has one
    point per sample, each drawn from the base config: [{}]."""
    grid = {k: d.values for k, d in space.params.items() if d.kind == "grid"}
    if space.searcher != "grid" or not grid:
        return [{}]
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


# ---------------------------------------------------------------- files


def space_file(name: Any, search_dirs: Sequence[Path], where: str) -> Path:
    """The file a space name (or a path ending in .yaml) refers to: the first found in
    search_dirs (the user's folders), then in the package's search spaces."""
    if not isinstance(name, str):
        fail(where, "space", f"expected a space name, got {show(name)}")
    if name.endswith(".yaml"):
        return Path(name)
    found = catalog.find(name, catalog.SPACES, search_dirs)
    if found is None:
        fail(where, "space", catalog.unknown(name, catalog.SPACES, search_dirs))
    return shown(found)


def read_space(name: Any, search_dirs: Sequence[Path], where: str) -> tuple[dict[str, Any], str]:
    """The plain mapping of a space (its name filled from the file's stem), and its file."""
    path = space_file(name, search_dirs, where)
    return {"name": path.stem, **read_mapping(path)}, str(path)
