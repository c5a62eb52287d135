"""Block speed per tower count: auto's choice against the fastest candidate, and monotonicity.

For each layer shape, every candidate implementation is timed at every tower count (powers of 2
and depthwise; batch 32, forward+backward, interleaved repeats, medians). Two ratios per point:
- choice: time of the implementation impl='auto' picks (by its own, separate measurement) over
  the fastest candidate's time in this run (target <= 1.10);
- monotonicity: the chosen time at k towers over the best chosen time at any k' < k (target
  <= 1.10: more towers is never meaningfully slower than fewer);
- roof efficiency of the chosen implementation: its FLOPs at the machine's measured dense-conv
  rate, or its bytes at the measured copy bandwidth, whichever is longer, over its time (target
  >= 0.5).

    python benchmarks/block_speed.py                      # C 128 256 728 x H 8 16 32 (slow)
    python benchmarks/block_speed.py --channels 128 256 --sizes 8 16 --repeats 3
"""

import argparse

import pandas as pd
import torch

from towerspace.profile import auto_choices, block_speed, machine_roofs, with_roof_efficiency


def powers_of_two(channels: int) -> list[int]:
    counts = [2**i for i in range(channels.bit_length()) if channels % 2**i == 0]
    return sorted({*counts, channels})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[128, 256, 728])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"forward+backward, float32, NCHW input")  # fmt: skip
    roofs = machine_roofs()
    print(f"roofs: dense 3x3 conv {roofs['dense_conv_gflops_per_s']:.1f} GFLOP/s, copy "
          f"{roofs['bandwidth_gb_per_s']:.1f} GB/s")  # fmt: skip
    rows = []
    for channels in args.channels:
        for size in args.sizes:
            towers = powers_of_two(channels)
            picks = auto_choices(channels, size, batch=args.batch, towers=towers)
            table = block_speed(channels, size, batch=args.batch, towers=towers,
                                repeats=args.repeats)  # fmt: skip
            table = with_roof_efficiency(table, roofs)
            best_so_far = float("inf")
            for t in towers:
                here = table[table["towers"] == t].set_index("impl")
                at = here["time_ms"]
                chosen = at.get(picks[t], float("nan"))
                roof = here["roof_efficiency"].get(picks[t], float("nan"))
                rows.append({"C": channels, "HW": size, "towers": t, "native_ms": at["native"],
                             "auto": picks[t], "auto_ms": chosen, "fastest": at.idxmin(),
                             "fastest_ms": at.min(), "choice_ratio": chosen / at.min(),
                             "monotonicity": chosen / best_so_far if t > 1 else 1.0,
                             "roof_eff": roof})  # fmt: skip
                best_so_far = min(best_so_far, chosen)
            print(pd.DataFrame([r for r in rows if r["C"] == channels and r["HW"] == size])
                  .round(3).to_string(index=False), flush=True)  # fmt: skip
    df = pd.DataFrame(rows)
    worst_choice = df.loc[df["choice_ratio"].idxmax()]
    worst_mono = df.loc[df["monotonicity"].idxmax()]
    native_mono = []
    for (_c, _h), g in df.groupby(["C", "HW"]):
        best = float("inf")
        for _, r in g.iterrows():
            native_mono.append(r["native_ms"] / best if best < float("inf") else 1.0)
            best = min(best, r["native_ms"])
    print(
        f"\nworst choice ratio: {worst_choice['choice_ratio']:.3f} (target <= 1.10) at "
        f"C={worst_choice['C']} HW={worst_choice['HW']} towers={worst_choice['towers']}"
    )
    print(
        f"worst monotonicity with auto: {worst_mono['monotonicity']:.3f} (target <= 1.10) at "
        f"C={worst_mono['C']} HW={worst_mono['HW']} towers={worst_mono['towers']}"
    )
    print(f"worst monotonicity with native only: {max(native_mono):.3f}")
    worst_roof = df.loc[df["roof_eff"].idxmin()]
    print(f"lowest roof efficiency with auto: {worst_roof['roof_eff']:.3f} (target >= 0.5) at "
          f"C={worst_roof['C']} HW={worst_roof['HW']} towers={worst_roof['towers']}; median "
          f"{df['roof_eff'].median():.3f}")  # fmt: skip
    print(
        f"points at or under 1.10: choice {(df['choice_ratio'] <= 1.10).mean():.0%}, "
        f"monotonicity {(df['monotonicity'] <= 1.10).mean():.0%} of {len(df)}"
    )


if __name__ == "__main__":
    main()
