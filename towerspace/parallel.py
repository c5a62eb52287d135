"""Data-parallel pieces for the trainer: batch shards and BatchNorm over the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This worker's contiguous part of a global batch (sizes differ by one at most)."""
    return batch if world_size == 1 else batch.tensor_split(world_size)[rank]


class _SumOverWorkers(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every worker's sum
    depends on every worker's inputs."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sum_over_workers(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of a tensor over every data-parallel worker."""
    return _SumOverWorkers.apply(tensor)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, on any device.

    torch's SyncBatchNorm runs on GPUs only; this one all-reduces (differentiably) the sums
    it needs, so data-parallel workers on CPU (gloo) compute what one worker would compute
    on the whole batch. Two passes (mean, then squared deviations) for a stable variance.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims, out_dtype = (0, 2, 3), x.dtype
        x = x.float() if x.element_size() < 4 else x  # bf16 autocast: float32 sums and count
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        sums = sum_over_workers(torch.cat([x.sum(dims), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        centred = x - mean.view(1, -1, 1, 1)
        var = sum_over_workers(centred.pow(2).sum(dims)) / total
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), total.item())
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(out_dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked += 1
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
            momentum = 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / max(count - 1, 1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def synchronise_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """The model with every BatchNorm2d over the global batch: SyncBatchNorm on CUDA, else ours."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(model, name, _global_copy(child))
        else:
            synchronise_batchnorm(child, device)
    return model


def _global_copy(bn: nn.BatchNorm2d) -> GlobalBatchNorm2d:
    """A GlobalBatchNorm2d holding bn's parameters and statistics."""
    new = GlobalBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                            bn.track_running_stats)  # fmt: skip
    new.load_state_dict(bn.state_dict())
    new.to(bn.running_mean.device if bn.running_mean is not None else bn.weight.device)
    return new
