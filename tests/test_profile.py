"""The profiler's tables and the profile command: structure, files, no timing assertions."""

import pandas as pd

from towerspace import profile
from towerspace.cli import main


def test_block_speed_table():
    table = profile.block_speed(16, 6, batch=2, towers=[1, 4, 16], repeats=1, min_time=0.001)
    assert set(table["towers"]) == {1, 4, 16}
    assert table.loc[table["towers"] == 1, "impl"].tolist() == ["native"]  # nothing to choose
    assert set(table.loc[table["towers"] == 4, "impl"]) == {
        "native", "channels_last", "dense", "per_tower", "depthwise_sum", "unfold_bmm"}  # fmt: skip
    assert table.groupby("towers")["fastest"].sum().tolist() == [1, 1, 1]
    assert (table["time_ms"] > 0).all() and (table["spread"] >= 1).all()
    four = table[table["towers"] == 4].iloc[0]
    assert four["flops"] == 2 * 3 * 2 * (16 * 4 * 9 + 16 * 16) * 36  # batch, 3x, 2 FLOPs per MAC


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
    assert "training step, impl=native, match=params" in capsys.readouterr().out
    assert pd.read_csv(out.with_suffix(".csv"))["towers"].tolist() == ["1", "depthwise"]
