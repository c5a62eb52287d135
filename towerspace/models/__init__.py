"""Architectures built from TowerConv2d (most names imported when first used: see towerspace)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# eager (torch only): the functions `xception` and `towerize` must shadow the submodules of
# the same names
from towerspace.models.cost import complexity
from towerspace.models.towerize import towerize
from towerspace.models.xception import Xception, xception, xception_complexity

if TYPE_CHECKING:
    from towerspace.models.build import ModelConfig, build_model  # noqa: F401

_WHERE = {
    "ModelConfig": "towerspace.models.build",
    "build_model": "towerspace.models.build",
}
__all__ = ["Xception", "complexity", "towerize", "xception", "xception_complexity", *_WHERE]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'towerspace.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
