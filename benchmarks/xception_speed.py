"""Training throughput of towerspace's Xception against timm's legacy_xception (the same
architecture) and torchvision's ResNet-50, measured side by side in one run.

Each model trains through towerspace's Trainer (SGD, the recipe's autocast and layout) on random
images held on the device; rounds visit every model in turn (interleaved), and the median round
counts. Two ratios:
- towerspace depthwise Xception / timm legacy_xception (target >= 1.2);
- Xception / ResNet-50 (target >= 0.5 on a GPU; timm's published RTX 3090 AMP channels_last
  figures give 0.41).

    python benchmarks/xception_speed.py                        # CPU: 299 px, batch 8
    python benchmarks/xception_speed.py --device cuda --batch 64 --amp bf16 --channels-last on
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from towerspace.data import DataSizes
from towerspace.estimate import time_steps
from towerspace.models import xception
from towerspace.train import TrainConfig


def models(size: int, impls: list[str]) -> dict[str, nn.Module]:
    """The contenders at ImageNet shape (1000 classes), fresh weights."""
    import timm
    import torchvision

    found = {
        f"towerspace depthwise ({impl})": xception(towers="depthwise", input_size=size, impl=impl)
        for impl in impls
    }
    found["timm legacy_xception"] = timm.create_model("legacy_xception", pretrained=False)
    found["torchvision resnet50"] = torchvision.models.resnet50()
    return found


def compare(
    size: int = 299,
    batch: int = 8,
    device: str = "cpu",
    amp: str = "none",
    channels_last: str = "off",
    rounds: int = 3,
    steps: int = 2,
    impls: tuple = ("auto",),
) -> list[dict]:
    """One row per model: median images/s over interleaved rounds, and peak memory on CUDA."""
    recipe = TrainConfig(batch_size=batch, lr=0.01, amp=amp, channels_last=channels_last)
    sizes = DataSizes(batch, 0, 1000, 3, size)
    built = models(size, list(impls))
    rates: dict[str, list[float]] = {name: [] for name in built}
    peaks: dict[str, float] = {}
    for _ in range(rounds):
        for name, model in built.items():
            measured = time_steps(model, recipe, batch, sizes, device, timed=steps)
            rates[name].append(measured["images_per_s"])
            if "peak_memory_mb" in measured:  # CUDA only
                peaks[name] = max(peaks.get(name, 0.0), measured["peak_memory_mb"])
    return [
        {
            "model": name,
            "images_per_s": statistics.median(r),
            "spread": max(r) / min(r),
            "peak_memory_mb": peaks.get(name, float("nan")),
            "params": sum(p.numel() for p in built[name].parameters()),
        }
        for name, r in rates.items()
    ]


def ratios(rows: list[dict]) -> dict[str, float]:
    """towerspace / timm and Xception / ResNet-50 (the best towerspace row)."""
    rate = {r["model"]: r["images_per_s"] for r in rows}
    ours = max(v for k, v in rate.items() if k.startswith("towerspace"))
    return {
        "towerspace_over_timm": ours / rate["timm legacy_xception"],
        "xception_over_resnet50": ours / rate["torchvision resnet50"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--channels-last", choices=("on", "off"), default="off")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--impls", nargs="+", default=["auto", "native"])
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
        f"{args.size} px, batch {args.batch}, amp {args.amp}, channels_last "
        f"{args.channels_last}; training steps (SGD), {args.rounds} interleaved rounds"
    )
    rows = compare(
        args.size,
        args.batch,
        args.device,
        args.amp,
        args.channels_last,
        args.rounds,
        args.steps,
        tuple(args.impls),
    )
    for r in rows:
        print(
            f"{r['model']:32s} {r['images_per_s']:8.2f} images/s (spread {r['spread']:.2f}), "
            f"{r['params'] / 1e6:.2f} M params, peak {r['peak_memory_mb']:.0f} MiB"
        )
    found = ratios(rows)
    print(f"towerspace / timm legacy_xception: {found['towerspace_over_timm']:.3f} (target >= 1.2)")
    print(f"Xception / ResNet-50: {found['xception_over_resnet50']:.3f} (target >= 0.5 on a GPU)")


if __name__ == "__main__":
    main()
