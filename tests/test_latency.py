"""Latency-aware search: layer times measured once per shape and shared, multi-objective Optuna
with bounds as constraints, and a sweep whose results carry both objectives and a front."""

import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch

from towerspace import analysis, config, results
from towerspace.latency import TABLE, LatencyTable, model_latency, units
from towerspace.models import build_model, complexity, xception
from towerspace.models.build import ModelConfig, at_width
from towerspace.report import write_report
from towerspace.spaces import Domain, SpaceConfig
from towerspace.study import load_study
from towerspace.sweep import run_sweep, tuner
from towerspace.sweep.trainable import IMPL_CHOICES

REPO = Path(__file__).resolve().parent.parent


def _digits(*sets):
    base = ("train.epochs=1", "model.width=0.125", "model.middle_blocks=1", "model.match=params")
    return config.load_experiment(REPO / "experiments/digits_continuum.yaml", [*base, *sets])


SMALL = {"width": 0.125, "middle_blocks": 2, "stem": "small", "num_classes": 10, "in_chans": 1}


def test_each_distinct_layer_is_timed_once_and_kept(tmp_path):
    torch.manual_seed(0)
    model = xception(towers=4, **SMALL)
    x = torch.randn(8, 1, 16, 16)
    table = LatencyTable(tmp_path / TABLE)
    first = model_latency(model, x, table=table, min_time=0.001, repeats=1)
    names = [name for name, _ in units(model)]
    assert set(first.layers) == set(names) and first.ms == pytest.approx(sum(first.layers.values()))
    # the two middle blocks are alike: their layers share signatures, timed once
    assert first.measured == len(json.loads((tmp_path / TABLE).read_text())["seconds"])
    assert first.measured < len(names)
    assert first.layers["middle.block5.convs.0"] == first.layers["middle.block6.convs.0"]
    again = model_latency(model, x, table=LatencyTable(tmp_path / TABLE))  # another process
    assert again.measured == 0 and again.ms == first.ms
    wider = model_latency(xception(towers=4, **{**SMALL, "width": 0.25}), x, table=table,
                          min_time=0.001, repeats=1)  # fmt: skip
    assert wider.measured > 0  # new widths, new shapes


def test_a_process_timing_layers_holds_the_table_and_others_use_its_times(tmp_path):
    """Concurrent trials time each layer once: a second one waits for the table's lock, then
    reads what the first saved instead of timing the same layers under its load."""
    import threading

    torch.manual_seed(0)
    model, x = xception(towers=4, **SMALL), torch.randn(4, 1, 16, 16)
    first = LatencyTable(tmp_path / TABLE)
    found = {}
    with first.locked():
        later = threading.Thread(target=lambda: found.update(
            latency=model_latency(model, x, table=LatencyTable(tmp_path / TABLE))))  # fmt: skip
        later.start()
        later.join(timeout=1.0)
        assert later.is_alive()  # waiting for the lock, timing nothing
        own = LatencyTable()  # timed meanwhile, then saved as a trial holding the lock would
        timed = model_latency(model, x, table=own, min_time=0.001, repeats=1)
        first.add(own.seconds)
    later.join(timeout=60)
    assert found["latency"].measured == 0 and found["latency"].layers == timed.layers
    assert (tmp_path / f"{TABLE}.lock").exists()


def test_timing_leaves_the_model_and_the_random_streams_as_they_were():
    torch.manual_seed(0)
    model = xception(towers=2, **SMALL).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    model_latency(model, torch.randn(4, 1, 16, 16, generator=torch.Generator()), min_time=0.001,
                  repeats=1)  # fmt: skip
    assert torch.equal(torch.rand(3), expected) and model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _space(**changes) -> SpaceConfig:
    params = {"model.towers": Domain("choice", (1, 2, 4, 8))}
    return SpaceConfig(name="t", searcher="optuna", num_samples=4, params=params, **changes)


def test_a_multi_objective_search_tells_optuna_every_objective_and_bound_over_seeds():
    space = _space(objectives={"latency_ms": "min"}, constraints={"latency_ms": 5.0})
    search = tuner.searcher(space, seeds=(0, 1))
    assert not search.set_search_properties("val_acc", "max", {})  # Tune's metric changes nothing
    for i in range(4):  # 2 points x 2 seeds
        assert "model.towers" in search.suggest(f"t{i}")
        search.on_trial_complete(f"t{i}", {"val_acc": 0.5 + 0.1 * i, "latency_ms": 3.0 + 2 * i})
    study = search.searcher._ot_study
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE,
                                optuna.study.StudyDirection.MINIMIZE]  # fmt: skip
    first, second = study.trials
    assert first.values == pytest.approx([0.55, 4.0]) and second.values == pytest.approx(
        [0.75, 8.0]
    )
    assert first.constraints == pytest.approx({"latency_ms": -1.0})  # 4 ms: 1 under the bound
    assert second.constraints == pytest.approx({"latency_ms": 3.0})  # 8 ms: 3 over it
    from optuna.study._constrained_optimization import _get_feasible_trials

    assert _get_feasible_trials(study.trials) == [first]  # what the sampler steers by


def test_a_point_no_seed_finished_is_failed_not_told_nan():
    space = _space()
    search = tuner.searcher(space, seeds=(0, 1))
    assert search.set_search_properties("val_acc", "max", tuner.param_space(space, (0, 1)))
    for i in range(2):
        search.suggest(f"t{i}")
        search.on_trial_complete(f"t{i}", None, error=True)
    (trial,) = search.searcher._ot_study.trials
    assert trial.state == optuna.trial.TrialState.FAIL


def test_objectives_and_bounds_are_checked(project):
    base = config.load_experiment("digits_continuum", ["space=per_flow"])
    assert base.space.objectives == {} and not base.space.measures_latency
    with pytest.raises(ValueError, match=r"objectives: needs a searcher that samples"):
        config.load_experiment("digits_continuum", ["space.objectives={latency_ms: min}"])
    with pytest.raises(ValueError, match=r"objectives.latency_ms: 'fastest' is not allowed; "
                                         r"allowed: max, min"):  # fmt: skip
        config.load_experiment(
            "digits_continuum", ["space=per_flow", "space.objectives={latency_ms: fastest}"]
        )
    with pytest.raises(ValueError, match=r"constraints.lat: 'lat' is not a metric trials report"):
        config.load_experiment("digits_continuum", ["space=per_flow", "space.constraints={lat: 5}"])


@pytest.mark.slow
def test_a_latency_aware_sweep_repeats_points_over_seeds_and_flags_its_front(tmp_path):
    cfg = _digits(
        "space=per_flow",
        "space.num_samples=2",
        "seeds=[0, 1]",
        "train.max_steps=2",
        "space.objectives={latency_ms: min}",
        "space.constraints={latency_ms: 1e6}",
    )
    outcome = run_sweep(cfg, storage=tmp_path)
    table = results.load(outcome.results_path)
    assert outcome.statuses == {"finished": 4}
    points = table.groupby("point")["seed"].apply(sorted)
    assert len(points) == 2 and all(seeds == [0, 1] for seeds in points)
    assert all("[entry=" in label for label in table["towers"])
    # both objectives in the results; a point's seeds read the same layer times
    assert table["latency_ms"].notna().all() and table["final_val_acc"].notna().all()
    assert (table.groupby("point")["latency_ms"].nunique() == 1).all()
    saved = json.loads((outcome.sweep_dir / TABLE).read_text())["seconds"]
    prefix = f"cpu|float32|nchw|train|{cfg.train.batch_size}x"  # a worker's training batch
    assert saved and all(key.startswith(prefix) for key in saved)
    assert not (outcome.sweep_dir / IMPL_CHOICES).exists()
    summary = analysis.summarize(table)
    assert summary["pareto_latency"].any() and "pareto_flops" in summary
    study = load_study(outcome.sweep_dir, cfg.name)  # optuna-dashboard's view: both objectives
    means = table.groupby("point")[["final_val_acc", "latency_ms"]].mean()
    assert sorted(t.values[1] for t in study.trials) == pytest.approx(sorted(means["latency_ms"]))
    assert sorted(t.values[0] for t in study.trials) == pytest.approx(
        sorted(means["final_val_acc"])
    )
    assert all(len(t.values) == 2 and t.constraints["latency_ms"] < 0 for t in study.trials)
    figures = write_report(outcome.sweep_dir, tables=outcome.tables).figures
    assert outcome.sweep_dir / "plots" / "pareto_latency.png" in figures


def _flops_ms(model: torch.nn.Module) -> float:
    """A deterministic stand-in for a measured step time: forward MFLOPs at 16 px."""
    return complexity(model, 16, 1).flops / 1e6


MATCHED = {"width": 0.125, "middle_blocks": 1, "match": "latency"}
SIZES = {"in_chans": 1, "num_classes": 10, "image_size": 16}


def test_a_latency_match_solves_the_width_whose_measured_time_is_the_references():
    cfg = ModelConfig(towers=1, **MATCHED)
    torch.manual_seed(0)
    model = build_model(cfg, measure=_flops_ms, **SIZES)
    budget = model.budget
    reference = build_model(at_width(replace(cfg, towers="depthwise"), cfg.width), **SIZES)
    assert budget["match"] == "latency"
    assert budget["budget_target"] == round(_flops_ms(reference) * 1e3)  # µs
    assert abs(budget["budget_error"]) < 0.02 and budget["solved_width"] < cfg.width
    torch.manual_seed(0)  # timing draws nothing: the weights are a plain build's at that width
    plain = build_model(at_width(cfg, budget["solved_width"]), **SIZES)
    pairs = zip(model.state_dict().values(), plain.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    same = build_model(replace(cfg, towers="depthwise"), measure=_flops_ms, **SIZES).budget
    assert same["solved_width"] == cfg.width and same["budget_error"] == 0.0
    # the meta device of the preflight and the estimate has nothing to time: the FLOPs match
    assert build_model(cfg, **SIZES).budget["match"] == "flops"


def test_a_latency_matched_trial_records_its_time_and_rebuilds_its_width_on_a_retry(tmp_path):
    from towerspace.trial import Trial

    cfg = _digits("model.match=latency", "model.towers=2", "train.max_steps=1")
    record_path = tmp_path / "records" / "t.json"
    record_path.parent.mkdir()
    trial = Trial(cfg, seed=0, trial_id="t_00000", point={}, record_path=record_path)
    budget, record = trial.model.budget, trial.record
    assert record["match"] == "latency" and record["width"] == budget["solved_width"]
    assert record["latency_ms"] == pytest.approx(budget["budget_achieved"] / 1e3, rel=0.01)
    assert (tmp_path / TABLE).exists()
    trial._write()
    (tmp_path / TABLE).unlink()  # new layer times could solve another width: the record's wins
    retry = Trial(cfg, seed=0, trial_id="t_00000", point={}, record_path=record_path)
    shapes = [p.shape for p in trial.model.parameters()]
    assert [p.shape for p in retry.model.parameters()] == shapes
    kept = ("width", "budget_error", "latency_ms", "params", "flops")
    assert {k: retry.record[k] for k in kept} == {k: record[k] for k in kept}
    assert not (tmp_path / TABLE).exists()  # nothing was timed again


def test_a_latency_match_is_refused_across_data_parallel_workers(project):
    with pytest.raises(ValueError, match=r"model.match: 'latency' needs resources.workers 1, "
                                         r"got 2 \(each worker"):  # fmt: skip
        config.load_experiment("digits_continuum", ["model.match=latency", "resources.workers=2"])
