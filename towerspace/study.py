"""A sweep's Optuna study in its folder (Optuna's journal storage), built from the trial records,
so that optuna.load_study and optuna-dashboard open it, after a kill and --resume too."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from towerspace import files
from towerspace.spaces import Domain, SpaceConfig
from towerspace.status import Status

STUDY_FILE = "optuna.journal"


def distribution(domain: Domain):
    """The Optuna distribution of a space parameter (grid and choice values as categories)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if domain.kind in ("uniform", "loguniform"):
        low, high = domain.values
        return FloatDistribution(low, high, log=domain.kind == "loguniform")
    if domain.kind == "randint":  # Tune's randint excludes high; Optuna's includes it
        low, high = domain.values
        return IntDistribution(int(low), int(high) - 1)
    return CategoricalDistribution([category(v) for v in domain.values])


def category(value: Any) -> Any:
    """A value as an Optuna category: None, bool, int, float and str as they are, the others
    (a group width, a per-layer schedule) as their JSON text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True)


def _points(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], list[Mapping]]:
    """Records grouped by point and sample (a point's seeds together; a point a searcher
    proposed twice is two samples), in trial-id order (a grid's: the order Tune made them)."""
    grouped: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for record in sorted(records, key=lambda r: r.get("trial_id", "")):
        point = json.dumps(record.get("point", {}), sort_keys=True)
        sample = 0
        while any(r.get("seed") == record.get("seed") for r in grouped.get((point, sample), [])):
            sample += 1
        grouped.setdefault((point, sample), []).append(record)
    return grouped


def _value(record: Mapping[str, Any], metric: str) -> float | None:
    """A finished trial's last reported metric (an epoch's, or a fixed cost: latency_ms)."""
    history = record.get("history") or []
    if record.get("status") != Status.FINISHED or not history:
        return None
    value = history[-1].get(metric, record.get(metric))
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _mean(group: list[Mapping[str, Any]], metric: str) -> float | None:
    done = [v for v in (_value(r, metric) for r in group) if v is not None]
    return sum(done) / len(done) if done else None


def _trial(point: Mapping[str, Any], group: list[Mapping[str, Any]], space: SpaceConfig):
    """One Optuna trial for one point: its values are the means of its seeds' final metrics
    (what the sweep's searcher was told), with the space's bounds as Optuna constraints; a point
    with no finished seed is a failed trial."""
    import optuna
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    values = {r["seed"]: _value(r, space.metric) for r in group}
    means = [_mean(group, name) for name in (space.metric, *space.objectives)]
    done = None not in means
    excess = {name: _mean(group, name) for name in space.constraints}
    bounds = {f"{_CONSTRAINTS_KEY}:{name}": (1.0 if v is None else v - space.constraints[name])
              for name, v in excess.items()}  # fmt: skip
    names = [name for name in space.params if name in point]
    return optuna.trial.create_trial(
        params={name: category(point[name]) for name in names},
        distributions={name: distribution(space.params[name]) for name in names},
        values=means if done else None,
        state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.FAIL,
        system_attrs=bounds,
        user_attrs={
            "towers": group[0].get("towers"),
            "seeds": sorted(values),
            "seed_values": [values[s] for s in sorted(values)],
            "trial_ids": [r["trial_id"] for r in group],
            "params": group[0].get("params"),
            "flops": group[0].get("flops"),
            "latency_ms": group[0].get("latency_ms"),
        },
    )


def write_study(
    sweep_dir: Path, records: Sequence[Mapping[str, Any]], name: str, space: SpaceConfig
) -> Path:
    """Write sweep_dir/optuna.journal whole: study `name`, one trial per point of the sweep."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    trials = [_trial(json.loads(p), group, space) for (p, _), group in _points(records).items()]

    def write(tmp: Path) -> None:
        storage = JournalStorage(JournalFileBackend(str(tmp)))
        modes = (space.mode, *space.objectives.values())
        directions = ["maximize" if mode == "max" else "minimize" for mode in modes]
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
        try:
            with warnings.catch_warnings():  # set_metric_names is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study = optuna.create_study(study_name=name, storage=storage,
                                            directions=directions)  # fmt: skip
                study.set_metric_names([space.metric, *space.objectives])
            study.add_trials(trials)
        finally:
            optuna.logging.set_verbosity(verbosity)

    path = Path(sweep_dir) / STUDY_FILE
    return files.write_atomic(path, write, root=Path(sweep_dir))


def load_study(sweep_dir: Path, name: str):
    """The Optuna study of a sweep folder (read-only use: optuna.load_study on its journal)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(sweep_dir) / STUDY_FILE
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)
