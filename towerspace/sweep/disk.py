"""Full disks: the space reserve a sweep holds while its trials run, and the watch that stops it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

from ray import tune

from towerspace import results
from towerspace import storage as storage_lib
from towerspace.errors import DiskFull
from towerspace.files import shown
from towerspace.status import Status

DISK_RESERVE = 4 * 2**20  # bytes (at most 5% of the disk): with less free a sweep stops
RESERVE = ".space_reserve"  # a file held while trials run, removed to close a sweep on a full disk
RESERVE_BYTES = 2**20


def disk_full_error(sweep_dir: Path) -> DiskFull:
    """The error a sweep stopped by a full disk ends with: what was kept, and how to resume."""
    return DiskFull(f"{sweep_dir}: no space left on device; the sweep stopped and kept what "
                    f"was on disk (unfinished trials are resumable): free space, then run the "
                    f"same command with --resume")  # fmt: skip


def no_space(folder: Path) -> bool:
    """Whether the disk of a folder (or of its nearest existing parent) is all but full."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return False
    return usage.free < min(DISK_RESERVE, 0.05 * usage.total)


def reserve_space(sweep_dir: Path) -> Path:
    """A file of RESERVE_BYTES held while trials run: when the disk fills up, DiskWatch removes
    it, and its space takes Ray's last state save, the closing records and the tables."""
    path = sweep_dir / RESERVE
    try:
        with open(path, "wb") as file:  # zeros written, not a sparse file: real blocks
            file.write(bytes(RESERVE_BYTES))
    except OSError as err:
        path.unlink(missing_ok=True)
        if storage_lib.disk_full(err):
            raise disk_full_error(sweep_dir) from None
        raise storage_lib.storage_error(sweep_dir, err, "cannot write the sweep there") from None
    return path


def stopped_by_full_disk(records_dir: Path) -> bool:
    """Whether a trial of the sweep ended on a full disk (a resume retries those)."""
    for path in records_dir.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            record = results.read_record(path)
            if record.get("status") == Status.ERROR and storage_lib.disk_full_text(
                record.get("error")
            ):
                return True
    return False


class DiskWatch(tune.Callback):
    """Stops the sweep as Ctrl-C does (trials stay resumable, nothing new starts) when its
    storage fills up: free space below DISK_RESERVE, or a trial failing with ENOSPC."""

    def __init__(self, folder: Path, every_s: float = 2.0) -> None:
        self.folder, self.every_s, self.full, self.last = folder, every_s, False, 0.0

    def _stop(self) -> None:
        if self.full:
            return
        self.full = True
        # its space takes Ray's last state save and the closing records; trials see it gone
        # and write no more checkpoints
        (self.folder / RESERVE).unlink(missing_ok=True)
        print(f"{shown(self.folder)}: no space left on device: stopping the sweep (unfinished "
              f"trials stay resumable)", flush=True)  # fmt: skip
        if callable(signal.getsignal(signal.SIGUSR1)):  # Tune's stop handler (main thread)
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            if no_space(self.folder):
                self._stop()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        if storage_lib.disk_full_text(str(trial.get_error())) or no_space(self.folder):
            self._stop()
