"""How well the layer-time table (towerspace.latency) stands for whole training steps.

For the demo network at every tower count of the continuum (parameter-matched), side by side in
one run: the sum of its layers' times (each distinct layer timed once, the table shared across
the points) and the measured time of whole training steps (towerspace's Trainer). Prints the
ratio sum/step per point, the Spearman rank correlation of the two over the points, and how many
layer signatures were timed for all points together against the layers they stand for.

    python benchmarks/latency_table.py [--threads 1] [--batch 128]
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy import stats

from towerspace.data import DataSizes
from towerspace.estimate import time_steps
from towerspace.latency import LatencyTable, model_latency, units
from towerspace.models import xception
from towerspace.train import TrainConfig

TOWERS = (1, 2, 4, 8, 16, 32, "depthwise")
DEMO = {"width": 0.25, "middle_blocks": 2, "stem": "small", "num_classes": 10, "in_chans": 1,
        "match": "params", "input_size": 16}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=128, help="the demo's batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table, layers, rows = LatencyTable(), 0, []
    start = time.perf_counter()
    for towers in TOWERS:
        torch.manual_seed(0)
        model = xception(towers=towers, **DEMO)
        layers += len(units(model))
        summed = model_latency(model, torch.randn(args.batch, 1, 16, 16), table=table).ms
        rate = time_steps(model, TrainConfig(device="cpu"), args.batch,
                          DataSizes(args.batch, 0, 10, 1, 16), "cpu", timed=5)  # fmt: skip
        step = args.batch / rate["images_per_s"] * 1e3
        rows.append((str(towers), summed, step))
        print(
            f"towers {towers!s:>9}: layer sum {summed:7.1f} ms, step {step:7.1f} ms, "
            f"ratio {summed / step:.3f}",
            flush=True,
        )
    rho = stats.spearmanr([r[1] for r in rows], [r[2] for r in rows]).statistic
    ratios = [r[1] / r[2] for r in rows]
    print(f"ratio sum/step: {min(ratios):.3f} to {max(ratios):.3f}; Spearman rank correlation "
          f"{rho:.3f} over {len(rows)} points")  # fmt: skip
    print(f"layer signatures timed: {table.measured} for {layers} layers over the points "
          f"({time.perf_counter() - start:.0f} s in all)")  # fmt: skip


if __name__ == "__main__":
    main()
