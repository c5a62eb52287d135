"""The profiler's tables and the profile command: structure, files, no timing assertions."""

import math

import pandas as pd
import pytest
import torch

from towerspace import memory, profile
from towerspace.cli import main


def test_block_speed_table():
    table = profile.block_speed(16, 6, batch=2, towers=[1, 4, 16], repeats=1, min_time=0.001)
    assert set(table["towers"]) == {1, 4, 16}
    assert table.loc[table["towers"] == 1, "impl"].tolist() == ["native"]  # nothing to choose
    assert set(table.loc[table["towers"] == 4, "impl"]) == {
        "native", "channels_last", "dense", "per_tower", "depthwise_sum", "unfold_bmm",
        "regroup2"}  # fmt: skip
    assert table.groupby("towers")["fastest"].sum().tolist() == [1, 1, 1]
    assert (table["time_ms"] > 0).all() and (table["spread"] >= 1).all()
    four = table[table["towers"] == 4].iloc[0]
    assert four["flops"] == 2 * 3 * 2 * (16 * 4 * 9 + 16 * 16) * 36  # batch, 3x, 2 FLOPs per MAC


def test_folded_dense_conv_row_when_the_block_is_linear():
    table = profile.block_speed(8, 4, batch=2, towers=[1, 2, 8], repeats=1, min_time=0.001,
                                folded=True)  # fmt: skip
    folded = table[table["impl"] == "as_conv2d"]
    assert folded["towers"].tolist() == [1, 2, 8]  # one measurement, a reference at each count
    assert folded["time_ms"].nunique() == 1 and (folded["time_ms"] > 0).all()
    assert not folded["fastest"].any()  # fastest: the block's own implementations
    assert table.groupby("towers")["fastest"].sum().tolist() == [1, 1, 1]
    natives = table[table["impl"] == "native"].set_index("towers")["flops"]
    assert folded.set_index("towers")["flops"].equals(natives)  # the same function's FLOPs
    bn = profile.block_speed(8, 4, batch=2, towers=[1, 2], repeats=1, min_time=0.001, mid="bn",
                             folded=True)  # fmt: skip
    assert "as_conv2d" not in set(bn["impl"]) and set(bn["impl"]) >= {"native"}
    plain = profile.block_speed(8, 4, batch=2, towers=[2], repeats=1, min_time=0.001)
    assert "as_conv2d" not in set(plain["impl"])  # off by default: benchmarks time the block


NO_PROC = math.isnan(memory.now_mb(torch.device("cpu")))


@pytest.mark.skipif(NO_PROC, reason="no /proc peak RSS")
def test_cpu_peak_memory_is_measured_and_grows_with_the_batch():
    peaks = {}
    for batch in (4, 32):
        table = profile.block_speed(32, 32, batch=batch, towers=[4], impls=["native"],
                                    repeats=1, min_time=0.001)  # fmt: skip
        peaks[batch] = table["peak_mb"].item()
    activations = 32 * 32 * 32 * 4 / 2**20  # one image's input, MiB
    assert peaks[4] > 0 and peaks[32] > peaks[4]
    # forward + backward hold several activation-sized tensors at once: 1 to 20 per image
    assert activations * 28 * 1 < peaks[32] - peaks[4] < activations * 28 * 20


def test_cpu_peak_counts_a_known_allocation():
    peak = profile._peak_mb(lambda: torch.ones(64 * 2**20 // 4).sum(), torch.device("cpu"))
    assert 60 < peak < 80 or math.isnan(peak)


def test_model_speed_and_roofs():
    table = profile.model_speed([1, "depthwise"], size=8, batch=2, repeats=1, width=0.125,
                                middle_blocks=0, stem="small", num_classes=3)  # fmt: skip
    assert table["towers"].tolist() == ["1", "depthwise"] and (table["step_ms"] > 0).all()
    roofs = profile.machine_roofs()
    assert roofs["dense_conv_gflops_per_s"] > 0 and roofs["bandwidth_gb_per_s"] > 0


def test_profile_command_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "prof"
    argv = ["profile", "--channels", "8", "--size", "4", "--batch", "2", "--towers", "1,2,8",
            "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("TowerConv2d(8, 8) at 4x4, batch 2, forward+backward, float32, NCHW")
    assert "machine: dense 3x3 conv" in printed
    table = pd.read_csv(out.with_suffix(".csv"))
    assert set(table["towers"]) == {1, 2, 8}
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".svg").exists()


def test_profile_command_for_whole_models(tmp_path, capsys):
    out = tmp_path / "models"
    argv = ["profile", "--model", "--width", "0.125", "--middle-blocks", "1", "--size", "8",
            "--batch", "2", "--towers", "1,depthwise", "--repeats", "1",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "training step, impl=native, match=params" in printed
    assert "machine: dense 3x3 conv" in printed
    assert printed.rstrip().endswith(f"wrote: {out}.csv {out}.png {out}.svg")
    table = pd.read_csv(out.with_suffix(".csv"))
    assert table["towers"].tolist() == ["1", "depthwise"]
    assert list(table.columns) == [
        "towers", "impl", "params", "training_flops", "step_ms", "spread", "images_per_s",
        "gflops_per_s", "peak_mb", "flops", "bytes", "roof_efficiency"]  # fmt: skip
    assert (table["flops"] == 2 * table["training_flops"]).all() and (table["bytes"] > 0).all()
    assert ((table["roof_efficiency"] > 0) & (table["roof_efficiency"] < 2)).all()
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".svg").exists()


def test_profile_command_tiny_model_at_16px(tmp_path):
    out = tmp_path / "tiny"
    argv = ["profile", "--model", "--width", "0.125", "--middle-blocks", "1", "--size", "16",
            "--batch", "2", "--towers", "1,4,depthwise", "--repeats", "1",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    table = pd.read_csv(out.with_suffix(".csv"))
    assert table["towers"].tolist() == ["1", "4", "depthwise"]
    assert (table["step_ms"] > 0).all() and (table["gflops_per_s"] > 0).all()
    assert out.with_suffix(".png").stat().st_size > 0


def test_model_bytes_counts_every_leaf_once_per_pass():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1, bias=False), torch.nn.ReLU())
    x = torch.randn(4, 2, 5, 5)
    conv = 4 * 2 * 25 + 4 * 3 * 25 + 6  # input, output, weights
    relu = 2 * 4 * 3 * 25
    assert profile._model_bytes(model, x) == 3 * 4 * (conv + relu)


def test_profile_figures_draw_one_legend():
    from towerspace import plots

    impls = ("native", "channels_last")
    block = pd.DataFrame([{"towers": t, "impl": impl, "time_ms": 1.0 + t + k, "flops": 1e6,
                           "gflops_per_s": 10.0 / t, "bytes": 1e5}
                          for k, impl in enumerate(impls) for t in (1, 2, 4)])  # fmt: skip
    model = pd.DataFrame([{"towers": t, "impl": impl, "step_ms": 10.0 + k, "flops": 1e9,
                           "gflops_per_s": 5.0 + k, "bytes": 1e8}
                          for k, impl in enumerate(impls) for t in ("1", "depthwise")])  # fmt: skip
    roofs = {"dense_conv_gflops_per_s": 50.0, "bandwidth_gb_per_s": 10.0}
    for fig in (plots.speed(block, roofs), profile.model_speed_figure(model, roofs)):
        (legend,) = fig.legends  # both panels' lines, each once, beside the panels
        assert [t.get_text() for t in legend.get_texts()] == [
            "native", "channels_last", "dense conv (measured)", "bandwidth roof"]  # fmt: skip
        assert legend.get_title().get_text() == "implementation / roof"
        assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = plots.speed(block).legends  # no roofs: the implementations alone
    assert [t.get_text() for t in legend.get_texts()] == ["native", "channels_last"]
    assert legend.get_title().get_text() == "implementation"


def test_roof_efficiency_is_the_slower_roofs_time_over_the_time_taken():
    table = pd.DataFrame({"time_ms": [1000.0, 4000.0], "flops": [4e9, 4e9], "bytes": [1e9, 4e9]})
    roofs = {"dense_conv_gflops_per_s": 8.0, "bandwidth_gb_per_s": 1.0}
    # FLOPs take 0.5 s at the roof; bytes 1 s, then 4 s: the longer one counts
    assert profile.with_roof_efficiency(table, roofs)["roof_efficiency"].tolist() == [1.0, 1.0]
    steps = table.rename(columns={"time_ms": "step_ms"}).assign(step_ms=[2000.0, 8000.0])
    assert profile.with_roof_efficiency(steps, roofs)["roof_efficiency"].tolist() == [0.5, 0.5]
