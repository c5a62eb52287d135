"""Experiment and search-space files: every shipped file validates; mistakes get one exact line."""

import json
from pathlib import Path

import numpy as np
import pytest

from towerspace.cli import main
from towerspace.config import (
    ConfigError,
    apply,
    from_dict,
    load_experiment,
    load_space,
    to_dict,
)
from towerspace.spaces import Domain

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
BASE = """name: t
data: {name: digits, image_size: 16}
model: {width: 0.25, middle_blocks: 1}
space: continuum
seeds: [0]
train: {epochs: 1}
"""
TOWERS = "towers must be an int >= 1, 'regular' or 'depthwise', got"


def _write(project, text, name="x"):
    path = Path("experiments") / f"{name}.yaml"
    (project / path).write_text(text)
    return path


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_shipped_experiment_validates(path):
    cfg = load_experiment(path)
    assert cfg.name == path.stem and cfg.space.params and cfg.source == str(path)
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg  # as shipped to Ray workers


def test_every_shipped_space_loads_on_its_own():
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        space = load_space(path.stem, [REPO / "search_spaces"])
        assert space.name == path.stem and space.description and space.params
        assert load_space(str(path), []) == space  # a .yaml path is taken as is


def test_every_shipped_space_is_used_and_loads():
    spaces = {p.stem for p in (REPO / "search_spaces").glob("*.yaml")}
    assert spaces == {"continuum", "group_width", "inception_points", "per_flow",
                      "layerwise_random", "order_x_mid", "per_flow_latency",
                      "residual_x_towers"}  # fmt: skip
    for space in spaces:
        cfg = load_experiment(REPO / "experiments/digits_continuum.yaml", [f"space={space}"])
        assert cfg.space.name == space


def test_overrides_parse_as_yaml(project):
    path = _write(project, BASE)
    cfg = load_experiment(path, ["train.epochs=3", "train.lr=0.05", "train.nesterov=false",
                                 "train.max_steps=null", "model.towers={group_width: 8}",
                                 "seeds=[3, 4]", "model.overrides.middle=depthwise",
                                 "space.num_samples=2"])  # fmt: skip
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.nesterov) == (3, 0.05, False)
    assert cfg.model.towers == {"group_width": 8} and cfg.seeds == (3, 4)
    assert cfg.model.overrides == {"middle": "depthwise"} and cfg.space.num_samples == 2


def test_scheduler_shorthand_and_float_text(project):
    text = BASE.replace("epochs: 1", "epochs: 4, lr: 1e-3") + "scheduler: asha\n"
    cfg = load_experiment(_write(project, text), ["scheduler.grace_period=2"])
    assert (cfg.scheduler.name, cfg.scheduler.grace_period) == ("asha", 2)
    assert cfg.train.lr == 0.001  # YAML 1.1 reads 1e-3 as text; a float field takes it
    cfg = load_experiment(_write(project, BASE), ["scheduler=asha", "train.weight_decay=5e-4"])
    assert cfg.scheduler.name == "asha" and cfg.train.weight_decay == 5e-4


def test_space_overrides_keep_dotted_keys_whole(project):
    sets = ["space=per_flow", "space.params.model.overrides.middle.block1={choice: [1, 4]}"]
    cfg = load_experiment(_write(project, BASE), sets)
    assert cfg.space.params["model.overrides.middle.block1"] == Domain("choice", (1, 4))
    assert cfg.space.searcher == "optuna" and len(cfg.space.params) == 4


def test_loading_writes_nothing(project):
    path = _write(project, BASE)
    before = sorted(project.rglob("*"))
    load_experiment(path, ["train.epochs=2"])
    assert sorted(project.rglob("*")) == before


def test_apply_sets_a_trials_point_and_validates(project):
    cfg = load_experiment(_write(project, BASE))
    trial = apply(cfg, {"model.towers": 4, "model.overrides.exit": 1, "train.lr": 0.2})
    assert (trial.model.towers, trial.model.overrides, trial.train.lr) == (4, {"exit": 1}, 0.2)
    assert cfg.model.towers == "depthwise"  # frozen: the base is untouched
    with pytest.raises(ConfigError, match=f"model.towers: {TOWERS} 0"):
        apply(cfg, {"model.towers": 0})


def test_apply_takes_dotted_site_prefixes_and_numpy_scalars(project):
    cfg = load_experiment(_write(project, BASE))
    trial = apply(cfg, {"model.overrides.middle.block1": 2, "model.layer_seed": np.int64(7),
                        "train.lr": np.float64(0.5)})  # fmt: skip
    assert trial.model.overrides == {"middle.block1": 2}
    assert trial.model.layer_seed == 7 and type(trial.model.layer_seed) is int
    assert trial.train.lr == 0.5 and type(trial.train.lr) is float
    assert from_dict(to_dict(trial)) == trial
    with pytest.raises(ConfigError) as err:
        apply(cfg, {"train.epoch": 2})
    assert str(err.value) == "experiments/x.yaml: train.epoch: unknown field; did you mean " \
        "'train.epochs'?"  # fmt: skip


@pytest.mark.parametrize(
    ("base", "assignments"),
    [
        ([], {"model.towers": 4, "train.lr": 0.2}),
        ([], {"train.epochs": 0}),
        ([], {"data.image_size": 1, "train.lr": -1}),  # the first field in file order
        ([], {"scheduler.name": "asha", "scheduler.grace_period": 2}),
        (["train.epochs=4", "scheduler=asha", "scheduler.grace_period=3"], {"train.epochs": 2}),
        ([], {"resources.workers": 3}),
        (["resources.workers=2"], {"train.batch_size": 127}),
        ([], {"model.name": "resnet18"}),
        ([], {"model.builder": "x.py:build"}),
        ([], {"seeds": [1, 1]}),
        ([], {"data.split_seed": -1}),
        ([], {"name": "my sweep"}),
        ([], {"model.overrides.middle": 0}),
        ([], {"model.reference": "x"}),
        ([], {"scheduler": "hyperband"}),
        ([], {"model.towers": {"group_width": -2}}),
    ],
)  # fmt: skip
def test_apply_checks_what_it_sets_as_loading_would(project, base, assignments):
    path = _write(project, BASE)
    cfg = load_experiment(path, base)
    sets = [*base, *(f"{key}={json.dumps(value)}" for key, value in assignments.items())]
    try:
        loaded = load_experiment(path, sets)
    except ConfigError as err:
        with pytest.raises(ConfigError) as applied:
            apply(cfg, assignments)
        assert str(applied.value) == str(err)
    else:
        assert apply(cfg, assignments) == loaded


BAD_FILES = [
    ("epochs: 1", "epoch: 1", "train.epoch: unknown field; did you mean 'epochs'? (allowed: amp, "
     "batch_size, channels_last, decay_epochs, deterministic, device, epochs, eval_batch_size, "
     "gamma, label_smoothing, lr, max_steps, momentum, nesterov, optimizer, schedule, "
     "warmup_epochs, weight_decay)"),
    ("epochs: 1", "epochs: 1, colour: red", "train.colour: unknown field (allowed: amp, "
     "batch_size, channels_last, decay_epochs, deterministic, device, epochs, eval_batch_size, "
     "gamma, label_smoothing, lr, max_steps, momentum, nesterov, optimizer, schedule, "
     "warmup_epochs, weight_decay)"),
    ("epochs: 1", "epochs: ten", "train.epochs: expected an integer, got 'ten'"),
    ("epochs: 1", "epochs: true", "train.epochs: expected an integer, got true"),
    ("epochs: 1", "epochs: 1, lr: -0.1", "train.lr: -0.1 is out of range; allowed: > 0"),
    ("name: digits", "name: cifar", "data.name: 'cifar' is not allowed; did you mean 'cifar10'? "
     "(allowed: digits, mnist, cifar10, cifar100, imagefolder, synthetic)"),
    ("seeds: [0]", "seeds: [0",
     "not valid YAML (line 6, column 6): expected ',' or ']', but got ':'"),
    ("seeds: [0]", "seeds: []", "seeds: needs at least one seed"),
    ("epochs: 1", "epochs: null", "train.epochs: expected an integer, got null"),
    ("epochs: 1", "epochs: 1, max_steps: null, lr: 0.1x",
     "train.lr: expected a number, got '0.1x'"),
    ("space: continuum\n", "", "space: missing (required)"),
    ("seeds: [0]", "seeds: [0]\nscheduler: hyperband",
     "scheduler.name: 'hyperband' is not allowed (allowed: fifo, asha)"),
    ("seeds: [0]", "seeds: [1, 1]", "seeds: [1, 1] repeats a seed"),
    ("name: t\n", "", "name: missing (required)"),
    ("name: t", "name: my sweep",
     "name: 'my sweep' is not allowed; a sweep name is one folder name: letters, digits, '_', "
     "'-' and '.', not starting with '.' or '-' (at most 100 characters)"),
    ("space: continuum", "space: contnuum", "space: no search space 'contnuum'; did you mean "
     "'continuum'? (available: continuum, group_width, inception_points, layerwise_random, "
     "order_x_mid, per_flow, per_flow_latency, residual_x_towers)"),
    ("middle_blocks: 1", "middle_blocks: 1, towers: 0", f"model.towers: {TOWERS} 0"),
    ("middle_blocks: 1", "middle_blocks: 1, towers: {group_width: -2}",
     "model.towers: group_width must be an int >= 1, got -2"),
    ("middle_blocks: 1", "middle_blocks: 1, overrides: {middle: 0}",
     f"model.overrides.middle: {TOWERS} 0"),
    ("width: 0.25", "width: 0", "model.width: 0 is out of range; allowed: > 0 and <= 16"),
    ("middle_blocks: 1", "middle_blocks: 1, order: spatial_frist", "model.order: "
     "'spatial_frist' is not allowed; did you mean 'spatial_first'? (allowed: spatial_first, "
     "pointwise_first)"),
    ("seeds: [0]", "seeds: [0]\nscheduler: {name: hyperband}",
     "scheduler.name: 'hyperband' is not allowed (allowed: fifo, asha)"),
    ("seeds: [0]", "seeds: [0]\nscheduler: {name: asha, grace_period: 5}",
     "scheduler.grace_period: 5 is more than train.epochs (1)"),
    ("seeds: [0]", "seeds: [0]\nresources: {cpus: 0}",
     "resources.cpus: 0 is out of range; allowed: > 0"),
    ("seeds: [0]", "seeds: [0]\nresources: {workers: 2, gpus: 0.5}",
     "resources.gpus: 0.5 per worker with workers=2; data-parallel workers each take one whole "
     "GPU or none (allowed: 0, 1)"),
    ("seeds: [0]", "seeds: [0]\nresources: {workers: 3}",
     "train.batch_size: 128 does not split evenly over resources.workers=3 (the global batch is "
     "divided among the workers)"),
    ("seeds: [0]", "seeds: [0]\nresources: {workers: 0}",
     "resources.workers: 0 is out of range; allowed: 1 to 1024"),
    ("seeds: [0]", "seeds: [0]\nstorage: !!python/object/apply:os.system ['touch pwned']",
     "not valid YAML (line 6, column 10): tags like !!python/... are not allowed (files are read "
     "with safe_load)"),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new", "message"), BAD_FILES)
def test_bad_experiment_files(project, old, new, message, capsys):
    path = _write(project, BASE.replace(old, new))
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert str(err.value) == f"{path}: {message}"
    before = sorted(project.rglob("*"))
    assert main(["sweep", str(path), "--storage", "out"]) == 2  # the command, as a user runs it
    assert capsys.readouterr().err == f"towerspace: error: {path}: {message}\n"
    assert sorted(project.rglob("*")) == before  # nothing written, nothing started
    assert not (project / "pwned").exists()


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("model.tower: {grid: [1, 2]}",
         "params.model.tower: names no experiment field; did you mean 'model.towers'?"),
        ("model.towers: {grid: [1, 0]}", f"params.model.towers: 0: {TOWERS} 0"),
        ("seed: {grid: [1, 2]}",
         "params.seed: seeds come from the experiment's seeds, not the space"),
        ("train.lr: {uniform: [1, 0.1]}",
         "params.train.lr: uniform needs [low, high] with low < high, got [1, 0.1]"),
        ("train.lr: {normal: [0, 1]}", "params.train.lr: expected one of {grid, choice, uniform, "
         "loguniform, randint}: [values], got {'normal': [0, 1]}"),
    ],
)  # fmt: skip
def test_bad_search_spaces(project, space, message):
    (project / "search_spaces/bad.yaml").write_text(f"searcher: grid\nparams:\n  {space}\n")
    path = _write(project, BASE.replace("space: continuum", "space: bad"))
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert str(err.value) == f"search_spaces/bad.yaml: {message}"


def test_grid_needs_the_grid_searcher(project):
    (project / "search_spaces/bad.yaml").write_text(
        "searcher: optuna\nparams:\n  model.towers: {grid: [1, 2]}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(project, BASE.replace("space: continuum", "space: bad")))
    assert str(err.value) == (
        "search_spaces/bad.yaml: params.model.towers: grid needs searcher: grid "
        "(optuna samples; use choice)"
    )


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ("train.epoch=1", "--set train.epoch=1: unknown field; did you mean 'train.epochs'?"),
        ("train.epochs", "--set train.epochs: expected key=value"),
        ("train.epochs=0", "experiments/x.yaml: train.epochs: 0 is out of range; allowed: >= 1"),
        ("space.searcher=bayes", "search_spaces/continuum.yaml: searcher: 'bayes' is not allowed "
         "(allowed: grid, random, optuna, nsga2)"),
    ],
)  # fmt: skip
def test_bad_overrides(project, sets, message, capsys):
    path = _write(project, BASE)
    with pytest.raises(ConfigError) as err:
        load_experiment(path, [sets])
    assert str(err.value) == message
    before = sorted(project.rglob("*"))
    assert main(["sweep", str(path), "--storage", "out", "--set", sets]) == 2  # as a user runs it
    assert capsys.readouterr().err == f"towerspace: error: {message}\n"
    assert sorted(project.rglob("*")) == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- name: t\n", "expected a mapping of fields at the top, got a list"),
        ("", "expected a mapping of fields at the top, got an empty file"),
        ("just text\n", "expected a mapping of fields at the top, got 'just text'"),
    ],
)  # fmt: skip
def test_top_level_must_be_a_mapping(project, text, message):
    path = _write(project, text)
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("space", "message", "alone"),
    [
        ("train.epochs: {uniform: [1, 10]}", "params.train.epochs: uniform draws real numbers, "
         "but train.epochs takes integers; use choice", True),
        ("train.lr: {loguniform: [0, 1]}",
         "params.train.lr: loguniform needs [low, high] with 0 < low < high, got [0, 1]", True),
        ("model.layer_seed: {randint: [0, 1.5]}", "params.model.layer_seed: randint needs "
         "[low, high] with integers low < high, got [0, 1.5]", True),
        ("model.overrides.exit: {choice: [1, dense]}", "params.model.overrides.exit: 'dense': "
         "towers must be an int >= 1, 'regular' or 'depthwise', got 'dense'", True),
        ("model.middle_blocks: {randint: [0, 100]}",  # Ray's randint excludes 100
         "params.model.middle_blocks: 99 is out of range; allowed: 0 to 64", False),
        ("model.dropout: {uniform: [0, 1]}",
         "params.model.dropout: 1 is out of range; allowed: 0 to 0.95", False),
    ],
)  # fmt: skip
def test_bad_sampled_spaces(project, space, message, alone):
    (project / "search_spaces/bad.yaml").write_text(f"searcher: random\nparams:\n  {space}\n")
    path = _write(project, BASE.replace("space: continuum", "space: bad"))
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert str(err.value) == f"search_spaces/bad.yaml: {message}"
    if alone:  # what the space file alone can tell, it tells with the same words
        with pytest.raises(ConfigError) as err:
            load_space("bad", ["search_spaces"])
        assert str(err.value) == f"search_spaces/bad.yaml: {message}"
    else:  # ranges are checked against the experiment's fields
        assert load_space("bad", ["search_spaces"]).params


def test_load_space_names_what_is_available(project):
    with pytest.raises(ConfigError) as err:
        load_space("group_widht", ["search_spaces"])
    assert str(err.value) == (
        "space: no search space 'group_widht'; did you mean 'group_width'? (available: "
        "continuum, group_width, inception_points, layerwise_random, order_x_mid, per_flow, "
        "per_flow_latency, residual_x_towers)"
    )
    with pytest.raises(ConfigError, match=r"^elsewhere/none.yaml: no such file$"):
        load_space("elsewhere/none.yaml", ["search_spaces"])


def test_missing_file(project):
    with pytest.raises(ConfigError, match=r"^experiments/nope.yaml: no such file$"):
        load_experiment("experiments/nope.yaml")


def test_sweep_command_refuses_bad_input_before_anything_starts(project, capsys):
    path = _write(project, BASE.replace("epochs: 1", "epochs: 0"))
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    assert main(["sweep", str(path), "--storage", "out"]) == 2
    assert capsys.readouterr().err == (
        "towerspace: error: experiments/x.yaml: train.epochs: 0 is out of range; allowed: >= 1\n"
    )
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before  # nothing written


def test_a_storage_uri_pyarrow_cannot_open_is_refused_not_folded_into_a_folder(project, capsys):
    path = _write(project, BASE)
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    assert main(["sweep", str(path), "--storage", "nosuch://bucket/runs"]) == 2
    assert capsys.readouterr().err == (
        "towerspace: error: --storage nosuch://bucket/runs: cannot open it (Unrecognized "
        "filesystem type in URI: nosuch://bucket/runs); allowed: a folder, or a URI that "
        "pyarrow.fs opens (s3://, gs://, hdfs://, file://)\n"
    )
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before
