"""towerspace: sweep convolutions from regular to depthwise separable, one tower count at a time.

Names are imported when first used, so `import towerspace.block` and `towerspace --help` load
neither torchvision, pandas, matplotlib nor Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from towerspace.block import (  # noqa: F401
        Complexity,
        TowerConv2d,
        regroup_weight,
        tower_complexity,
    )
    from towerspace.models.towerize import towerize  # noqa: F401

__version__ = "0.1.0"
_WHERE = {
    "Complexity": "towerspace.block",
    "TowerConv2d": "towerspace.block",
    "regroup_weight": "towerspace.block",
    "tower_complexity": "towerspace.block",
    "towerize": "towerspace.models.towerize",
}
__all__ = ["__version__", *_WHERE]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'towerspace' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
