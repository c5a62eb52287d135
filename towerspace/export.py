"""Export a model to a torch.export program or an ONNX file, and check it against eager PyTorch."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from towerspace.block import IMPL_NAMES, TowerConv2d
from towerspace.choices import EXPORT_FORMATS
from towerspace.errors import ConfigError

ONNX_LIMIT = 2**31  # bytes: an ONNX protobuf holds at most 2 GiB, larger weights go beside it


def export_copy(model: nn.Module, impl: str | None = "native") -> nn.Module:
    """An eval-mode copy of the model whose TowerConv2d blocks all run `impl` (None: their own).

    'native' (the default) puts one grouped convolution per block in the graph, which ONNX
    runtimes and compilers optimise themselves. The other fixed impls trace too; 'auto' cannot:
    it times kernels on real tensors at run time, so it is refused.
    """
    if impl is not None and impl not in IMPL_NAMES:
        raise ConfigError(f"impl={impl!r} is not one of: {', '.join(IMPL_NAMES)}")
    clone = copy.deepcopy(model).eval()
    for name, block in clone.named_modules():
        if not isinstance(block, TowerConv2d):
            continue
        block.impl = impl or block.impl
        if block.impl == "auto":
            raise ConfigError(
                f"{name or 'model'}: impl='auto' times kernels at run time and cannot be "
                f"exported; export with impl='native' or another fixed impl"
            )
    return clone


def _trace_args(example: torch.Tensor, dynamic_batch: bool) -> tuple[tuple[torch.Tensor], object]:
    if not dynamic_batch:
        return (example,), None
    # torch.export specializes a size-1 dimension, so a single example is traced as a pair
    traced = torch.cat([example, example]) if example.shape[0] == 1 else example
    return (traced,), ({0: Dim.DYNAMIC},)


def export_program(
    model: nn.Module,
    example: torch.Tensor,
    *,
    impl: str | None = "native",
    dynamic_batch: bool = True,
) -> ExportedProgram:
    """The model in eval mode as a torch.export program (batch size dynamic by default)."""
    args, dynamic_shapes = _trace_args(example, dynamic_batch)
    return torch.export.export(export_copy(model, impl), args, dynamic_shapes=dynamic_shapes)


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    impl: str | None = "native",
    dynamic_batch: bool = True,
    opset_version: int | None = None,
) -> Path:
    """Write the model in eval mode to an ONNX file with torch's torch.export-based exporter."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, dynamic_shapes = _trace_args(example, dynamic_batch)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    torch.onnx.export(
        export_copy(model, impl),
        args,
        path,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=["input"],
        output_names=["output"],
        opset_version=opset_version,
        external_data=size >= ONNX_LIMIT,
        verbose=False,
    )
    return path


@torch.no_grad()
def _reference(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    try:
        return model.eval()(inputs)
    finally:
        model.train(was_training)


@torch.no_grad()
def check_program(program: ExportedProgram, model: nn.Module, inputs: torch.Tensor) -> float:
    """Max absolute difference between the exported program and the eager model (eval mode)."""
    expected = _reference(model, inputs)
    return (program.module()(inputs) - expected).abs().max().item()


def check_onnx(path: str | Path, model: nn.Module, inputs: torch.Tensor) -> float:
    """Max absolute difference between the ONNX file run by onnxruntime and the eager model."""
    import onnxruntime  # the `export` extra: only this check needs it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (output,) = session.run(None, {name: inputs.detach().cpu().numpy()})
    expected = _reference(model, inputs).cpu()
    return (torch.from_numpy(output) - expected).abs().max().item()


# ---------------------------------------------------------------- files (towerspace export)

FORMATS = {fmt: f".{fmt}" for fmt in EXPORT_FORMATS}  # format → the file's suffix
TOLERANCE = 1e-4  # max abs difference to eager PyTorch that a written export may have


class ExportMismatch(RuntimeError):
    """An export whose outputs differ from eager PyTorch's by more than the tolerance."""


def export_format(path: Path, fmt: str | None) -> str:
    """The format asked for, or the one the file's suffix names."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConfigError(f"--format {fmt}: not allowed; allowed: {', '.join(FORMATS)}")
        return fmt
    by_suffix = {suffix: name for name, suffix in FORMATS.items()}
    if path.suffix not in by_suffix:
        raise ConfigError(
            f"--out {path}: cannot tell the format from {path.suffix or 'no suffix'!r}; "
            f"allowed: {', '.join(by_suffix)} (or --format {'|'.join(FORMATS)})"
        )
    return by_suffix[path.suffix]


def export_file(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    fmt: str,
    inputs: torch.Tensor,
    tolerance: float = TOLERANCE,
) -> float:
    """Write the model as ONNX or a torch.export program (.pt2), checked against eager PyTorch
    on `inputs` as read back from the file before it is put in place (files.write_atomic: a
    failed export or check leaves nothing behind). Returns the max abs difference."""
    from towerspace import files

    if fmt == "onnx":
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if size >= ONNX_LIMIT:  # its weights would go to a file named after the temporary one
            raise ConfigError(
                f"{path}: {size:,} bytes of weights, more than one ONNX file holds; "
                f"use towerspace.export.export_onnx (weights beside the file)"
            )
    diff = math.nan

    def write(tmp: Path) -> None:
        nonlocal diff
        if fmt == "onnx":
            export_onnx(model, example, tmp)
            diff = check_onnx(tmp, model, inputs)
        else:
            with open(tmp, "wb") as f:  # a path not ending in .pt2 is refused by name
                torch.export.save(export_program(model, example), f)
            with open(tmp, "rb") as f:
                diff = check_program(torch.export.load(f), model, inputs)
        if not diff <= tolerance:
            raise ExportMismatch(
                f"{path}: not written: the export differs from eager PyTorch "
                f"by {diff:.2e}, more than {tolerance:g}"
            )

    files.write_atomic(Path(path), write)
    return diff


def experiment_model(cfg, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """The model an experiment (with its --set fields) builds, initialised from `seed`, and
    the shape of one input image."""
    from towerspace.data import sizes
    from towerspace.models import build_model

    size = sizes(cfg.data)
    torch.manual_seed(seed)
    model = build_model(
        cfg.model, in_chans=size.in_chans, num_classes=size.num_classes, image_size=size.image_size
    )
    return model, (size.in_chans, size.image_size, size.image_size)


def trial_model(sweep_dir: Path, trial_id: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """A sweep trial's model with the weights of its newest complete checkpoint, the shape of
    one input image, and which checkpoint it was."""
    from towerspace import results, storage
    from towerspace.config import apply, from_dict
    from towerspace.trial import newest_checkpoint_file, solved_config

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / storage.EXPERIMENT_FILE).is_file():
        raise ConfigError(
            f"{sweep_dir}: not a towerspace sweep (no {storage.EXPERIMENT_FILE}); "
            f"expected a sweep's folder, or an experiment file"
        )
    path = sweep_dir / results.RECORDS / f"{trial_id}.json"
    if not storage.SAFE_NAME.match(trial_id) or not path.is_file():
        known = sorted(p.stem for p in (sweep_dir / results.RECORDS).glob("*.json"))
        listing = ", ".join(known[:8]) + (f" and {len(known) - 8} more" if len(known) > 8 else "")
        raise ConfigError(
            f"--trial {trial_id}: no such trial in {sweep_dir} (its trials: "
            f"{listing or 'none yet'})"
        )
    try:
        record = results.read_record(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable trial record ({err})") from None
    checkpoint = newest_checkpoint_file(sweep_dir, trial_id)
    if checkpoint is None:
        raise ConfigError(
            f"--trial {trial_id}: no complete checkpoint in {sweep_dir} (it ran "
            f"{record.get('epochs_run') or 0} epochs, status {record['status']})"
        )
    cfg = from_dict(record["config"] or {})
    cfg = apply(cfg, {"model.init_from": None})  # the checkpoint holds every weight
    cfg = solved_config(cfg, record)  # match latency: the width the trial solved
    model, shape = experiment_model(cfg)
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    model.load_state_dict(state["model"])
    epoch = state.get("epoch", "?")
    return model, shape, f"{trial_id}'s checkpoint after epoch {epoch} ({checkpoint.parent.name})"


def export_command(
    source: str | Path,
    out: str | Path,
    *,
    fmt: str | None = None,
    trial: str | None = None,
    sets: Sequence[str] = (),
    seed: int = 0,
    tolerance: float = TOLERANCE,
) -> str:
    """towerspace export: an experiment file's model (random weights from seed), or a sweep
    folder's trial (its newest checkpoint), written to out and checked; a line saying what."""
    from towerspace import config
    from towerspace.files import shown

    source, out = Path(source), Path(out)
    fmt = export_format(out, fmt)
    if source.is_dir():
        if trial is None:
            raise ConfigError(
                f"{source}: a folder; expected an experiment file, or a sweep's folder with "
                f"--trial ID (the trial to export)"
            )
        if sets:
            raise ConfigError("--set: for an experiment file; a trial's config is its own")
        model, shape, what = trial_model(source, trial)
    else:
        if trial is not None:
            raise ConfigError(f"--trial {trial}: for a sweep's folder; {source} is not a folder")
        model, shape = experiment_model(config.load_experiment(source, sets), seed)
        what = f"{source}'s model, random weights (seed {seed})"
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *shape, generator=generator)
    inputs = torch.randn(4, *shape, generator=generator)
    diff = export_file(model, example, out, fmt, inputs, tolerance)
    return (
        f"wrote: {shown(out)} ({fmt}: {what}); max abs diff to eager PyTorch "
        f"{diff:.1e} on {len(inputs)} random inputs"
    )
