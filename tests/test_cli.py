"""The command line as a user runs it: real processes, exit codes, one-line errors."""

import argparse
import subprocess
import sys
from importlib import metadata

import pytest

import towerspace
from towerspace.cli import _Formatter, build_parser, main, version


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "towerspace.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_blocks_table(capsys):
    assert main(["blocks", "--channels", "64", "--size", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "TowerConv2d(64, 64, 3) at 8x8, spatial_first, mid=none (per image)"
    rows = [line.split() for line in out[2:]]
    assert [int(r[0]) for r in rows] == [1, 2, 4, 8, 16, 32, 64]
    assert rows[0][3] == "regular" and rows[-1][3] == "depthwise"
    assert int(rows[0][4]) == 64 * 64 * 9 + 64 * 64  # params of one tower


def test_models_table_matched(capsys):
    argv = ["models", "--width", "0.25", "--middle-blocks", "1", "--stem", "small", "--size",
            "16", "--match", "params", "--towers", "1,gw8,t=0.5,depthwise"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["1", "gw8", "t=0.50", "depthwise"]
    errors = [float(line.split()[-1]) for line in lines[2:]]
    assert all(abs(e) <= 2.0 for e in errors)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["blocks", "--channels", "0"],
         "towerspace blocks: error: argument --channels: must be an integer >= 1, got 0 "
         "(see towerspace blocks --help)"),
        (["models", "--towers", "1,dense"],
         "towerspace: error: towers must be an int >= 1, 'regular' or 'depthwise', got 'dense'"),
        (["models", "--match", "macs"],
         "towerspace models: error: argument --match: invalid choice: 'macs' (choose from "
         "'none', 'params', 'flops') (see towerspace models --help)"),
        (["models", "--width", "0"], "towerspace: error: width must be in (0, 16], got 0.0"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    assert capsys.readouterr().err.strip() == message


@pytest.mark.slow  # a real process
def test_a_real_process_exits_2_without_a_traceback():
    result = _run("models", "--towers", "3x")
    assert result.returncode == 2
    assert result.stderr == (
        "towerspace: error: towers must be an int >= 1, 'regular' or 'depthwise', got '3x'\n"
    )


def test_progress_prints_a_line_when_a_trial_starts_and_one_per_epoch_with_an_eta(capsys):
    from types import SimpleNamespace

    from towerspace.sweep.tuner import Progress

    def trial(towers, status):
        return SimpleNamespace(config={"model.towers": towers, "seed": 0}, last_result={},
                               status=status)  # fmt: skip

    running, pending = trial(4, "RUNNING"), trial(1, "PENDING")
    trials = [running, pending]  # of 3: one not made yet
    progress = Progress(total=3, epochs=4)
    progress.on_trial_start(0, trials, running)
    result = {"val_acc": 0.5, "training_iteration": 1, "epoch_time_s": 2.0}
    progress.on_trial_result(0, trials, running, result)
    running.last_result, running.status = {"val_acc": 0.75, "training_iteration": 4}, "TERMINATED"
    progress.on_trial_complete(0, trials, running)
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    # ETA: (3 epochs left of the running trial + 4 of the pending one + 4 of the one not made
    # yet) x 2.0 s, 1 trial at once
    assert lines == ["started  towers=4  seed=0",
                     "running  towers=4  seed=0  val_acc 0.500 after 1/4 epochs  ETA 22s",
                     "done     towers=4  seed=0  val_acc 0.750 after 4 epochs"]  # fmt: skip


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every parser of the command line, by its prog: the top level and each command."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {parser.prog: parser, **{p.prog: p for p in commands.choices.values()}}


def test_every_option_has_help_and_shows_its_default():
    formatter = _Formatter("towerspace")
    commands = _commands()
    assert len(commands) == 13
    for prog, parser in commands.items():
        assert parser.description, prog  # what the command does, at the top of its --help
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            where = f"{prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{where}: no help"
            takes_value = action.nargs != 0 and (action.option_strings or action.nargs == "?")
            takes_value = takes_value and not action.required  # a required option: no default
            if takes_value:  # a flag's default is off
                assert "default: " in formatter._get_help_string(action), f"{where}: no default"


def test_help_says_what_the_tool_is_and_where_to_start(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "towerspace makes a convolution's tower count a knob" in out
    assert "towerspace sweep digits_continuum --smoke" in out
    with pytest.raises(SystemExit):
        main(["models", "--help"])
    assert "--size SIZE           input height = width (default: 299)" in capsys.readouterr().out


def test_version_is_the_installed_packages(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr() == (f"towerspace {towerspace.__version__}\n", "")
    assert version() == metadata.version("towerspace")  # pyproject reads towerspace.__version__
