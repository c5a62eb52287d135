"""towerspace's training step against a minimal hand-written PyTorch loop: same model, batch, data.

Both run the same optimizer steps on the same tensor-resident batches; steps alternate in blocks
(A, B, A, B, ...) so machine noise hits both; the ratio of median step times is printed
(target <= 1.05).

    python benchmarks/trainer_overhead.py [--steps 20] [--rounds 5]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from towerspace.data import DataConfig, load
from towerspace.models import xception
from towerspace.train import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--towers", default="depthwise")
    args = parser.parse_args()
    data = load(DataConfig(name="synthetic", num_samples=4096, channels=3, image_size=32))
    kw = {"width": 0.25, "middle_blocks": 2, "stem": "small", "num_classes": 10}
    torch.manual_seed(0)
    ours = Trainer(xception(towers=args.towers, **kw), data,
                   TrainConfig(epochs=1, batch_size=64, max_steps=args.steps), seed=0)  # fmt: skip
    model = xception(towers=args.towers, **kw)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)  # fmt: skip
    g = torch.Generator().manual_seed(0)

    def bare() -> float:
        model.train()
        start = time.perf_counter()
        batches = data.train.batches(64, shuffle=True, generator=g, train=True)
        for _, (x, y) in zip(range(args.steps), batches, strict=False):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / args.steps

    def towerspace_step() -> float:
        start = time.perf_counter()
        ours.train_epoch()
        return (time.perf_counter() - start) / args.steps

    bare(), towerspace_step()  # warm-up
    a, b = [], []
    for _ in range(args.rounds):
        a.append(towerspace_step())
        b.append(bare())
    ratio = statistics.median(a) / statistics.median(b)
    print(
        f"Xception width 0.25, towers={args.towers}, batch 64 at 32x32, {torch.get_num_threads()}"
        f" threads, {args.rounds} rounds of {args.steps} steps"
    )
    print(
        f"towerspace Trainer: {1e3 * statistics.median(a):.1f} ms/step; hand-written loop: "
        f"{1e3 * statistics.median(b):.1f} ms/step; ratio {ratio:.3f} (target <= 1.05)"
    )


if __name__ == "__main__":
    main()
