"""Is a recipe worth comparing tower counts with? Learning curves side by side in one run.

The demo's network (Xception, width 0.25, 2 middle blocks, parameter-matched) at 1 tower and at
depthwise, trained by towerspace's Trainer with each recipe below, against a 20-line PyTorch CNN
trained with Adam for the same epochs, on the demo's digits and on held-out real data (the MNIST
test set from ../shared/data, split 80/20, at the demo's 16 px). Prints validation accuracy per
epoch per run, and each run's final accuracy against the bare CNN's.

    python benchmarks/recipe.py [--epochs 2] [--data digits mnist] [--recipes demo adamw]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from towerspace import data as datasets
from towerspace.models import xception
from towerspace.train import TrainConfig, Trainer

MNIST = Path(__file__).resolve().parent.parent.parent / "shared/data/mnist-t10k"
DEMO_MODEL = {"width": 0.25, "middle_blocks": 2, "stem": "small", "num_classes": 10,
              "in_chans": 1, "match": "params", "input_size": 16}  # fmt: skip
BASE = {"schedule": "cosine", "label_smoothing": 0.1, "device": "cpu", "weight_decay": 5e-4}
RECIPES = {
    # the demo's recipe until 2026-12: 12 steps an epoch on digits, no warm-up
    "before": TrainConfig(**BASE, batch_size=128, optimizer="sgd", lr=0.1),
    # the demo's recipe now (experiments/digits_continuum.yaml)
    "demo": TrainConfig(**BASE, batch_size=32, optimizer="sgd", lr=0.05, warmup_epochs=0.5),
    "adamw": TrainConfig(
        **{**BASE, "weight_decay": 0.05},
        batch_size=32,
        optimizer="adamw",
        lr=2e-3,
        warmup_epochs=0.5,
    ),
}


def mnist_t10k() -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test set (10,000 images) as uint8 images and labels, from the IDX files."""
    with gzip.open(MNIST / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def bundle(name: str) -> datasets.DataBundle:
    """The demo's digits (its own split), or MNIST's test set split 80/20, at 16 px."""
    if name == "digits":
        return datasets.load(datasets.DataConfig(name="digits", image_size=16), num_workers=0)
    images, labels = mnist_t10k()
    cfg = datasets.DataConfig(name="mnist", image_size=16)
    return datasets._from_tensors(cfg, images, labels, 10)  # the same split and normalising


class BareCNN(nn.Module):
    """The 20-line baseline: two conv-ReLU-pool stages and two linear layers."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64 * 4 * 4, 128), nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def bare_cnn(data: datasets.DataBundle, epochs: int, seed: int, batch: int) -> list[float]:
    """The baseline with Adam (lr 1e-3), as a plain PyTorch loop: accuracy per epoch."""
    torch.manual_seed(seed)
    model, g = BareCNN(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    curve = []
    for _ in range(epochs):
        model.train()
        for x, y in data.train.batches(batch, shuffle=True, generator=g):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            right = sum(
                int((model(x).argmax(1) == y).sum())
                for x, y in data.val.batches(512, shuffle=False)
            )
        curve.append(right / len(data.val))
    return curve


def towerspace_run(data, towers, recipe: TrainConfig, epochs: int, seed: int) -> list[float]:
    """The demo's model at a tower count, trained by towerspace: accuracy per epoch."""
    torch.manual_seed(seed)
    model = xception(towers=towers, **DEMO_MODEL)
    trainer = Trainer(model, data, dataclasses.replace(recipe, epochs=epochs), seed=seed)
    return [metrics["val_acc"] for metrics in trainer.epochs()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data", nargs="+", default=["digits", "mnist"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--towers", nargs="+", default=["1", "depthwise"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.data:
        data = bundle(name)
        base = [0.0]
        for batch in (128, 32):  # the better of the two is the bar
            start = time.perf_counter()
            curve = bare_cnn(data, args.epochs, args.seed, batch)
            print(f"{name}: bare CNN, Adam, batch {batch:>3}  {' '.join(f'{a:.4f}' for a in curve)}"
                  f"  ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
            base = curve if curve[-1] > base[-1] else base
        for recipe in args.recipes:
            for towers in args.towers:
                start = time.perf_counter()
                spec = int(towers) if towers.isdigit() else towers
                curve = towerspace_run(data, spec, RECIPES[recipe], args.epochs, args.seed)
                print(f"{name}: {recipe:>8} {towers:>9}  {' '.join(f'{a:.4f}' for a in curve)}  "
                      f"final - bare {curve[-1] - base[-1]:+.4f}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
