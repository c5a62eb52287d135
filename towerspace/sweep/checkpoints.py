"""A trial's epoch checkpoints on disk: its folder, its newest complete checkpoint, pruning."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from ray import tune

from towerspace.trial import CHECKPOINT, checkpoint_complete, trial_folder

__all__ = ["newest_checkpoint", "prune", "trial_folder"]  # trial_folder: from trial, for Ray's side

KEEP_CHECKPOINTS_S = 300.0  # a trial's checkpoints younger than this are never pruned


def newest_checkpoint(known: tune.Checkpoint | None, trial_dir: Path) -> tune.Checkpoint | None:
    """The newest complete epoch checkpoint of a trial: Ray's, or a newer one in its folder.

    Ray saves the experiment's state on a timer, so after a hard kill it can know an older
    checkpoint of a trial, or none, while the trial had already persisted newer ones: without
    this the trial would repeat epochs, or start over.
    """
    found = sorted(trial_dir.glob("checkpoint_*"), reverse=True)
    complete = [d for d in found if checkpoint_complete(d / CHECKPOINT)]
    if not complete:
        return known
    if known is not None and Path(known.path).name >= complete[0].name:
        return known
    return tune.Checkpoint.from_directory(str(complete[0]))


def prune(trial_dir: Path, keep: int = 2, keep_s: float = KEEP_CHECKPOINTS_S) -> None:
    """Delete a trial's old checkpoints: all but the newest `keep`, and none younger than keep_s
    seconds (Ray's saved state, behind by up to its save period, may still name them)."""
    old = sorted(trial_dir.glob("checkpoint_*"), reverse=True)[keep:]
    now = time.time()
    for folder in old:
        with contextlib.suppress(OSError):
            if now - folder.stat().st_mtime > keep_s:
                shutil.rmtree(folder)
