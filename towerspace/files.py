"""Files written whole or not at all (a temporary file beside the target, renamed over it, never
written through a link, removed again if the write fails), writable-folder probes, and paths
shown as a user would type them."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from towerspace.errors import StorageError


def check_target(path: Path, root: Path) -> None:
    """Refuse a target outside root, or one reached through a link (a folder or the file)."""
    root = Path(root)
    path = Path(path)
    if not path.absolute().is_relative_to(root.absolute()):
        raise StorageError(f"{path}: not written: it lies outside {root}")
    node = root.absolute()
    for part in path.absolute().relative_to(node).parts:
        node = node / part
        if node.is_symlink():
            raise StorageError(f"{node}: not written: it is a link (nothing in {root} is "
                               f"written through a link)")  # fmt: skip
        if node.exists() and node != path.absolute() and not node.is_dir():
            raise StorageError(f"{node}: not written: it is not a folder")
    if path.exists() and not path.is_file():
        raise StorageError(f"{path}: not written: it is not a regular file")


def write_atomic(path: Path, write: Callable[[Path], None], *, root: Path | None = None) -> Path:
    """Write path through write(tmp): readers see the old file or the new one, never a part.

    The target is checked first (check_target) under root, by default its own folder. The
    temporary file is made with mkstemp (a new name, never a planted one) and renamed over
    path; if write or the rename fails, it is removed and the error raised.
    """
    path = Path(path)
    check_target(path, path.parent if root is None else root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_text(path: Path, text: str, *, root: Path | None = None) -> Path:
    """Write a text file atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text), root=root)


def write_json(
    path: Path, payload: Mapping[str, Any], *, root: Path | None = None, sort_keys: bool = False
) -> Path:
    """Write JSON atomically (default=str for paths and other plain values)."""
    text = json.dumps(payload, indent=1, default=str, sort_keys=sort_keys)
    return write_text(path, text, root=root)


def writable(folder: Path) -> bool:
    """Whether files can be made in folder (tried for real: root ignores permission bits)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".probe.", suffix=".tmp")
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return True


def shown(path: Path) -> Path:
    """A path as a user would type it: relative to the working directory when below it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd())
    except ValueError:
        return Path(path)
