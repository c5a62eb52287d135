"""Start a model from depthwise weights: Keras', timm's legacy_xception, or any finer-towered
Xception.

A depthwise kernel is a grouped kernel whose off-diagonal blocks are zero, so an Xception at
fewer towers (and the same widths) can start from a depthwise one and compute the same function.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from towerspace.block import TowerConv2d, regroup_weight
from towerspace.errors import ConfigError

StateDict = Mapping[str, torch.Tensor]
TIMM_BN_EPS = 1e-5  # timm's legacy_xception keeps PyTorch's default; Keras (and towerspace) 1e-3
_TIMM_KEY = re.compile(r"^block(\d+)\.(rep\.(\d+)|skip|skipbn)\.(.+)$")
_TIMM_TOP = {
    "conv1.": "stem.0.", "bn1.": "stem.1.", "conv2.": "stem.3.", "bn2.": "stem.4.",
    "conv3.": "exit.block14.convs.0.", "bn3.": "exit.block14.norms.0.",
    "conv4.": "exit.block14.convs.1.", "bn4.": "exit.block14.norms.1.",
    "fc.": "fc.", "last_linear.": "fc.",  # last_linear: Cadene's pretrainedmodels
}  # fmt: skip


def is_timm_xception(state_dict: StateDict) -> bool:
    """Whether a state dict has timm's legacy_xception (Cadene / Keras-converted) names."""
    return "block1.rep.0.conv1.weight" in state_dict


def _timm_block(number: int) -> str:
    """timm's block1…block12 as towerspace's entry, middle and exit blocks."""
    flow = "entry" if number <= 3 else "middle" if number <= 11 else "exit"
    return f"{flow}.block{number + 1}"


def _timm_name(key: str) -> str:
    """One legacy_xception key as the towerspace name; keys it does not know pass unchanged."""
    key = key.replace(".conv1.weight", ".spatial.weight")  # SeparableConv2d's depthwise conv
    match = _TIMM_KEY.match(key)
    if match is None:
        prefix = next((p for p in _TIMM_TOP if key.startswith(p)), None)
        return key if prefix is None else _TIMM_TOP[prefix] + key.removeprefix(prefix)
    number, part, rep, rest = int(match[1]), match[2], match[3], match[4]
    block = _timm_block(number)
    if part == "skip":
        return f"{block}.shortcut.0.{rest}"
    if part == "skipbn":
        return f"{block}.shortcut.1.{rest}"
    # rep is [ReLU, SeparableConv2d, BN] per conv; block1 starts without the ReLU
    conv, slot = divmod(int(rep) - (0 if number == 1 else 1), 3)
    return f"{block}.{'convs' if slot == 0 else 'norms'}.{conv}.{rest}"


def from_timm_xception(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """A legacy_xception state dict renamed to towerspace's depthwise Xception."""
    renamed = {}
    for key, value in state_dict.items():
        name = _timm_name(key)
        if name.endswith(".pointwise.weight") and value.dim() == 2:
            value = value[:, :, None, None]  # Cadene's first Keras conversion stored (out, in)
        renamed[name] = value
    return renamed


_KERAS_SITE = re.compile(r"^block(\d+)_(conv|sepconv)(\d)(_bn)?$")
# Keras names its shortcut convs and their BatchNorms only by count (conv2d, conv2d_1, ...):
# they come, in layer order, to these blocks
_KERAS_SHORTCUTS = ("entry.block2", "entry.block3", "entry.block4", "exit.block13")
_BN = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, moving mean, var


def _keras_site(name: str) -> str | None:
    """A Keras Xception layer name (block4_sepconv2_bn) as towerspace's module path."""
    match = _KERAS_SITE.match(name)
    if match is None:
        return None
    block, index, bn = int(match[1]), int(match[3]) - 1, match[4]
    if block == 1:
        return f"stem.{3 * index + (1 if bn else 0)}"
    flow = "entry" if block <= 4 else "middle" if block <= 12 else "exit"
    return f"{flow}.block{block}.{'norms' if bn else 'convs'}.{index}"


def _keras_tensors(path: str, arrays: list, shortcut: bool) -> dict[str, torch.Tensor]:
    """One Keras layer's weights (channels-last kernels) as towerspace tensors."""
    t = [torch.as_tensor(a, dtype=torch.float32) for a in arrays]
    if len(t) == 4:  # BatchNormalization
        out = {f"{path}.{k}": v for k, v in zip(_BN, t, strict=True)}
        return {**out, f"{path}.num_batches_tracked": torch.tensor(0)}
    if len(t) == 2 and not shortcut and t[0].dim() == 4:  # SeparableConv2D: depthwise, pointwise
        return {f"{path}.spatial.weight": t[0].permute(2, 3, 0, 1).contiguous(),
                f"{path}.pointwise.weight": t[1].permute(3, 2, 0, 1).contiguous()}  # fmt: skip
    if len(t) == 2:  # Dense: kernel (in, out), bias
        return {f"{path}.weight": t[0].T.contiguous(), f"{path}.bias": t[1]}
    return {f"{path}.weight": t[0].permute(3, 2, 0, 1).contiguous()}  # Conv2D (h, w, in, out)


def from_keras_xception(source) -> dict[str, torch.Tensor]:
    """Keras Applications' Xception as a towerspace depthwise state dict: from the Keras model
    (anything with `.layers`), or from {layer name: layer.get_weights()} in layer order.

    Load it into `xception(pool_padding="keras")` to compute what Keras computes (Keras pads
    the strided max-pools of even inputs at the bottom and right only).
    """
    if hasattr(source, "layers"):
        source = {layer.name: layer.get_weights() for layer in source.layers}
    state, convs, norms = {}, iter(_KERAS_SHORTCUTS), iter(_KERAS_SHORTCUTS)
    for name, arrays in source.items():
        if not len(arrays):
            continue
        path, shortcut = _keras_site(name), False
        if name == "predictions":
            path = "fc"
        elif path is None and (name == "conv2d" or name.startswith("conv2d_")):
            path, shortcut = f"{next(convs)}.shortcut.0", True
        elif path is None and name.startswith("batch_normalization"):
            path = f"{next(norms)}.shortcut.1"
        if path is None:
            raise ConfigError(f"{name!r} is not a layer of Keras' Xception")
        state.update(_keras_tensors(path, list(arrays), shortcut))
    return state


def read_state_dict(source: str | Path | StateDict) -> dict[str, torch.Tensor]:
    """A state dict from a path (loaded with weights_only=True) or as given."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} is not a file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # a checkpoint that wraps its weights
    if not isinstance(state, Mapping):
        raise ConfigError(f"{str(path)!r} does not hold a state dict")
    return dict(state)


def _listing(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _tower_blocks(model: nn.Module) -> dict[str, TowerConv2d]:
    return {
        f"{n}.spatial.weight": m for n, m in model.named_modules() if isinstance(m, TowerConv2d)
    }


def check_keys(model: nn.Module, state_dict: StateDict) -> None:
    """Refuse, in one line, a state dict whose names are not the model's."""
    target = model.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    if missing or unexpected:
        raise ConfigError(f"state dict does not fit the model: {len(missing)} missing "
                         f"[{_listing(missing)}], {len(unexpected)} unexpected "
                         f"[{_listing(unexpected)}]")  # fmt: skip


def _regrouped(key: str, weight: torch.Tensor, towers: int) -> torch.Tensor:
    """A source's grouped kernel at the model's (fewer) towers, embedded block-diagonally."""
    channels, group_width = weight.shape[0], weight.shape[1]
    source_towers = channels // group_width if channels % group_width == 0 else 0
    if source_towers == 0 or source_towers % towers:
        raise ConfigError(f"{key}: a kernel at {source_towers or '?'} towers cannot start a layer "
                         f"at {towers} towers (the model's tower count must divide the "
                         f"source's)")  # fmt: skip
    return weight if source_towers == towers else regroup_weight(weight, source_towers, towers)


def init_from_depthwise(model: nn.Module, state_dict: StateDict) -> nn.Module:
    """Copy a depthwise (or any finer-towered) model's weights into a model at fewer towers.

    Every tensor is copied as is, except each TowerConv2d's grouped spatial kernel, which is
    embedded block-diagonally (towerspace.block.regroup_weight): the model then computes the
    source's function. The widths must be equal; the model's tower counts must divide the
    source's, layer by layer.
    """
    check_keys(model, state_dict)
    blocks, target = _tower_blocks(model), model.state_dict()
    weights, mismatched = {}, []
    for key, tensor in target.items():
        value = state_dict[key]
        if key in blocks and value.shape[0] == tensor.shape[0]:
            value = _regrouped(key, value, blocks[key].towers)
        if value.shape != tensor.shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(tensor.shape)}")
        weights[key] = value
    if mismatched:
        raise ConfigError(f"{len(mismatched)} tensors differ in shape from the source "
                         f"[{_listing(mismatched, 2)}]: widths, classes and input channels must be "
                         f"equal (budget matching changes widths: model.match must be "
                         f"'none')")  # fmt: skip
    if not any(t.is_meta for t in target.values()):  # meta: structure only, checked above
        model.load_state_dict(weights)
    return model


def set_bn_eps(model: nn.Module, eps: float) -> None:
    """Set every BatchNorm's epsilon (weights converted for another framework's default)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = eps


def load_pretrained(
    model: nn.Module, source: str | Path | StateDict, *, timm_bn_eps: float | None = TIMM_BN_EPS
) -> nn.Module:
    """Start a towerspace Xception from a towerspace or timm legacy_xception state dict.

    A legacy_xception dict (detected by its key names) is renamed first, and the model's
    BatchNorm eps set to timm's 1e-5 so that it computes what timm computes (timm_bn_eps=None
    keeps towerspace's Keras eps of 1e-3). The model may sit at any tower count that divides
    the source's (see init_from_depthwise).
    """
    state_dict = read_state_dict(source)
    if is_timm_xception(state_dict):
        state_dict = from_timm_xception(state_dict)
        if timm_bn_eps is not None:
            set_bn_eps(model, timm_bn_eps)
    return init_from_depthwise(model, state_dict)
