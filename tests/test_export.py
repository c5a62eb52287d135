"""Export: every point of the continuum to torch.export and ONNX, run back against eager."""

import json
from pathlib import Path

import pytest
import torch

from towerspace import TowerConv2d
from towerspace.cli import main
from towerspace.export import check_onnx, check_program, export_onnx, export_program
from towerspace.impls import IMPLS
from towerspace.models import xception

TOLERANCE = 1e-5  # float32, same ops in another order

BLOCKS = [
    {"towers": 1},
    {"towers": 4},  # Inception-style
    {"towers": "depthwise"},
    {"towers": 4, "order": "pointwise_first"},
    {"towers": 2, "mid": "bn_relu"},
    {"towers": 8, "mid": "elu", "order": "pointwise_first"},
]


def _random_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so that eval mode is really checked."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


@pytest.mark.parametrize("spec", BLOCKS, ids=lambda s: "-".join(map(str, s.values())))
def test_every_block_exports(spec, tmp_path):
    torch.manual_seed(0)
    block = _random_bn(TowerConv2d(16, 24, **spec))
    example, other = torch.randn(1, 16, 8, 8), torch.randn(3, 16, 8, 8)  # batch is dynamic
    assert check_program(export_program(block, example), block, other) < TOLERANCE
    path = export_onnx(block, example, tmp_path / "block.onnx")
    assert check_onnx(path, block, other) < TOLERANCE


@pytest.mark.parametrize("towers", [1, 4, "depthwise"])
def test_small_xception_exports(towers, tmp_path):
    torch.manual_seed(0)
    model = xception(width=0.125, middle_blocks=1, stem="small", num_classes=10, towers=towers)
    model = _random_bn(model).train()  # export takes an eval copy; the model stays as it was
    example = torch.randn(2, 3, 32, 32)
    program = export_program(model, example)
    assert model.training
    assert check_program(program, model, example) < TOLERANCE
    path = export_onnx(model, example, tmp_path / "xception.onnx")
    assert check_onnx(path, model, torch.randn(4, 3, 32, 32)) < TOLERANCE
    assert model.training


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_every_fixed_impl_exports_as_it_is(impl, tmp_path):
    torch.manual_seed(0)
    block = TowerConv2d(16, 24, towers=4, impl=impl)
    example = torch.randn(2, 16, 8, 8)
    assert check_program(export_program(block, example, impl=None), block, example) < TOLERANCE


def test_auto_is_exported_as_native_and_refused_as_it_is():
    torch.manual_seed(0)
    model = xception(width=0.125, middle_blocks=0, stem="small", num_classes=10, impl="auto")
    example = torch.randn(2, 3, 16, 16)
    program = export_program(model, example)  # impl="native": each block one grouped conv
    convs = [n for n in program.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(convs) == 2 + 2 * 10 + 4  # stem, 10 separable convs (k×k + 1×1), 4 shortcuts
    assert model.entry.block2.convs[0].impl == "auto"  # the model itself is untouched
    with pytest.raises(ValueError) as err:
        export_program(model, example, impl=None)
    assert str(err.value) == (
        "entry.block2.convs.0: impl='auto' times kernels at run time and cannot be exported; "
        "export with impl='native' or another fixed impl"
    )


# ---------------------------------------------------------------- towerspace export

DIGITS = Path(__file__).resolve().parent.parent / "experiments/digits_continuum.yaml"
SMALL = ["--set", "model.width=0.125", "--set", "model.middle_blocks=0"]


def test_the_command_exports_an_experiments_model_as_a_program(tmp_path, capsys):
    from towerspace import config
    from towerspace.export import experiment_model

    out = tmp_path / "models" / "four.pt2"
    argv = ["export", str(DIGITS), *SMALL, "--set", "model.towers=4", "--out", str(out)]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote: {out} (pt2: {DIGITS}'s model, random weights (seed 0)); ")
    assert [p.name for p in out.parent.iterdir()] == ["four.pt2"]  # no temporary file left
    sets = ["model.width=0.125", "model.middle_blocks=0", "model.towers=4"]
    model, shape = experiment_model(config.load_experiment(DIGITS, sets), seed=0)
    assert shape == (1, 16, 16)
    inputs = torch.randn(5, *shape)
    assert check_program(torch.export.load(out), model, inputs) < TOLERANCE


@pytest.mark.slow  # the session's real sweep
def test_the_command_exports_a_trials_checkpoint_to_onnx(tiny_sweep, tmp_path, capsys):
    from towerspace import results
    from towerspace.export import trial_model
    from towerspace.trial import newest_checkpoint_file

    trial_id = results.load(tiny_sweep.sweep_dir)["trial_id"].iloc[-1]  # depthwise
    out = tmp_path / "trial.onnx"
    argv = ["export", str(tiny_sweep.sweep_dir), "--trial", trial_id, "--out", str(out)]
    assert main(argv) == 0
    assert f"{trial_id}'s checkpoint after epoch 1 (checkpoint_000000)" in capsys.readouterr().out
    model, shape, _ = trial_model(tiny_sweep.sweep_dir, trial_id)
    trained = torch.load(newest_checkpoint_file(tiny_sweep.sweep_dir, trial_id))["model"]
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert check_onnx(out, model, torch.randn(3, *shape)) < TOLERANCE


def _sweep_folder(folder: Path) -> Path:
    """A sweep's folder with one trial record and no checkpoint."""
    (folder / "records").mkdir(parents=True)
    (folder / "experiment.json").write_text("{}")
    record = {"trial_id": "abc12_00000", "status": "error", "seed": 0, "towers": "4",
              "epochs_run": 0, "resumed_at": [], "history": []}  # fmt: skip
    (folder / "records" / "abc12_00000.json").write_text(json.dumps(record))
    return folder


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{sweep}", "--trial", "abc12_00007"],
         "--trial abc12_00007: no such trial in {sweep} (its trials: abc12_00000)"),
        (["{sweep}", "--trial", "../records/abc12_00000"],
         "--trial ../records/abc12_00000: no such trial in {sweep} (its trials: abc12_00000)"),
        (["{sweep}", "--trial", "abc12_00000"],
         "--trial abc12_00000: no complete checkpoint in {sweep} (it ran 0 epochs, status error)"),
        (["{sweep}"], "{sweep}: a folder; expected an experiment file, or a sweep's folder with "
                      "--trial ID (the trial to export)"),
        ([str(DIGITS), "--trial", "abc12_00000"],
         f"--trial abc12_00000: for a sweep's folder; {DIGITS} is not a folder"),
        ([str(DIGITS), "--out", "{tmp}/model.tflite"],
         "--out {tmp}/model.tflite: cannot tell the format from '.tflite'; allowed: .onnx, .pt2 "
         "(or --format onnx|pt2)"),
    ],
    ids=["unknown-trial", "a-path-as-trial", "no-checkpoint", "folder-without-trial",
         "trial-of-a-file", "unknown-suffix"],
)  # fmt: skip
def test_the_commands_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    sweep = _sweep_folder(tmp_path / "runs" / "toy")
    argv = [a.format(sweep=sweep, tmp=tmp_path) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "model.onnx")]
    assert main(["export", *argv, *out]) == 2
    assert (
        capsys.readouterr().err
        == f"towerspace: error: {message.format(sweep=sweep, tmp=tmp_path)}\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_an_unknown_format_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(DIGITS), "--out", str(tmp_path / "m.onnx"), "--format", "tflite"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(
        "towerspace export: error: argument --format: invalid choice: 'tflite' (choose from "
    )


def test_an_export_that_fails_its_check_leaves_nothing_behind(tmp_path):
    from towerspace.export import ExportMismatch, export_file

    block = TowerConv2d(8, 8, towers=2)
    example = torch.randn(2, 8, 4, 4)
    with pytest.raises(ExportMismatch, match=r"model.pt2: not written: the export differs from "):
        export_file(block, example, tmp_path / "model.pt2", "pt2", example, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []
