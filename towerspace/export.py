"""Export a model to a torch.export program or an ONNX file, and check it against eager PyTorch."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from towerspace.block import IMPL_NAMES, TowerConv2d
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
