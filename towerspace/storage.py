"""A sweep's folder: its name checked as one path component, one driver at a time (an OS file
lock), and a restart that removes only what a towerspace sweep wrote."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

from towerspace.errors import StorageError, SweepLocked

EXPERIMENT_FILE = "experiment.json"  # the resolved config a sweep was started with
LOCK_FILE = "driver.lock"  # held (flock) by the driver using the folder; names it inside
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")  # one folder name, never . or ..


def sweep_folder(storage: Path, name: str) -> Path:
    """STORAGE/<name>, checked to be one folder inside storage that is not a link."""
    if not SAFE_NAME.match(name) or name in (".", ".."):
        raise StorageError(f"name: {name!r} is not allowed; a sweep name is one folder name: "
                           f"letters, digits, '_', '-' and '.', not starting with '.' or "
                           f"'-'")  # fmt: skip
    storage = Path(storage).resolve()
    folder = storage / name
    if folder.is_symlink():
        raise StorageError(f"{folder}: is a link; a sweep folder must be a real folder inside "
                           f"{storage}")  # fmt: skip
    if folder.resolve().parent != storage:
        raise StorageError(f"name: {name!r} leads outside the storage folder {storage}")
    return folder


def inside(root: Path, path: Path) -> Path:
    """path, resolved, after checking that it lies in root (refuse what would escape it)."""
    resolved, root = Path(path).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(root):
        raise StorageError(f"{path}: lies outside the sweep folder {root}; not touched")
    return resolved


def occupied(folder: Path) -> bool:
    """Whether a sweep folder holds anything besides its lock file."""
    return folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir())


def holder(folder: Path) -> dict[str, Any] | None:
    """Who holds a sweep's lock (pid, host, started), or None when no driver uses it.

    A probe: a shared lock taken and dropped at once; it never waits, and writes nothing.
    """
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(os.pread(fd, 4096, 0).decode())
        if isinstance(info, dict):
            return info
    return {}


def describe(info: dict[str, Any]) -> str:
    """A lock holder in words: 'pid 123 on host, started 2026-12-02 21:40:00 UTC'."""
    if not info:
        return "a driver that is still starting"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started "
            f"{info.get('started', '?')}")  # fmt: skip


def refuse_if_locked(folder: Path, what: str) -> None:
    """Refuse to act on a sweep folder that another driver is using."""
    info = holder(folder)
    if info is not None:
        raise SweepLocked(f"{what}: {folder} is in use by another driver ({describe(info)}); "
                          f"wait for it to end, or stop it first")  # fmt: skip


class DriverLock:
    """The sweep folder's lock, held for the driver's life: flock on LOCK_FILE, released by the
    kernel when the process ends, so a killed driver never leaves a stale lock behind.

    The folder (and the storage above it) is made if missing, and removed again if it holds only
    the lock when released (the driver stopped before writing anything).
    """

    def __init__(self, folder: Path, what: str = "sweep") -> None:
        self.folder, self.what, self.fd = Path(folder), what, None
        self.made: list[Path] = []  # folders made here, deepest first

    def __enter__(self) -> DriverLock:
        node = self.folder
        while not node.exists() and node != node.parent:
            self.made.append(node)
            node = node.parent
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            self._tidy()
            raise storage_error(self.folder, err, "cannot lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_holder(fd)
            os.close(fd)
            raise SweepLocked(f"{self.what}: {self.folder} is in use by another driver "
                              f"({describe(info)}); wait for it to end, or stop it "
                              f"first") from None  # fmt: skip
        self.fd = fd
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": now}
        with contextlib.suppress(OSError):  # a full disk: the lock holds, its note is empty
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            self._tidy()
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def _tidy(self) -> None:
        """Remove the folders made here (the storage's too) while they hold nothing but the
        lock: a driver that stopped before writing anything leaves nothing behind."""
        if not self.made or not self.folder.is_dir() or occupied(self.folder):
            return
        with contextlib.suppress(OSError):
            (self.folder / LOCK_FILE).unlink(missing_ok=True)
            for folder in self.made:
                folder.rmdir()  # stops at the first that is not empty


def check_clearable(folder: Path) -> None:
    """--restart: refuse a folder that holds no towerspace sweep (nothing is removed)."""
    if not (folder / EXPERIMENT_FILE).is_file():
        raise StorageError(f"--restart: {folder} holds no towerspace sweep (no "
                           f"{EXPERIMENT_FILE}); nothing removed: remove it yourself, or choose "
                           f"another name or --storage")  # fmt: skip


def clear(folder: Path) -> list[str]:
    """--restart: remove a sweep's contents (not its lock), refusing a folder that holds no
    towerspace sweep; returns the names removed. Links are removed, never followed."""
    check_clearable(folder)
    removed = []
    for entry in sorted(folder.iterdir()):
        if entry.name == LOCK_FILE:
            continue
        inside(folder, entry.parent)  # the folder itself, never what a link points at
        label = entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else "")
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as err:
            raise storage_error(folder, err, "--restart: cannot remove " + entry.name) from None
        removed.append(label)
    return removed


def storage_error(folder: Path, err: OSError, what: str) -> StorageError:
    """An OSError on a sweep's storage in one line (a full disk as DiskFull)."""
    from towerspace.errors import DiskFull

    if err.errno == errno.ENOSPC:
        return DiskFull(f"{folder}: no space left on device ({what})")
    return StorageError(f"{folder}: {what} ({err.strerror or err})")


NO_SPACE = "no space left on device"


def disk_full_text(text: str | None) -> bool:
    """Whether an error message is a full disk's (ENOSPC or a quota)."""
    return bool(text) and any(s in text.lower() for s in (NO_SPACE, "disk quota exceeded"))


def disk_full(err: BaseException | None) -> bool:
    """Whether an exception, or one in its chain, is ENOSPC (a full disk or quota)."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if disk_full_text(str(err)):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False
