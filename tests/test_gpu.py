"""Every CUDA path, for real: run with `pytest -m gpu` on a machine with a GPU (skipped elsewhere,
with the reason; benchmarks/gpu_check.py runs them in the device check)."""

import dataclasses
import gc
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from test_imagefolder import write_tree
from torch import nn

from towerspace import TowerConv2d, config, memory, results
from towerspace import data as datasets
from towerspace.impls import IMPLS
from towerspace.models import xception
from towerspace.parallel import synchronise_batchnorm
from towerspace.train import TrainConfig, Trainer

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parent.parent
CFG = TrainConfig(epochs=1, batch_size=32, max_steps=3, lr=0.05)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.02}


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 convolutions and matmuls in float32, not TF32, while comparing implementations."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _model(towers=4) -> nn.Module:
    torch.manual_seed(0)
    return xception(width=0.125, middle_blocks=1, stem="small", num_classes=10, in_chans=1,
                    towers=towers, input_size=16)  # fmt: skip


def _digits(device: str) -> datasets.DataBundle:
    return datasets.load(datasets.DataConfig(name="digits", image_size=16), device=device)


@pytest.mark.parametrize("amp", ["auto", "none"])
@pytest.mark.parametrize("layout", ["auto", "off"])
def test_the_trainer_on_cuda_in_fp32_and_bf16_nchw_and_channels_last(amp, layout):
    recipe = dataclasses.replace(CFG, device="cuda", amp=amp, channels_last=layout)
    trainer = Trainer(_model(), _digits("cuda"), recipe)
    metrics = next(trainer.epochs())
    assert trainer.amp is (amp == "auto") and trainer.channels_last is (layout == "auto")
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert torch.backends.cudnn.benchmark  # not deterministic: cuDNN picks its kernels
    reference = next(Trainer(_model(), _digits("cpu"), dataclasses.replace(CFG, device="cpu"))
                     .epochs())  # fmt: skip
    tolerance = 0.05 if amp == "auto" else 1e-3  # bf16 rounding; else kernels' summing order
    assert metrics["train_loss"] == pytest.approx(reference["train_loss"], rel=tolerance)
    assert metrics["val_loss"] == pytest.approx(reference["val_loss"], rel=tolerance)
    assert metrics["peak_memory_mb"] > 0  # CUDA's allocator, not the process's RSS


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_every_impl_matches_native_on_cuda(impl, dtype, layout):
    for towers in (1, 2, 8, 32):
        torch.manual_seed(towers)
        ref = TowerConv2d(32, 32, towers=towers, bias=True).to("cuda", dtype)
        ref.to(memory_format=layout)
        other = TowerConv2d(32, 32, towers=towers, bias=True, impl=impl)
        other.load_state_dict(ref.state_dict())
        other.to("cuda", dtype).to(memory_format=layout)  # weights in the layout, as a model has
        x = torch.randn(4, 32, 9, 9, device="cuda", dtype=dtype)
        x = x.contiguous(memory_format=layout).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = ref(x), other(x2)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(y2, y, rtol=tol, atol=tol * y.abs().max().item())
        grad = torch.randn_like(y)
        y.backward(grad)
        y2.backward(grad)
        torch.testing.assert_close(x2.grad, x.grad, rtol=tol, atol=tol * x.grad.abs().max().item())
        for (name, p), p2 in zip(ref.named_parameters(), other.parameters(), strict=True):
            torch.testing.assert_close(p2.grad, p.grad, rtol=tol,
                                       atol=tol * p.grad.abs().max().item(), msg=name)  # fmt: skip


@pytest.mark.parametrize("impl", ["auto", *sorted(IMPLS)])
def test_every_impl_under_cuda_bf16_autocast_keeps_the_dtype(impl):
    block = TowerConv2d(64, 64, towers=8, impl=impl).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 64, 19, 19, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in block.parameters())


def test_syncbatchnorm_on_one_nccl_rank_is_batchnorm(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Sequential(nn.BatchNorm2d(8)))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    synced = synchronise_batchnorm(model, torch.device("cuda")).cuda()
    assert [type(m) for m in synced.modules()].count(nn.SyncBatchNorm) == 2
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rendezvous", rank=0,
                            world_size=1)  # fmt: skip
    try:
        fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                              nn.Sequential(nn.BatchNorm2d(8))).cuda()  # fmt: skip
        fresh.load_state_dict(reference)
        x = torch.randn(4, 3, 12, 12, device="cuda")
        torch.testing.assert_close(synced(x), fresh(x), rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_a_ray_train_worker_on_one_gpu_with_nccl_trains_a_trial(local_ray, tmp_path):
    from ray import train
    from ray.train.torch import TorchConfig, TorchTrainer

    from towerspace.sweep.trainable import _train_worker

    cfg = config.load_experiment(REPO / "experiments/digits_continuum.yaml", [
        "train.epochs=1", "model.width=0.125", "model.middle_blocks=1", "model.towers=4",
        "train.device=cuda", "resources.gpus=1"])  # fmt: skip
    record = tmp_path / "records" / "t0.json"
    record.parent.mkdir()
    loop = {"config": config.to_dict(cfg), "seed": 0, "trial_id": "t0",
            "point": {"model.towers": 4}, "origin": {}, "record_path": str(record)}  # fmt: skip
    scaling = train.ScalingConfig(num_workers=1, use_gpu=True)
    run = train.RunConfig(storage_path=str(tmp_path / "ray"))
    trainer = TorchTrainer(_train_worker, train_loop_config=loop, scaling_config=scaling,
                           torch_config=TorchConfig(backend="nccl"), run_config=run)  # fmt: skip
    outcome = trainer.fit()
    assert outcome.error is None
    saved = results.read_record(record)
    assert saved["status"] == "finished" and saved["epochs_run"] == 1
    assert saved["peak_memory_mb"] > 0


def test_the_tensor_resident_data_path_batches_on_the_gpu_as_on_the_cpu():
    cpu, gpu = _digits("cpu"), _digits("cuda")
    assert gpu.train.images.device.type == "cuda"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = next(cpu.train.batches(64, shuffle=True, train=True, generator=g1))
    b = next(gpu.train.batches(64, shuffle=True, train=True, generator=g2))
    assert b[0].device.type == "cuda" and b[1].device.type == "cuda"
    torch.testing.assert_close(b[0].cpu(), a[0])
    torch.testing.assert_close(b[1].cpu(), a[1])


def test_streamed_image_folders_use_pinned_memory_and_arrive_on_the_gpu(tmp_path):
    tree = write_tree(tmp_path / "tree")
    cfg = datasets.DataConfig(name="imagefolder", root=str(tree), image_size=32, stream="always")
    gpu, cpu = datasets.load(cfg, device="cuda", num_workers=1), datasets.load(cfg, num_workers=1)
    loader = gpu.val.loader(5, False, None, False)
    assert loader.pin_memory
    (x, y), (x_cpu, y_cpu) = next(gpu.val.batches(5, shuffle=False)), next(
        cpu.val.batches(5, shuffle=False))  # fmt: skip
    assert x.device.type == "cuda" and y.device.type == "cuda"
    torch.testing.assert_close(x.cpu(), x_cpu)
    torch.testing.assert_close(y.cpu(), y_cpu)


def test_each_trial_peak_is_its_own_and_memory_is_released_between_trials():
    device = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    before = memory.now_mb(device)
    peaks, held = [], []
    for width in (0.5, 0.125):  # a large trial, then a small one in the same process
        recipe = dataclasses.replace(CFG, device="cuda", batch_size=128)
        model = xception(width=width, middle_blocks=1, stem="small", num_classes=10, in_chans=1,
                         towers=4, input_size=16)  # fmt: skip
        trainer = Trainer(model, _digits("cuda"), recipe)
        peaks.append(next(trainer.epochs())["peak_memory_mb"])
        del trainer, model
        gc.collect()
        torch.cuda.empty_cache()  # as the trainable does after every trial
        held.append(memory.now_mb(device))
    # what stays is per process (cuBLAS's workspace, at most 32 MiB), not per trial
    assert held[0] - before < 64 and held[1] <= held[0] + 1
    assert peaks[1] < 0.5 * peaks[0]  # the small trial's peak is not the large one's


def _spans_overlap(sweep_dir: Path) -> int:
    from towerspace.progress import most_at_once, trial_spans

    return most_at_once(trial_spans(results.read_records(sweep_dir)).values())


def test_four_trials_share_one_gpu_and_an_out_of_memory_trial_harms_none(local_ray, tmp_path):
    from towerspace.sweep import run_sweep

    sets = ("data.name=synthetic", "data.num_samples=4096", "data.image_size=32",
            "model.width=0.25", "model.middle_blocks=2", "train.epochs=3", "train.batch_size=16",
            "train.device=cuda", "resources.gpus=0.25", "resources.cpus=1", "seeds=[0]",
            "space.params={model.towers: {grid: [1, 2, 4, depthwise]}}",
            "faults={kind: oom, epoch: 2, times: 1, point: {model.towers: 2}}")  # fmt: skip
    cfg = config.load_experiment(REPO / "experiments/digits_continuum.yaml", sets)
    outcome = run_sweep(cfg, storage=tmp_path)
    assert outcome.statuses == {"finished": 3, "error": 1}
    table = results.load(outcome.results_path).set_index("towers")
    assert "out of memory" in table.loc["2", "error"].lower()
    assert (table.drop(index="2")["peak_memory_mb"] > 0).all()
    assert _spans_overlap(outcome.sweep_dir) >= 2  # packed: trials trained on the GPU at once
    for path in (outcome.sweep_dir / "records").glob("*.json"):
        assert json.loads(path.read_text())["config"]["resources"]["gpus"] == 0.25


def test_estimate_measures_steps_and_peak_memory_on_cuda(tmp_path):
    from towerspace.cli import main

    out = tmp_path / "estimate.csv"
    code = main(["estimate", str(REPO / "experiments/digits_continuum.yaml"), "--measure",
                 "--device", "cuda", "--out", str(out),
                 "--set", "space.params={model.towers: {grid: [1, depthwise]}}"])  # fmt: skip
    assert code == 0
    table = pd.read_csv(out)
    assert (table["images_per_s"] > 0).all() and (table["peak_memory_mb"] > 0).all()
