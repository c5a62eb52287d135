"""`width -> network` builders that towerize() puts on the continuum: torchvision's networks,
and a user's own function in a file."""

from __future__ import annotations

import importlib.util
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from towerspace.errors import ConfigError

# torchvision.models constructor (by name) → whether it has a width knob (width_mult).
# weights=None always: random init, no download; torchvision loads when one is built.
TORCHVISION: dict[str, bool] = {
    "torchvision.resnet18": False,
    "torchvision.resnet50": False,
    "torchvision.mobilenet_v2": True,
    "torchvision.mobilenet_v3_small": True,
    "torchvision.mobilenet_v3_large": True,
}


def has_width_knob(name: str) -> bool:
    """Whether a model name's width can be scaled (Xception, MobileNets, a user's builder)."""
    return TORCHVISION.get(name, True)


def torchvision_builder(
    name: str, *, in_chans: int, num_classes: int, small_stem: bool, round_nearest: int = 8
) -> Callable[[float], nn.Module]:
    """`width -> model` for a torchvision network sized for a data set (width: width_mult).

    small_stem gives ResNet a CIFAR-style stem (3×3 stride-1 conv, no max-pool); round_nearest
    rounds MobileNetV2's channels (torchvision: 8; finer steps let budget matching land closer).
    """
    from torchvision import models as tv

    has_width = TORCHVISION[name]
    constructor = getattr(tv, name.removeprefix("torchvision."))

    def build(width: float) -> nn.Module:
        kwargs = {"width_mult": width} if has_width else {}
        if name == "torchvision.mobilenet_v2":
            kwargs["round_nearest"] = round_nearest
        model = constructor(weights=None, num_classes=num_classes, **kwargs)
        if name.startswith("torchvision.resnet"):
            return _resnet_stem(model, in_chans, small_stem)
        first = model.features[0][0]
        if in_chans != first.in_channels:
            model.features[0][0] = _stem_conv(in_chans, first.out_channels, 3, 2)
        return model

    return build


def _resnet_stem(model: nn.Module, in_chans: int, small: bool) -> nn.Module:
    if small:  # 32 px images: a 7×7 stride-2 conv and a max-pool would leave 8×8 after the stem
        model.conv1 = _stem_conv(in_chans, 64, 3, 1)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = _stem_conv(in_chans, 64, 7, 2)
    return model


def _stem_conv(in_chans: int, out_channels: int, kernel_size: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_chans, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
    return conv


def split_builder(spec: str) -> tuple[Path, str]:
    """('path/to/file.py', 'function') from 'path/to/file.py:function'."""
    path, sep, function = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not function.isidentifier():
        raise ValueError(f"{spec!r} is not 'path/to/file.py:function'")
    return Path(path), function


def absolute_builder(spec: str) -> str:
    """The builder spec with its file as an absolute path (trials run in other directories)."""
    path, function = split_builder(spec)
    return f"{path.resolve()}:{function}"


def custom_builder(
    spec: str, *, in_chans: int, num_classes: int, image_size: int
) -> Callable[[float], nn.Module]:
    """`width -> model` from a user's 'file.py:function' taking in_chans, num_classes, image_size
    and width as keyword arguments. What the user's code raises is a ConfigError naming the
    file and line."""
    path, name = split_builder(spec)
    if not path.is_file():
        raise ConfigError(f"model.builder: {spec!r}: no such file {path}")
    loader = importlib.util.spec_from_file_location(f"towerspace_builder_{path.stem}", path)
    module = importlib.util.module_from_spec(loader)
    try:
        loader.loader.exec_module(module)  # the user's file, run on purpose: it defines the model
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as err:
        when = ("the builder file does not parse" if _syntax_error_in(path, err)
                else "raised while importing the builder")  # fmt: skip
        raise ConfigError(f"model.builder: {_raised_in(path, err)} ({when})") from err
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"model.builder: {spec!r}: {path} has no function {name!r}")

    def build(width: float) -> nn.Module:
        try:
            model = function(in_chans=in_chans, num_classes=num_classes, image_size=image_size,
                             width=width)  # fmt: skip
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise  # the machine's limit, not the user's code
        except Exception as err:
            raise ConfigError(f"model.builder: {_raised_in(path, err)} (raised by {name}() "
                              f"while building the model)") from err  # fmt: skip
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.builder: {spec!r}: {name}() returned a "
                              f"{type(model).__name__}, not an nn.Module")  # fmt: skip
        return model

    return build


def syntax_problem(path: Path) -> str | None:
    """Why a builder file does not parse ('file.py:3: SyntaxError: ...'), or None if it does."""
    try:
        compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as err:  # ValueError: null bytes (Python < 3.12)
        return f"{_raised_in(path, err)} (the builder file does not parse)"
    return None


def _raised_in(path: Path, err: BaseException) -> str:
    """'file.py:12: ZeroDivisionError: division by zero', at the innermost line of the user's
    file that the error passed through (for a syntax error in it, the line that does not parse)."""
    line = None
    if _syntax_error_in(path, err):
        line = err.lineno
    else:
        for frame, lineno in traceback.walk_tb(err.__traceback__):
            if Path(frame.f_code.co_filename).resolve() == path.resolve():
                line = lineno
    text = (err.msg if isinstance(err, SyntaxError) else str(err)).strip()
    problem = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
    return f"{path}:{line}: {problem}" if line else f"{path}: {problem}"


def _syntax_error_in(path: Path, err: BaseException) -> bool:
    """Whether err is a syntax error in path itself (not in a module it imports)."""
    filename = getattr(err, "filename", None) if isinstance(err, SyntaxError) else None
    return filename is not None and Path(filename).resolve() == path.resolve()
