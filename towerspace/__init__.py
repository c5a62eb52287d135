"""towerspace: sweep convolutions from regular to depthwise separable, one tower count at a time."""

from towerspace.block import Complexity, TowerConv2d, regroup_weight, tower_complexity
from towerspace.models.towerize import towerize

__version__ = "0.1.0"
__all__ = [
    "Complexity",
    "TowerConv2d",
    "__version__",
    "regroup_weight",
    "tower_complexity",
    "towerize",
]
