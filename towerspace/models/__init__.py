"""Architectures built from TowerConv2d."""

from towerspace.models.build import ModelConfig, build_model
from towerspace.models.towerize import complexity, towerize
from towerspace.models.xception import Xception, xception, xception_complexity

__all__ = [
    "ModelConfig",
    "Xception",
    "build_model",
    "complexity",
    "towerize",
    "xception",
    "xception_complexity",
]
