"""Your own network on the tower continuum: a small CNN built from TowerConv2d, swept over towers.

    python examples/custom_architecture.py            # 4 points x 1 seed on digits, ~1-2 minutes
    python examples/custom_architecture.py --smoke    # the plumbing only, in seconds

The sweep is an ordinary `towerspace sweep` experiment: `model.name: custom` and
`model.builder: examples/custom_architecture.py:build` (relative to the working directory).
towerize() re-towers every TowerConv2d of the built network to each point's tower count.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from torch import nn

from towerspace import TowerConv2d

# stage: output channels (at width 1.0), stride of its first block, blocks
STAGES = ((32, 1, 1), (64, 2, 2), (128, 2, 2))


def stage(in_channels: int, out_channels: int, stride: int, blocks: int) -> nn.Sequential:
    """Blocks of TowerConv2d → BatchNorm → ReLU; the towers are set later by towerize()."""
    layers = []
    for i in range(blocks):
        c_in = in_channels if i == 0 else out_channels
        layers += [TowerConv2d(c_in, out_channels, 3, stride if i == 0 else 1, towers="depthwise"),
                   nn.BatchNorm2d(out_channels), nn.ReLU()]  # fmt: skip
    return nn.Sequential(*layers)


def build(*, in_chans: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    """The network towerspace builds for a data set (the builder's keyword arguments)."""
    widths = [max(8, int(c * width + 4) // 8 * 8) for c, _, _ in STAGES]
    # a plain stem: towerize() leaves convs with fewer than 8 input channels alone
    layers = [nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
              nn.ReLU()]  # fmt: skip
    previous = widths[0]
    for channels, (_, stride, blocks) in zip(widths, STAGES, strict=True):
        layers.append(stage(previous, channels, stride, blocks))
        previous = channels
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, num_classes)]
    return nn.Sequential(*layers, *head)


def experiment(smoke: bool) -> list[str]:
    """The `towerspace sweep` arguments of this example."""
    builder = f"{os.path.relpath(Path(__file__).resolve())}:build"  # the sweep makes it absolute
    sets = [
        "name=custom_architecture", "model.name=custom", f"model.builder={builder}",
        "model.width=0.5", "data={name: digits, root: null, image_size: 16}", "seeds=[0]",
        "space.params={model.towers: {grid: [1, 4, 16, depthwise]}}",
        "train.epochs=4", "train.batch_size=64", "train.lr=0.05",
    ]  # fmt: skip
    return [arg for s in sets for arg in ("--set", s)] + (["--smoke"] if smoke else [])


def main(argv: list[str] | None = None) -> int:
    """Run the example's sweep through towerspace's own command line."""
    from towerspace.cli import main as towerspace_main

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the plumbing only, in seconds")
    parser.add_argument(
        "--storage", default=None, help="where the sweep goes (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    storage = args.storage or tempfile.mkdtemp(prefix="towerspace_custom_")
    base = Path(__file__).resolve().parent.parent / "experiments" / "digits_continuum.yaml"
    return towerspace_main(["sweep", str(base), *experiment(args.smoke), "--storage", storage,
                            "--restart"])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
