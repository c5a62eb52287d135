"""The GPU paths emulated on the CPU: bf16 autocast and channels_last in the trainer, every impl
under autocast, and BatchNorm over two gloo workers under autocast (dtype and layout bugs show
here before a GPU is at hand)."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from towerspace import TowerConv2d
from towerspace import data as datasets
from towerspace.impls import IMPLS
from towerspace.models import xception
from towerspace.parallel import GlobalBatchNorm2d
from towerspace.train import TrainConfig, Trainer

CFG = TrainConfig(epochs=1, batch_size=32, max_steps=2, lr=0.05, device="cpu")


@pytest.fixture(scope="module")
def digits():
    return datasets.load(datasets.DataConfig(name="digits", image_size=16))


def _trained(bundle, amp: str, channels_last: str) -> tuple[Trainer, dict]:
    torch.manual_seed(0)
    model = xception(width=0.125, middle_blocks=1, stem="small", num_classes=10, in_chans=1,
                     towers=4, input_size=16)  # fmt: skip
    trainer = Trainer(model, bundle, dataclasses.replace(CFG, amp=amp, channels_last=channels_last))
    return trainer, next(trainer.epochs())


@pytest.mark.parametrize("amp", ["bf16", "none"])
@pytest.mark.parametrize("layout", ["on", "off"])
def test_the_trainer_under_cpu_bf16_autocast_and_channels_last(digits, amp, layout):
    trainer, metrics = _trained(digits, amp, layout)
    _, reference = _trained(digits, "none", "off")
    assert trainer.amp is (amp == "bf16") and trainer.channels_last is (layout == "on")
    assert all(
        p.dtype == torch.float32 for p in trainer.model.parameters()
    )  # autocast: fp32 weights
    convs = [m.weight for m in trainer.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) == (layout == "on")
               for w in convs if w.shape[1] > 1 and w.shape[-1] > 1)  # fmt: skip
    # two steps from the same weights and batches: bf16 rounding (3 significant digits) only
    tolerance = 0.02 if amp == "bf16" else 1e-5
    for key in ("train_loss", "val_loss"):
        assert metrics[key] == pytest.approx(reference[key], rel=tolerance), key
    assert metrics["val_acc"] == pytest.approx(reference["val_acc"], abs=0.05)


def test_autocast_is_off_on_the_cpu_unless_asked(digits):
    trainer, _ = _trained(digits, "auto", "auto")
    assert trainer.amp is False and trainer.channels_last is False  # auto: on CUDA only


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_every_impl_under_cpu_bf16_autocast_matches_native(impl, layout):
    for towers in (1, 2, 8, 32):
        torch.manual_seed(towers)
        ref = TowerConv2d(32, 32, towers=towers, bias=True).to(memory_format=layout)
        other = TowerConv2d(32, 32, towers=towers, bias=True, impl=impl)
        other.load_state_dict(ref.state_dict())
        other.to(memory_format=layout)  # weights in the layout too, as a channels_last model has
        x = torch.randn(4, 32, 9, 9).contiguous(memory_format=layout).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y2 = ref(x), other(x2)
        assert y2.dtype == y.dtype == torch.bfloat16, towers
        # bf16: 8 bits of mantissa, so about 1% of the output's scale (sums taken in other orders)
        scale = y.float().abs().max().item()
        torch.testing.assert_close(y2.float(), y.float(), rtol=0.02, atol=0.02 * scale)
        grad = torch.randn_like(y)
        y.backward(grad)
        y2.backward(grad)
        assert x2.grad.dtype == torch.float32
        torch.testing.assert_close(x2.grad, x.grad, rtol=0.02, atol=0.02 * x.grad.abs().max())
        for (name, p), p2 in zip(ref.named_parameters(), other.parameters(), strict=True):
            torch.testing.assert_close(p2.grad, p.grad, rtol=0.02, atol=0.02 * p.grad.abs().max(),
                                       msg=f"{towers} towers: {name}")  # fmt: skip


def _batchnorm_worker(rank: int, world_size: int, init: str, path: str) -> None:
    """Half of a bf16 batch through GlobalBatchNorm2d under autocast on one of two workers."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    x = torch.load(path + ".in", weights_only=True).tensor_split(world_size)[rank]
    x = x.to(torch.bfloat16).requires_grad_()
    bn = GlobalBatchNorm2d(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bn(x)
    (out.float() * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    parts = [torch.empty_like(x.grad) for _ in range(world_size)]
    dist.all_gather(parts, x.grad)
    outs = [torch.empty_like(out) for _ in range(world_size)]
    dist.all_gather(outs, out.detach().contiguous())
    if rank == 0:
        torch.save({"out": torch.cat(outs), "grad": torch.cat(parts), "dtype": str(out.dtype),
                    "running": (bn.running_mean, bn.running_var)}, path)  # fmt: skip
    dist.destroy_process_group()


@pytest.mark.slow  # two real processes
def test_global_batchnorm_under_bf16_autocast_on_two_gloo_workers(tmp_path):
    torch.manual_seed(0)
    # 2 x 6 images of 19x19 (a count bf16 cannot hold: 4332), off-centre, as after a conv
    x = (3.0 + 2.0 * torch.randn(12, 8, 19, 19)).to(torch.bfloat16).float()
    torch.save(x, str(tmp_path / "bn") + ".in")
    mp.spawn(_batchnorm_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path / "bn")),
             nprocs=2)  # fmt: skip
    got = torch.load(tmp_path / "bn", weights_only=True)
    one = nn.BatchNorm2d(8).double()  # one worker, the whole batch, float64
    xd = x.double().requires_grad_()
    ref = one(xd)
    (ref * torch.cat([torch.arange(ref[:6].numel()).view_as(ref[:6]).sin()] * 2)).sum().backward()
    assert got["dtype"] == "torch.bfloat16"  # the layer keeps autocast's dtype, as BatchNorm2d does
    torch.testing.assert_close(got["out"].double(), ref.detach(), rtol=0.01, atol=0.02)
    torch.testing.assert_close(got["grad"].double(), xd.grad, rtol=0.02, atol=0.02)
    # the running statistics come from float32 sums over the global batch and its exact count
    torch.testing.assert_close(got["running"][0].double(), one.running_mean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got["running"][1].double(), one.running_var, rtol=1e-3, atol=1e-4)
