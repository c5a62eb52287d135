"""A trial's epoch checkpoints on disk: its folder, its newest complete checkpoint, pruning."""

from __future__ import annotations

import contextlib
import shutil
import time
import zipfile
from pathlib import Path

from ray import tune

from towerspace.trial import CHECKPOINT

KEEP_CHECKPOINTS_S = 300.0  # a trial's checkpoints younger than this are never pruned


def trial_folder(sweep_dir: Path, trial_id: str) -> Path:
    """Where Tune persists a trial's checkpoints: <sweep>/run_trial_<trial id>_<point>_<time>.

    (The trial's context names its working directory, not this one.)
    """
    found = sorted(sweep_dir.glob(f"run_trial_{trial_id}_*"))
    return found[0] if found else sweep_dir / f"run_trial_{trial_id}"


def newest_checkpoint(known: tune.Checkpoint | None, trial_dir: Path) -> tune.Checkpoint | None:
    """The newest complete epoch checkpoint of a trial: Ray's, or a newer one in its folder.

    Ray saves the experiment's state on a timer, so after a hard kill it can know an older
    checkpoint of a trial, or none, while the trial had already persisted newer ones: without
    this the trial would repeat epochs, or start over.
    """
    found = sorted(trial_dir.glob("checkpoint_*"), reverse=True)
    complete = [d for d in found if _complete(d / CHECKPOINT)]
    if not complete:
        return known
    if known is not None and Path(known.path).name >= complete[0].name:
        return known
    return tune.Checkpoint.from_directory(str(complete[0]))


def _complete(path: Path) -> bool:
    """Whether a checkpoint file was written to the end (torch.save writes a zip archive, whose
    directory comes last: a copy cut short by a kill has none)."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def prune(trial_dir: Path, keep: int = 2, keep_s: float = KEEP_CHECKPOINTS_S) -> None:
    """Delete a trial's old checkpoints: all but the newest `keep`, and none younger than keep_s
    seconds (Ray's saved state, behind by up to its save period, may still name them)."""
    old = sorted(trial_dir.glob("checkpoint_*"), reverse=True)[keep:]
    now = time.time()
    for folder in old:
        with contextlib.suppress(OSError):
            if now - folder.stat().st_mtime > keep_s:
                shutil.rmtree(folder)
