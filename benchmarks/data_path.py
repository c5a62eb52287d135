"""One epoch of CIFAR-shaped training data: tensor-resident batched augmentation against a
per-image torchvision DataLoader with 2 workers (random crop + flip + normalise in both).

    python benchmarks/data_path.py [--images 50000] [--batch 128]
"""

import argparse
import time

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from towerspace.data import TensorBatches


class PerImage(torch.utils.data.Dataset):
    """CIFAR-style: uint8 HWC arrays, a PIL image and transforms per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                                     v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize([0.5] * 3, [0.25] * 3)])  # fmt: skip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def epoch_time(batches) -> float:
    start = time.perf_counter()
    n = sum(len(y) for _, y in batches)
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images)
    tensor = TensorBatches(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                           torch.from_numpy(labels), torch.full((3,), 0.5), torch.full((3,), 0.25),
                           "crop_flip")  # fmt: skip
    loader = torch.utils.data.DataLoader(PerImage(images, labels), batch_size=args.batch,
                                         shuffle=True, num_workers=2)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    times = {"tensor": [], "dataloader": []}
    for _ in range(2):  # alternate, so both see the same machine state
        t, n = epoch_time(tensor.batches(args.batch, shuffle=True, generator=g, train=True))
        times["tensor"].append(t)
        t, n2 = epoch_time(loader)
        times["dataloader"].append(t)
    tensor_s, loader_s = min(times["tensor"]), min(times["dataloader"])
    print(f"{args.images} CIFAR-shaped images, batch {args.batch}, random crop + flip + normalise")
    print(f"tensor-resident batched: {tensor_s:.2f} s/epoch ({n / tensor_s:,.0f} images/s)")
    print(f"DataLoader, 2 workers:   {loader_s:.2f} s/epoch ({n2 / loader_s:,.0f} images/s)")
    print(f"ratio (DataLoader / tensor-resident): {loader_s / tensor_s:.1f}x")


if __name__ == "__main__":
    main()
