"""`towerspace estimate` and the sweep's cost check, against independent counts."""

import io
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from towerspace import config, estimate
from towerspace.cli import _confirm_cost, main
from towerspace.models import build_model

REPO = Path(__file__).resolve().parent.parent
DIGITS = str(REPO / "experiments/digits_continuum.yaml")
TINY = ("model.width=0.125", "model.middle_blocks=1", "model.match=none", "seeds=[0, 1, 2]",
        "train.epochs=3", "space.params={model.towers: {grid: [1, depthwise]}}")  # fmt: skip


def _sets(*extra: str) -> list[str]:
    return [arg for s in (*TINY, *extra) for arg in ("--set", s)]


def _digits_train_images(val_fraction: float = 0.2) -> int:
    """The stratified split's train size, from scikit-learn's class counts."""
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target)
    return int(sum(n - max(1, round(n * val_fraction)) for n in counts))


def _counted_training_flops(model: nn.Module, in_chans: int, size: int) -> int:
    """Training FLOPs per image, counted from the real layers' shapes: 3x forward, where a
    convolution's forward is 2 x outputs x (inputs per group) x k x k, a linear one 2 x in x out."""
    flops = []

    def conv(m: nn.Conv2d, inputs, out) -> None:
        k = m.kernel_size[0] * m.kernel_size[1]
        flops.append(2 * out[0].numel() * (m.in_channels // m.groups) * k)

    def linear(m: nn.Linear, inputs, out) -> None:
        flops.append(2 * m.in_features * m.out_features)

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear)
    model.eval()(torch.zeros(1, in_chans, size, size))
    return 3 * sum(flops)


def test_figures_match_an_independent_count_at_both_ends(tmp_path, capsys):
    out = tmp_path / "estimate.csv"
    assert main(["estimate", DIGITS, *_sets(), "--out", str(out)]) == 0
    table = pd.read_csv(out, dtype={"towers": str})
    assert list(table["towers"]) == ["1", "depthwise"]
    assert list(table["trials"]) == [3, 3]  # one per seed
    images = _digits_train_images() * 3  # 1438 train images x 3 epochs
    assert (table["images_per_trial"] == images).all()
    cfg = config.load_experiment(DIGITS, TINY)
    for row, towers in zip(table.itertuples(), (1, "depthwise"), strict=True):
        model = build_model(config.apply(cfg, {"model.towers": towers}).model, in_chans=1,
                            num_classes=10, image_size=16)  # fmt: skip
        flops = _counted_training_flops(model, 1, 16)
        assert row.params == sum(p.numel() for p in model.parameters())
        assert row.train_gflops_per_image * 1e9 == pytest.approx(flops, rel=1e-12)
        assert row.train_pflops_per_trial * 1e15 == pytest.approx(flops * images, rel=1e-12)
    assert table["train_gflops_per_image"][0] > 2 * table["train_gflops_per_image"][1]
    shown = capsys.readouterr().out
    assert "total: 6 trials" in shown and "no throughput given, so no hours" in shown
    assert "hours_per_trial" not in table


def test_max_steps_caps_the_images_per_epoch(tmp_path):
    out = tmp_path / "e.csv"
    assert main(["estimate", DIGITS, *_sets("train.max_steps=5"), "--out", str(out)]) == 0
    assert (pd.read_csv(out)["images_per_trial"] == 5 * 32 * 3).all()  # the demo's batch: 32
    assert estimate.images_per_epoch(1438, 128, 20) == 1438  # 20 steps cover the split


def test_throughput_file_gives_device_hours(tmp_path, capsys):
    rates = tmp_path / "rates.csv"
    rates.write_text("towers,images_per_s\n1,50\ndepthwise,25.5\n")
    out = tmp_path / "e.csv"
    sets = _sets("resources.gpus=0.5")
    assert main(["estimate", DIGITS, *sets, "--throughput", str(rates), "--out", str(out),
                 "--gpu-price", "2"]) == 0  # fmt: skip
    table = pd.read_csv(out, dtype={"towers": str})
    images = _digits_train_images() * 3
    expected = [images / 50 / 3600 * 0.5, images / 25.5 / 3600 * 0.5]
    assert table["gpu_hours_per_trial"].tolist() == pytest.approx(expected, rel=1e-12)
    assert table["gpu_hours"].tolist() == pytest.approx([3 * h for h in expected], rel=1e-12)
    assert table["cost_usd"].tolist() == pytest.approx([6 * h for h in expected], rel=1e-12)
    total = estimate.number(3 * sum(expected))
    assert f"PFLOPs, {total} GPU-hours at the images/s listed" in capsys.readouterr().out
    # data-parallel trials: W workers of one GPU each run W x the images/s and hold W GPUs
    sets = _sets("resources.gpus=1", "resources.workers=2")
    assert main(["estimate", DIGITS, *sets, "--throughput", str(rates), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert table["hours_per_trial"][0] == pytest.approx(images / (2 * 50) / 3600, rel=1e-12)
    assert table["gpu_hours_per_trial"][0] == pytest.approx(images / 50 / 3600, rel=1e-12)


def test_points_missing_from_the_throughput_file_have_no_hours(tmp_path, capsys):
    rates = tmp_path / "rates.csv"
    rates.write_text("towers,images_per_s\n1,50\n")
    out = tmp_path / "e.csv"
    assert main(["estimate", DIGITS, *_sets(), "--throughput", str(rates), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert table["cpu_hours"].isna().tolist() == [False, True]
    shown = capsys.readouterr().out
    assert f"no throughput in {rates} for towers: depthwise (their hours are empty)" in shown
    assert "at least" in shown  # the total falls back to the FLOPs lower bound


def test_measure_times_training_steps_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "e.csv"
    sets = _sets("train.batch_size=4")
    assert main(["estimate", DIGITS, *sets, "--measure", "--device", "cpu", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert (table["images_per_s"] > 0).all() and (table["cpu_hours"] > 0).all()
    hours = table["images_per_trial"] / table["images_per_s"] / 3600  # 1 CPU per trial
    assert table["cpu_hours_per_trial"].tolist() == pytest.approx(hours.tolist())
    assert "peak_memory_mb" not in table and (table["memory_mb_est"] > 0).all()
    assert "measured: 3 training steps per point after 2 warm-up steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--measure", "--throughput", "x.csv"],
         "--measure and --throughput exclude each other: time the steps here, or take the "
         "figures from a file"),
        (["--throughput", "missing.csv"], "--throughput missing.csv: no such file"),
        (["--throughput", "{bad}"], "--throughput {bad}: no column 'images_per_s' (needed: "
                                   "towers, images_per_s)"),
        (["--throughput", "{zero}"], "--throughput {zero}: towers 1: images_per_s: '0' is not "
                                    "allowed; allowed: a number > 0"),
        (["--throughput", "{towers}"], "--throughput {towers}: towers: 'many': towers must "
                                      "be"),
        (["--train-images", "10"], "--train-images, --classes: for imagefolder data only "
                                   "(digits is counted or of known size)"),
        (["--out", "{dir}/no/such.csv"], "--out {dir}/no/such.csv: {dir}/no is not a folder"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_nothing_written(args, message, tmp_path, capsys):
    files = {"bad": "towers,rate\n1,5\n", "zero": "towers,images_per_s\n1,0\n",
             "towers": "towers,images_per_s\nmany,5\n"}  # fmt: skip
    for name, text in files.items():
        (tmp_path / f"{name}.csv").write_text(text)
    names = {name: str(tmp_path / f"{name}.csv") for name in files} | {"dir": str(tmp_path)}
    args = [a.format(**names) for a in args]
    before = sorted(tmp_path.iterdir())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["estimate", DIGITS, *_sets(), *args]) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert err.startswith(f"towerspace: error: {message.format(**names)}") and err.count("\n") == 1
    assert sorted(tmp_path.iterdir()) == before


def test_the_xception_scale_estimate_matches_the_paper(tmp_path, capsys):
    out = tmp_path / "e.csv"
    args = ["estimate", str(REPO / "experiments/imagenet_xception.yaml"), "--train-images",
            "1281167", "--classes", "1000", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    table = pd.read_csv(out, dtype={"towers": str}).set_index("towers")
    assert list(table.index) == ["1", "3", "4", "8", "depthwise"]
    assert table.loc["depthwise", "params"] == 22_855_952  # Keras' Xception
    assert table.loc["depthwise", "train_gflops_per_image"] == pytest.approx(3 * 16.714806992)
    assert (table["images_per_trial"] == 1_281_167 * 100).all()
    assert "at least 91.26 GPU-hours" in capsys.readouterr().out


def test_the_default_demo_does_not_ask(capsys):
    cfg = config.load_experiment(DIGITS)
    _confirm_cost(cfg, None, 24.0, yes=False, stdin=io.StringIO())  # no terminal: would refuse
    assert capsys.readouterr().out == (
        "digits_continuum: estimate: 14 trials, 0.004237 training PFLOPs, at least 0.01177 "
        "CPU-hours (at an optimistic 0.1 TFLOP/s per CPU)\n"
    )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_above_the_threshold_a_terminal_is_asked(capsys):
    cfg = config.load_experiment(DIGITS, TINY)
    _confirm_cost(cfg, None, 0.0, yes=False, stdin=_Terminal("y\n"))
    assert "launch? [y/N]" in capsys.readouterr().out
    with pytest.raises(ValueError, match="digits_continuum: not launched \\(answered no\\)"):
        _confirm_cost(cfg, None, 0.0, yes=False, stdin=_Terminal("\n"))
    _confirm_cost(cfg, None, 0.0, yes=True, stdin=io.StringIO())  # --yes: no question


def test_sweep_refuses_without_a_terminal_above_the_threshold(tmp_path, capsys, monkeypatch):
    rates = tmp_path / "slow.csv"
    rates.write_text("towers,images_per_s\n1,0.001\ndepthwise,0.001\n")
    sets = ["train.epochs=1", "model.width=0.125", "model.middle_blocks=1",
            "space.params={model.towers: {grid: [1, depthwise]}}", "seeds=[0]"]  # fmt: skip
    argv = ["sweep", DIGITS, "--storage", str(tmp_path / "runs"), "--throughput", str(rates),
            *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    monkeypatch.delenv("TOWERSPACE_CONFIRM_HOURS", raising=False)
    with open(os.devnull) as devnull:  # stdin as a job's: not a terminal
        monkeypatch.setattr(sys, "stdin", devnull)
        code = main(argv)
    hours = 2 * _digits_train_images() / 0.001 / 3600  # 2 trials of 1 epoch, 1 CPU each
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == (
        f"towerspace: error: digits_continuum: {estimate.number(hours)} CPU-hours is above the "
        "confirmation threshold of 24 (--confirm-above, TOWERSPACE_CONFIRM_HOURS) and stdin is "
        "not a terminal to ask on; pass --yes to launch\n"
    )
    assert not (tmp_path / "runs").exists()


def test_a_throughput_file_prices_group_width_points(tmp_path):
    rates = tmp_path / "rates.csv"
    rates.write_text("towers,images_per_s\ngw64,40\ngw1,20\n")  # the labels the table shows
    out = tmp_path / "e.csv"
    sets = _sets("space=group_width", "space.params={model.towers: {grid: [{group_width: 64}, "
                 "{group_width: 1}]}}")  # fmt: skip
    assert main(["estimate", DIGITS, *sets, "--throughput", str(rates), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert table["towers"].tolist() == ["gw64", "gw1"]
    images = table["images_per_trial"]
    assert table["cpu_hours_per_trial"].tolist() == pytest.approx(
        [images[0] / 40 / 3600, images[1] / 20 / 3600], rel=1e-12
    )
