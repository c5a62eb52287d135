"""The trainer: learns, reproduces and resumes exactly, follows its schedules, stops on NaN."""

import math
import time

import pytest
import torch
from torch import nn

from towerspace import memory
from towerspace.data import DataConfig, load
from towerspace.train import (
    Diverged,
    TrainConfig,
    Trainer,
    lr_factor,
    paper_imagenet,
)

KEYS = {"epoch", "train_loss", "val_loss", "val_acc", "val_top5", "lr", "epoch_time_s",
        "train_images_per_s", "data_wait_fraction", "peak_memory_mb", "ended_at"}  # fmt: skip


@pytest.fixture(scope="module")
def digits():
    return load(DataConfig(name="digits"))


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))  # fmt: skip


def _run(digits, epochs=2, **kw):
    trainer = Trainer(_net(), digits, TrainConfig(epochs=epochs, batch_size=64, **kw), seed=0)
    return trainer, list(trainer.epochs())


def test_learns_digits_and_reports_every_metric(digits):
    _, history = _run(digits, epochs=3, lr=0.2)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(set(h) == KEYS for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] > 0.5  # chance is 0.1
    assert all(0 <= h["val_acc"] <= h["val_top5"] <= 1 for h in history)
    ends = [h["ended_at"] for h in history]  # wall-clock: when trials overlapped in a sweep
    assert ends == sorted(ends) and ends[1] - ends[0] >= history[1]["epoch_time_s"] * 0.99


def test_same_seed_same_metrics(digits):
    measured = ("time", "per_s", "memory", "wait", "ended_at")  # the machine's, not the training's
    strip = lambda hs: [{k: v for k, v in h.items() if not any(m in k for m in measured)}  # noqa: E731
                        for h in hs]  # fmt: skip
    assert strip(_run(digits)[1]) == strip(_run(digits)[1])


def test_resume_from_state_equals_an_uninterrupted_run(digits):
    cfg = TrainConfig(epochs=2, batch_size=64)
    straight = Trainer(_net(), digits, cfg, seed=0)
    full = list(straight.epochs())
    first = Trainer(_net(), digits, cfg, seed=0)
    next(first.epochs())
    state = first.state_dict()
    resumed = Trainer(_net(seed=99), digits, cfg, seed=5)  # other init and seed: state wins
    resumed.load_state_dict(state)
    rest = list(resumed.epochs())
    assert [h["epoch"] for h in rest] == [2]
    assert rest[0]["val_loss"] == full[1]["val_loss"] and rest[0]["val_acc"] == full[1]["val_acc"]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)


def test_schedules():
    cos = TrainConfig(epochs=10, schedule="cosine")
    assert lr_factor(cos, 0, 10) == 1.0 and lr_factor(cos, 100, 10) == pytest.approx(0.0)
    assert lr_factor(cos, 50, 10) == pytest.approx(0.5)
    paper = paper_imagenet(epochs=10)
    assert (paper.lr, paper.momentum, paper.nesterov, paper.weight_decay) == (0.045, 0.9, False,
                                                                              1e-5)  # fmt: skip
    assert lr_factor(paper, 20, 10) == pytest.approx(0.94)  # 0.94 every 2 epochs
    assert lr_factor(paper, 40, 10) == pytest.approx(0.94**2)
    step = TrainConfig(schedule="step", decay_epochs=2, gamma=0.5)
    assert [lr_factor(step, s, 10) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]
    warm = TrainConfig(epochs=10, warmup_epochs=2)
    assert lr_factor(warm, 0, 10) == pytest.approx(0.1) and lr_factor(warm, 10, 10) == 0.55
    one = TrainConfig(epochs=10, schedule="onecycle")
    assert lr_factor(one, 30, 10) == pytest.approx(1.0) and lr_factor(one, 100, 10) == 1e-3


def test_a_nan_loss_stops_at_once(digits):
    class Explodes(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 10), math.nan, requires_grad=True)

    trainer = Trainer(Explodes(), digits, TrainConfig(epochs=2, optimizer="adamw"), seed=0)
    trainer.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    with pytest.raises(Diverged, match=r"^loss is nan at epoch 1, step 1$") as err:
        list(trainer.epochs())
    assert (err.value.epoch, err.value.step) == (1, 1)


def test_weight_decay_skips_biases_and_norms(digits):
    trainer, _ = _run(digits, epochs=1, max_steps=1)
    decayed, plain = trainer.optimizer.param_groups
    assert all(p.ndim > 1 for p in decayed["params"]) and decayed["weight_decay"] == 5e-4
    assert all(p.ndim == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0


def test_max_steps_caps_an_epoch(digits):
    trainer, history = _run(digits, epochs=1, max_steps=3)
    assert trainer.step == 3 and history[0]["epoch"] == 1


def test_cuda_is_refused_without_a_gpu(digits):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match=r"train\.device: 'cuda' was asked for but no CUDA"):
        Trainer(_net(), digits, TrainConfig(device="cuda"), seed=0)


def test_peak_memory_is_per_trial_on_the_cpu():
    cpu = torch.device("cpu")
    big = torch.ones(50_000_000)  # 200 MB held, then released: an earlier trial's peak
    del big
    before = memory.peak_mb(cpu)
    memory.reset_peak(cpu)
    after = memory.peak_mb(cpu)
    assert before - after > 150  # the earlier peak is gone
    held = torch.ones(25_000_000)  # 100 MB in this "trial"
    assert memory.peak_mb(cpu) - after > 90
    del held


class _SlowImages(torch.utils.data.Dataset):
    """Digits behind a data path that takes 20 ms an image: a starving loader."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        time.sleep(0.02)
        return self.images[i], self.labels[i]


def test_the_data_wait_tells_a_starving_loader_from_a_fast_one(digits):
    from towerspace.data import DataBundle, LoaderBatches

    _, history = _run(digits, epochs=1, max_steps=4)
    images = (digits.train.images[:256] * 255).to(torch.uint8)
    slow_set = _SlowImages(images, digits.train.labels[:256])
    slow = LoaderBatches(slow_set, num_workers=0, device=torch.device("cpu"), mean=(0.5,),
                         std=(0.5,))  # fmt: skip
    bundle = DataBundle("slow", slow, digits.val, 10, 1, digits.image_size)
    starved = Trainer(_net(), bundle, TrainConfig(epochs=1, batch_size=64, max_steps=4), seed=0)
    waited = next(starved.epochs())["data_wait_fraction"]
    assert 0.0 <= history[0]["data_wait_fraction"] < 0.5 < waited <= 1.0
