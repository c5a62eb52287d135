"""What a model costs per image: parameters and forward FLOPs, by formula or counted."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from towerspace.block import Complexity, TowerConv2d


@runtime_checkable
class Costed(Protocol):
    """A module that knows its cost by formula (Xception, TowerConv2d): nothing is counted."""

    def complexity(self, height: int, width: int) -> Complexity:
        """Parameters and FLOPs per image for an input of height × width."""
        ...


def complexity(model: nn.Module, image_size: int, in_chans: int = 3) -> Complexity:
    """Parameters and forward FLOPs per image of any model (by its own formula if it has one
    and its parameters still match it).

    Otherwise FLOPs are counted by FlopCounterMode on one forward pass with meta tensors
    (nothing is computed, the model is left as it was); training FLOPs are 3× forward, as
    everywhere.
    """
    params = sum(p.numel() for p in model.parameters())
    if isinstance(model, Costed):
        cost = model.complexity(image_size, image_size)
        if cost.params == params:  # else its layers were changed (towerized): count them
            return cost
    return Complexity(params, forward_flops(model, image_size, in_chans), 1, 1)


def forward_flops(model: nn.Module, image_size: int, in_chans: int = 3) -> int:
    """Forward FLOPs per image (2 per multiply-add) as torch.utils.flop_counter counts them."""
    tensors = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    }
    x = torch.empty(1, in_chans, image_size, image_size, device="meta")
    modes = {m: m.training for m in model.modules()}
    # the FLOPs of the arithmetic: impl='auto' would time kernels (and count their runs)
    impls = {m: m.impl for m in model.modules() if isinstance(m, TowerConv2d)}
    counter = FlopCounterMode(display=False)
    try:
        model.eval()  # batch statistics of one image would fail; dropout is not counted anyway
        for block in impls:
            block.impl = "native"
        with torch.no_grad(), counter:
            functional_call(model, tensors, (x,))
    finally:
        for module, training in modes.items():
            module.training = training
        for block, impl in impls.items():
            block.impl = impl
    return int(counter.get_total_flops())


def model_cost(model: nn.Module, metric: str, image_size: int, in_chans: int = 3) -> int:
    """A model's parameters (metric 'params') or forward FLOPs per image ('flops'), counted."""
    if metric == "params":
        return sum(p.numel() for p in model.parameters())
    return forward_flops(model, image_size, in_chans)
