"""What a user can put in a file or --set that must be refused in one line, and quickly."""

import time
from pathlib import Path

import pytest

from towerspace.cli import main
from towerspace.config import ConfigError, load_experiment, parse_override
from towerspace.models import ModelConfig, build_model

REPO = Path(__file__).resolve().parent.parent
BASE = """name: t
data: {name: digits, image_size: 16}
model: {width: 0.25, middle_blocks: 1}
space: continuum
seeds: [0]
train: {epochs: 1}
"""
NAME_RULE = ("a sweep name is one folder name: letters, digits, '_', '-' and '.', not starting "
             "with '.' or '-' (at most 100 characters)")  # fmt: skip
HANG = 2.0  # seconds: generous, only to tell a refusal from a hang


def _write(project: Path, text: str, name: str = "x") -> Path:
    path = Path("experiments") / f"{name}.yaml"
    (project / path).write_text(text)
    return path


def _refused(path, overrides=()) -> tuple[str, float]:
    """The message load_experiment refuses with, and how long it took."""
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_experiment(path, overrides)
    return str(err.value), time.monotonic() - start


def _laughs(levels: int) -> str:
    """A billion-laughs document: each level an anchored list of ten aliases of the one below."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- YAML bounds


def test_a_file_over_one_mib_is_refused_before_it_is_read(project):
    path = _write(project, BASE + "# " + "x" * 2**20 + "\n")
    size = (project / path).stat().st_size
    message, _ = _refused(path)
    assert message == (
        f"{path}: not accepted: {size:,} bytes is more than the limit of 1 MiB (1,048,576 bytes)"
    )


def test_a_set_value_over_one_mib_is_refused(project):
    path = _write(project, BASE)
    text = "model.overrides=" + "x" * (2**20 + 1)
    message, _ = _refused(path, [text])
    assert message == (
        f"--set model.overrides={'x' * 44}... ({len(text):,} characters): not accepted: "
        f"1,048,577 bytes is more than the limit of 1 MiB (1,048,576 bytes)"
    )


def test_deep_nesting_in_a_file_is_refused_quickly(project):
    deep = "[" * 100_000 + "]" * 100_000
    path = _write(project, BASE + f"faults: {{point: {{x: {deep}}}}}\n")
    message, seconds = _refused(path)
    assert message == f"{path}: not accepted: nesting deeper than 32 levels (line 7)"
    assert seconds < HANG


def test_deep_block_nesting_is_refused(project):
    deep = "".join(f"{'  ' * i}k{i}:\n" for i in range(40))
    path = _write(project, BASE + deep)
    message, _ = _refused(path)
    assert message == f"{path}: not accepted: nesting deeper than 32 levels (line 39)"  # k32


def test_deep_nesting_in_a_set_value_is_refused_quickly(project):
    path = _write(project, BASE)
    text = "model.overrides=" + "[" * 100_000 + "]" * 100_000
    message, seconds = _refused(path, [text])
    assert message == (
        f"--set model.overrides={'[' * 44}... ({len(text):,} characters): not accepted: "
        f"nesting deeper than 32 levels"
    )
    assert seconds < HANG


def test_nesting_up_to_32_levels_is_read():
    assert parse_override("model.overrides=" + "[" * 32 + "]" * 32)[1] == eval("[" * 32 + "]" * 32)
    with pytest.raises(ConfigError, match=r"nesting deeper than 32 levels$"):
        parse_override("model.overrides=" + "[" * 33 + "]" * 33)


def test_a_billion_laughs_file_is_refused_quickly(project):
    path = _write(project, BASE + _laughs(10))
    message, seconds = _refused(path)
    assert message == f"{path}: not accepted: aliases expand to more than 10,000 values (line 10)"
    assert seconds < HANG


def test_a_billion_laughs_set_value_is_refused_quickly(project):
    path = _write(project, BASE)
    value = "{" + ", ".join(_laughs(10).splitlines()) + "}"
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        parse_override(f"faults.point={value}")
    assert time.monotonic() - start < HANG
    assert str(err.value).endswith(": not accepted: aliases expand to more than 10,000 values")
    assert str(err.value).startswith("--set faults.point={l0: &l0 [lol, lol")
    message, _ = _refused(path, [f"faults.point={value}"])
    assert message == str(err.value)


def test_a_few_aliases_are_fine(project):
    path = _write(project, BASE.replace("seeds: [0]", "seeds: &s [0, 1]\nfaults: {point: {x: *s}}"))
    assert load_experiment(path).seeds == (0, 1)


@pytest.mark.parametrize(
    ("text", "line"),
    [("faults: {point: &a [*a]}", 7), ("faults: &a {point: *a}", 7),
     ("faults:\n  point: &a\n    x: [1, *a]", 9)],
)  # fmt: skip
def test_a_recursive_alias_is_refused(project, text, line):
    path = _write(project, BASE + text + "\n")
    message, seconds = _refused(path)
    assert message == f"{path}: not accepted: recursive alias *a inside &a (line {line})"
    assert seconds < HANG


def test_nesting_through_aliases_counts_too(project):
    deep = "[" * 20 + "]" * 20
    path = _write(project, BASE + f"a: &a {deep}\nb: {'[' * 20}*a{']' * 20}\n")
    message, _ = _refused(path)
    assert message == (
        f"{path}: not accepted: nesting deeper than 32 levels once aliases are expanded (line 7)"
    )


def test_bad_yaml_keeps_its_messages(project):
    path = _write(project, BASE.replace("seeds: [0]", "seeds: [0"))
    assert _refused(path)[0] == (
        f"{path}: not valid YAML (line 6, column 6): expected ',' or ']', but got ':'"
    )
    path = _write(project, BASE + "storage: !!python/object/apply:os.system ['touch pwned']\n")
    assert _refused(path)[0] == (
        f"{path}: not valid YAML (line 7, column 10): tags like !!python/... are not allowed "
        f"(files are read with safe_load)"
    )
    assert _refused(_write(project, BASE), ["train.lr=[1"])[0] == (
        "--set train.lr=[1: the value is not valid YAML"
    )


def test_an_integer_too_long_to_read_is_refused(project):
    path = _write(project, BASE.replace("seeds: [0]", f"seeds: [{'9' * 5000}]"))
    assert (
        _refused(path)[0] == f"{path}: not accepted: an integer of more than 4300 digits (line 5)"
    )


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("value", "shown"),
    [("1e400", "inf"), ("-1e400", "-inf"), (".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan"),
     ("1" + "0" * 400, "inf")],
)  # fmt: skip
def test_non_finite_floats_are_refused_in_a_set_and_in_a_file(project, value, shown):
    path = _write(project, BASE)
    message, _ = _refused(path, [f"train.lr={value}"])
    assert message == f"{path}: train.lr: expected a finite number, got {shown}"
    path = _write(project, BASE.replace("epochs: 1", f"epochs: 1, lr: {value}"), name="y")
    message, _ = _refused(path)
    assert message == f"{path}: train.lr: expected a finite number, got {shown}"


def test_non_finite_floats_are_refused_in_any_float_field(project):
    path = _write(project, BASE)
    assert _refused(path, ["resources.gpus=.inf"])[0] == (
        f"{path}: resources.gpus: expected a finite number, got inf"
    )
    assert _refused(path, ["model.width=.nan"])[0] == (
        f"{path}: model.width: expected a finite number, got nan"
    )


@pytest.mark.parametrize(
    ("space", "message"),
    [("train.lr: {uniform: [0, .inf]}", "uniform needs finite bounds [low, high], got [0, inf]"),
     ("train.lr: {loguniform: [-.inf, 1]}",
      "loguniform needs finite bounds [low, high], got [-inf, 1]"),
     ("train.lr: {uniform: [.nan, 1]}", "uniform needs finite bounds [low, high], got [nan, 1]"),
     ("train.lr: {choice: [0.1, .inf]}", "choice values must be finite numbers, got inf"),
     ("train.lr: {choice: [0.1, 1e400]}", "choice values must be finite numbers, got inf")],
)  # fmt: skip
def test_non_finite_space_values_are_refused(project, space, message):
    (project / "search_spaces/bad.yaml").write_text(f"searcher: random\nparams:\n  {space}\n")
    path = _write(project, BASE.replace("space: continuum", "space: bad"))
    assert _refused(path)[0] == f"search_spaces/bad.yaml: params.train.lr: {message}"


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_seeds_outside_numpy_and_torch_range_are_refused(project, seed):
    path = _write(project, BASE.replace("seeds: [0]", f"seeds: [0, {seed}]"))
    assert _refused(path)[0] == (
        f"{path}: seeds[1]: {seed} is out of range; allowed: 0 to 4294967295"
    )
    assert _refused(_write(project, BASE, "y"), [f"seeds=[{seed}]"])[0] == (
        f"experiments/y.yaml: seeds[0]: {seed} is out of range; allowed: 0 to 4294967295"
    )
    assert _refused(_write(project, BASE, "z"), [f"data.split_seed={seed}"])[0] == (
        f"experiments/z.yaml: data.split_seed: {seed} is out of range; allowed: 0 to 4294967295"
    )


def test_seeds_at_the_ends_of_the_range_are_accepted(project):
    path = _write(project, BASE.replace("seeds: [0]", f"seeds: [0, {2**32 - 1}]"))
    assert load_experiment(path).seeds == (0, 2**32 - 1)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name", [".", "..", ".x", ".hidden", "-x", "a/b", "a\\b", "a b", "x" * 101]
)
def test_unsafe_sweep_names_are_refused(project, name):
    path = _write(project, BASE)
    shown = repr(name) if len(name) <= 100 else f"{name[:40]!r}... ({len(name)} characters)"
    assert _refused(path, [f"name='{name}'"])[0] == (
        f"{path}: name: {shown} is not allowed; {NAME_RULE}"
    )


def test_unsafe_name_in_a_file_and_a_long_one_shortened(project):
    path = _write(project, BASE.replace("name: t", "name: '..'"))
    assert _refused(path)[0] == f"{path}: name: '..' is not allowed; {NAME_RULE}"
    path = _write(project, BASE.replace("name: t", f"name: {'x' * 500}"), name="y")
    assert _refused(path)[0] == (
        f"{path}: name: {'x' * 40!r}... (500 characters) is not allowed; {NAME_RULE}"
    )


@pytest.mark.parametrize("name", ["a.b-c_1", "_x", "9", "x" * 100])
def test_safe_sweep_names_are_accepted(project, name):
    assert load_experiment(_write(project, BASE), [f"name='{name}'"]).name == name


# ---------------------------------------------------------------- custom builders

EXPERIMENT = REPO / "experiments/digits_resnet18.yaml"
RAISES_ON_IMPORT = "import math\n\nratio = 1 / 0\n"
RAISES_WHEN_CALLED = """from torch import nn


def helper(channels):
    return nn.Conv2d(channels, -1, 3)


def build(*, in_chans, num_classes, image_size, width):
    return helper(in_chans)
"""


def _builder(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my_model.py"
    path.write_text(text)
    return path


def _build(path: Path) -> str:
    cfg = ModelConfig(name="custom", builder=f"{path}:build", towers=4)
    with pytest.raises(ConfigError) as err:
        build_model(cfg, in_chans=1, num_classes=10, image_size=16)
    return str(err.value)


def test_a_builder_that_does_not_parse_is_refused_when_the_experiment_loads(tmp_path):
    path = _builder(tmp_path, "def build(*, in_chans, num_classes, image_size, width):\n"
                              "    return nn.Sequential(\n\n\ndef other(:\n    pass\n")  # fmt: skip
    sets = ["model.name=custom", f"model.builder={path}:build"]
    message, _ = _refused(EXPERIMENT, sets)
    assert message.startswith(f"{EXPERIMENT}: model.builder: {path}:")
    assert ": SyntaxError: " in message and message.endswith("(the builder file does not parse)")
    assert "\n" not in message
    assert _build(path).startswith(f"model.builder: {path}:")  # and when it is built


def test_a_syntax_error_names_its_line(tmp_path):
    path = _builder(tmp_path, "import torch\n\n\ndef build(:\n    pass\n")
    message = _build(path)
    assert message == (
        f"model.builder: {path}:4: SyntaxError: invalid syntax (the builder file does not parse)"
    )


def test_a_builder_that_raises_on_import_names_file_and_line(tmp_path):
    path = _builder(tmp_path, RAISES_ON_IMPORT)
    assert _build(path) == (
        f"model.builder: {path}:3: ZeroDivisionError: division by zero (raised while importing "
        f"the builder)"
    )


def test_a_builder_that_raises_when_called_names_the_innermost_line_in_its_file(tmp_path):
    path = _builder(tmp_path, RAISES_WHEN_CALLED)
    message = _build(path)
    assert message.startswith(f"model.builder: {path}:5: RuntimeError: ")  # in helper(), in torch
    assert message.endswith(" (raised by build() while building the model)")
    assert "\n" not in message


def test_a_builder_raising_in_a_module_it_imports_names_the_import_line(tmp_path):
    (tmp_path / "broken_helper.py").write_text("x = [\n")
    path = _builder(tmp_path, f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n"
                              f"import broken_helper\n")  # fmt: skip
    message = _build(path)
    assert message.startswith(f"model.builder: {path}:3: SyntaxError: ")
    assert message.endswith("(raised while importing the builder)")


def test_the_cli_reports_a_builder_that_raises_in_one_line(tmp_path, capsys):
    path = _builder(tmp_path, RAISES_ON_IMPORT)
    argv = ["estimate", str(EXPERIMENT), "--set", "model.name=custom", "--set",
            f"model.builder={path}:build", "--out", str(tmp_path / "cost.csv")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"towerspace: error: model.builder: {path}:3: ZeroDivisionError: division by zero (raised "
        f"while importing the builder)\n"
    )
    assert not (tmp_path / "cost.csv").exists()


def test_the_cli_refuses_a_nesting_bomb_in_one_line(project, capsys):
    path = _write(project, BASE + "faults: {point: {x: " + "[" * 50_000 + "]" * 50_000 + "}}\n")
    start = time.monotonic()
    assert main(["sweep", str(path), "--storage", "out"]) == 2
    assert time.monotonic() - start < HANG
    assert capsys.readouterr().err == (
        f"towerspace: error: {path}: not accepted: nesting deeper than 32 levels (line 7)\n"
    )
    assert not (project / "out").exists()
