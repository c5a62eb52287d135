"""A trial's epoch checkpoints on disk: its folder, its newest complete checkpoint, pruning."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from ray import tune

from towerspace.trial import CHECKPOINT, checkpoint_complete, trial_folder

# trial_folder: from trial, for Ray's side
__all__ = ["newest_checkpoint", "newest_on_store", "prune", "prune_on_store", "trial_folder"]

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


def _store_checkpoints(remote: str, trial_id: str):
    """(fs, [checkpoint folders, oldest first, each with its file's mtime]) of a trial on a
    store: Ray uploads each file as one whole object, so a folder holding the file is whole."""
    from pyarrow import fs

    from towerspace.objectstore import open_uri

    store, root = open_uri(remote)
    top = store.get_file_info(fs.FileSelector(root, allow_not_found=True))
    folders = sorted(i.path for i in top if i.base_name.startswith(f"run_trial_{trial_id}_"))
    if not folders:
        return store, []
    inside = store.get_file_info(fs.FileSelector(folders[0], recursive=True))
    found = sorted((i.path.rsplit("/", 1)[0], i.mtime) for i in inside
                   if i.base_name == CHECKPOINT and "/checkpoint_" in i.path)  # fmt: skip
    return store, found


def newest_on_store(known: tune.Checkpoint | None, remote: str, trial_id: str):
    """newest_checkpoint for a sweep on object storage: Ray's, or a newer one on the store."""
    store, found = _store_checkpoints(remote, trial_id)
    if not found:
        return known
    newest = found[-1][0]
    if known is not None and Path(known.path).name >= newest.rsplit("/", 1)[-1]:
        return known
    return tune.Checkpoint(path=newest, filesystem=store)


def prune_on_store(remote: str, trial_id: str, keep: int = 2,
                   keep_s: float = KEEP_CHECKPOINTS_S) -> None:  # fmt: skip
    """prune for a sweep on object storage (the trial's folder there)."""
    store, found = _store_checkpoints(remote, trial_id)
    now = time.time()
    for folder, mtime in found[: max(0, len(found) - keep)]:
        with contextlib.suppress(OSError):
            if mtime is not None and now - mtime.timestamp() > keep_s:
                store.delete_dir(folder)
