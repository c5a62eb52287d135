"""Spaces and experiments by name: the user's folders first, then the package's copy; the
`spaces`, `experiments` and `init` commands."""

from pathlib import Path

import pytest

from towerspace import catalog
from towerspace.cli import main
from towerspace.config import ConfigError, load_experiment

REPO = Path(__file__).resolve().parent.parent
SPACES = sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
TWO_POINTS = "# two points only\nsearcher: grid\nparams:\n  model.towers: {grid: [1, depthwise]}\n"
EXPERIMENT = """# a fresh experiment
name: fresh
data: {name: digits, image_size: 16}
model: {width: 0.25, middle_blocks: 1}
space: continuum
"""


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty working directory outside the checkout: no search_spaces/, no experiments/."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _towers(cfg) -> tuple:
    return cfg.space.params["model.towers"].values


def test_the_package_copy_is_the_repositorys_folders():
    for kind in (catalog.SPACES, catalog.EXPERIMENTS):
        shipped = catalog.shipped_dir(kind)
        assert sorted(p.name for p in shipped.glob("*.yaml")) == sorted(
            p.name for p in (REPO / kind).glob("*.yaml")
        )


def test_an_experiment_in_a_fresh_folder_finds_the_packages_space(fresh):
    (fresh / "exp.yaml").write_text(EXPERIMENT)
    cfg = load_experiment("exp.yaml")
    assert cfg.space.name == "continuum" and len(_towers(cfg)) == 7


def test_the_users_space_wins_over_the_packages(fresh):
    (fresh / "search_spaces").mkdir()
    (fresh / "search_spaces/continuum.yaml").write_text(TWO_POINTS)
    assert _towers(load_experiment("digits_continuum")) == (1, "depthwise")  # a shipped one
    (fresh / "exp.yaml").write_text(EXPERIMENT)
    assert _towers(load_experiment("exp.yaml")) == (1, "depthwise")
    group_width = load_experiment("exp.yaml", ["space=group_width"])  # not shadowed
    assert len(_towers(group_width)) == 7


def test_the_space_beside_an_experiment_wins_over_the_working_directorys(fresh):
    (fresh / "search_spaces").mkdir()
    (fresh / "search_spaces/continuum.yaml").write_text(TWO_POINTS)
    project = fresh / "project"
    (project / "search_spaces").mkdir(parents=True)
    (project / "search_spaces/continuum.yaml").write_text(TWO_POINTS.replace("1,", "4,"))
    (project / "exp.yaml").write_text(EXPERIMENT)
    assert _towers(load_experiment("project/exp.yaml")) == (4, "depthwise")
    (project / "experiments").mkdir()
    (project / "experiments/exp.yaml").write_text(EXPERIMENT)  # the folder above also counts
    assert _towers(load_experiment("project/experiments/exp.yaml")) == (4, "depthwise")


def test_the_users_experiment_wins_over_the_packages(fresh):
    shipped = load_experiment("digits_continuum")
    assert shipped.seeds == (0, 1)
    assert Path(shipped.source).resolve() == (REPO / "experiments/digits_continuum.yaml")
    text = (REPO / "experiments/digits_continuum.yaml").read_text()
    (fresh / "experiments").mkdir()
    (fresh / "experiments/digits_continuum.yaml").write_text(text.replace("[0, 1]", "[5]"))
    cfg = load_experiment("digits_continuum")
    assert cfg.seeds == (5,) and cfg.source == "experiments/digits_continuum.yaml"
    (fresh / "digits_continuum.yaml").write_text(text.replace("[0, 1]", "[7]"))
    cfg = load_experiment("digits_continuum")  # the working directory first
    assert cfg.seeds == (7,) and cfg.source == "digits_continuum.yaml"


def test_unknown_names_are_one_line_naming_the_value_and_what_is_allowed(fresh, capsys):
    assert main(["sweep", "digits_continum"]) == 2
    assert capsys.readouterr().err == (
        "towerspace: error: no experiment 'digits_continum'; did you mean 'digits_continuum'? "
        f"(available: {', '.join(EXPERIMENTS)}, or a path to an experiment file)\n"
    )
    (fresh / "search_spaces").mkdir()
    (fresh / "search_spaces/mine.yaml").write_text(TWO_POINTS)
    (fresh / "exp.yaml").write_text(EXPERIMENT.replace("continuum", "contnuum"))
    with pytest.raises(ConfigError) as err:
        load_experiment("exp.yaml")
    available = ", ".join(sorted([*SPACES, "mine"]))
    assert str(err.value) == (
        "exp.yaml: space: no search space 'contnuum'; did you mean 'continuum'? "
        f"(available: {available})"
    )


def test_a_path_is_taken_as_a_path_never_as_a_name(fresh):
    for path in ("digits_continuum.yaml", "experiments/digits_continuum.yaml"):
        with pytest.raises(ConfigError, match=f"^{path}: no such file$"):
            load_experiment(path)


def test_spaces_lists_names_origins_and_descriptions(fresh, capsys):
    (fresh / "search_spaces").mkdir()
    (fresh / "search_spaces/continuum.yaml").write_text(TWO_POINTS)
    (fresh / "search_spaces/mine.yaml").write_text(TWO_POINTS.replace("# two", "# my two"))
    assert main(["spaces"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("search spaces, for an experiment's space field (found in "
                        "search_spaces/ first, then in the package):")  # fmt: skip
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert sorted(rows) == sorted([*SPACES, "mine"])
    assert rows["continuum"].split() == [
        "continuum", "search_spaces/", "(over", "the", "package's)", "two", "points", "only"
    ]  # fmt: skip
    assert rows["mine"].split()[:2] == ["mine", "search_spaces/"]
    assert rows["mine"].endswith("  my two points only")
    assert rows["per_flow"].split()[1] == "package"
    assert rows["per_flow"].endswith(
        "  entry/middle/exit tower counts chosen independently, Optuna TPE"  # its description
    )
    assert lines[-1].startswith("package: ")


def test_experiments_lists_the_users_and_the_packages(fresh, capsys):
    (fresh / "experiments").mkdir()
    (fresh / "experiments/mine.yaml").write_text(EXPERIMENT)
    (fresh / "compose.yaml").write_text("services: {}\n")  # not an experiment: left out
    (fresh / "here.yaml").write_text(EXPERIMENT.replace("# a fresh", "# another"))
    assert main(["experiments"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("experiments, for towerspace sweep NAME (found in ./ and experiments/ "
                        "first, then in the package):")  # fmt: skip
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in lines[1:-1]}
    assert sorted(rows) == sorted([*EXPERIMENTS, "here", "mine"])
    assert rows["mine"] == ["experiments/", "a fresh experiment"]
    assert rows["here"] == ["./", "another experiment"]
    assert rows["digits_continuum"] == [
        "package", "The default demo (`make run`): a parameter-matched tower continuum on "
                   "handwritten digits, CPU."
    ]  # fmt: skip
    assert all(row[0] == "package" and row[1] for name, row in rows.items() if name in EXPERIMENTS)


def test_init_writes_a_copy_to_edit_and_never_replaces_a_file(fresh, capsys):
    shipped = (REPO / "experiments/digits_continuum.yaml").read_bytes()
    assert main(["init"]) == 0
    assert (fresh / "digits_continuum.yaml").read_bytes() == shipped
    assert capsys.readouterr().out == (
        "wrote digits_continuum.yaml, a copy of the package's digits_continuum\n"
        "edit it, then run it: towerspace sweep digits_continuum.yaml (with --smoke first: the "
        "whole path in seconds)\n"
    )
    (fresh / "digits_continuum.yaml").write_text("# mine\n")
    before = sorted(fresh.rglob("*"))
    assert main(["init", "digits_continuum", "."]) == 2
    assert capsys.readouterr().err == (
        "towerspace: error: init: digits_continuum.yaml exists already; nothing written (edit it, "
        "or name another folder)\n"
    )
    assert (fresh / "digits_continuum.yaml").read_text() == "# mine\n"
    assert sorted(fresh.rglob("*")) == before
    (fresh / "link.yaml").symlink_to(fresh / "nowhere.yaml")  # a dangling link is refused too
    (fresh / "link").mkdir()
    (fresh / "link/cifar10_continuum.yaml").symlink_to(fresh / "nowhere.yaml")
    assert main(["init", "cifar10_continuum", "link"]) == 2
    assert not (fresh / "nowhere.yaml").exists()


def test_init_into_a_new_folder_and_the_copy_runs_from_there(fresh, capsys):
    assert main(["init", "digits_resnet18", "mine/exps"]) == 0
    copy = fresh / "mine/exps/digits_resnet18.yaml"
    assert copy.read_bytes() == (REPO / "experiments/digits_resnet18.yaml").read_bytes()
    assert load_experiment("mine/exps/digits_resnet18.yaml").name == "digits_resnet18"
    assert main(["init", "nope", "other"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err
    assert not (fresh / "other").exists()
