"""Tower sweeps on Ray Tune: the only package that imports Ray.

Modules, in the order a sweep uses them: preflight (checks before launch), state (the sweep's
folder, the resume check, Ray's saved state), cluster (Ray start-up and resources), tuner
(search space, searcher, scheduler, progress), launch (run_sweep), trainable (one trial, on
one process or data-parallel), checkpoints (a trial's on disk), disk (full disks).

Progress and DiskWatch are named here for unpickling, not for import: the tuner.pkl of a sweep
started while sweep was one module holds its callbacks as towerspace.sweep.Progress and
towerspace.sweep.DiskWatch, and --resume reads it.
"""

from towerspace.sweep.cluster import init_ray
from towerspace.sweep.disk import DiskWatch
from towerspace.sweep.launch import SweepOutcome, run_sweep
from towerspace.sweep.tuner import Progress

__all__ = ["DiskWatch", "Progress", "SweepOutcome", "init_ray", "run_sweep"]
