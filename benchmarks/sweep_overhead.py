"""A sweep of 8 short trials through Ray Tune on this machine's CPUs, against the same trials'
bare training time: wall / (sum of bare trial times / concurrency) (target <= 1.25).

The bare times run the same Trial (data, model, training, records) in this process, one after
another, without Ray. The sweep then runs them on a local Ray, 2 at a time on 2 CPUs.

    python benchmarks/sweep_overhead.py [--epochs 3]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from towerspace import config
from towerspace.sweep import init_ray, run_sweep
from towerspace.trial import Trial

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    grid = "space.params={model.towers: {grid: [1, 2, 4, depthwise]}}"
    sets = (f"train.epochs={args.epochs}", "model.width=0.125", "model.middle_blocks=1",
            "seeds=[0, 1]", grid)  # fmt: skip
    cfg = config.load_experiment(REPO / "experiments/digits_continuum.yaml", sets)
    points = [(t, s) for t in (1, 2, 4, "depthwise") for s in (0, 1)]
    torch.set_num_threads(1)  # as each trial gets: resources.cpus = 1
    bare = []
    with tempfile.TemporaryDirectory() as tmp:
        for towers, seed in points:
            start = time.perf_counter()
            trial = Trial(config.apply(cfg, {"model.towers": towers}), seed=seed, trial_id="x",
                          point={}, record_path=Path(tmp) / "x.json")  # fmt: skip
            for _ in trial.epochs():
                pass
            bare.append(time.perf_counter() - start)
        init_ray(None)
        concurrency = 2
        start = time.perf_counter()
        outcome = run_sweep(cfg, storage=Path(tmp))
        wall = time.perf_counter() - start
    ideal = sum(bare) / concurrency
    print(
        f"{len(points)} trials, bare {min(bare):.1f}-{max(bare):.1f} s each "
        f"(sum {sum(bare):.1f} s), concurrency {concurrency}: ideal {ideal:.1f} s"
    )
    print(
        f"Ray Tune sweep wall time {wall:.1f} s ({outcome.statuses}); "
        f"ratio {wall / ideal:.2f} (target <= 1.25)"
    )


if __name__ == "__main__":
    main()
