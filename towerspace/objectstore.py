"""Sweeps on object storage (s3://, gs://, hdfs://, file://) through pyarrow.fs: a staging copy
of the sweep's own files in Ray's temporary folder, synced as whole objects, and the driver's
lease (object stores have no file locks).

Ray Tune keeps its state and the trials' checkpoints on the URI itself (its storage_path);
towerspace's files (records, experiment.json, tables, figures, the Optuna journal, impl choices)
are written in the staging copy by the code that writes a local sweep, and uploaded from it:
by the driver every few seconds and at the end, and by each trial whenever its record changes,
from whichever node it runs on.

The lease: each driver puts a candidate object under `<sweep>/driver.lock/`, waits SETTLE_S and
lists them again; it goes on only if no other candidate holds the sweep and its own is the
oldest of those claiming it, then renews it every LEASE_S / 4. Safe where the store lists what
was just written (S3 since 2020, GCS) and clocks agree within seconds. Not guarded against: a
driver paused longer than LEASE_S (a suspended laptop) while another takes over, whose late
writes then land beside the new driver's (there is no fencing token), and stores whose listings
lag their writes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from towerspace.errors import StorageError, SweepLocked

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # s3://, gs://, hdfs://, file:/ ...
LEASE = "driver.lock"  # the folder of lease candidates in the sweep's prefix
LEASE_S, SETTLE_S = 60.0, 2.0
SYNC_EVERY_S = 10.0  # the driver uploads what changed at most this often while trials run
RAY_OWNED = re.compile(r"^(run_trial_|train_runs$|driver_artifacts$)")  # Ray's, on the URI only
NOT_SYNCED = re.compile(r"(^|/)(\.[^/]*\.tmp|\.space_reserve|.*\.lock|driver\.lock(/.*)?)$")


def is_uri(text: str | os.PathLike) -> bool:
    """Whether a storage is a URI (s3://, gs://, hdfs://, file://) rather than a folder."""
    return bool(URI.match(str(text)))


def ray_temp() -> Path:
    """Ray's temporary folder on this node ($RAY_TMPDIR or the system's, then 'ray')."""
    return Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"


def open_uri(uri: str, what: str | None = None):
    """(pyarrow FileSystem, path in it) for a URI; credentials come from the environment
    (what: the argument it came from, for the error: '--storage s3://bucket/runs')."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as err:  # ArrowInvalid, OSError, ValueError: the same one line for users
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StorageError(f"{what or uri}: cannot open it ({first}); allowed: a folder, or "
                           f"a URI that pyarrow.fs opens (s3://, gs://, hdfs://, "
                           f"file://)") from None  # fmt: skip


def _put(filesystem, path: str, data: bytes) -> None:
    """One whole object: a single write, completed on close (a failed upload leaves none);
    on a local file system through a temporary name and a rename."""
    from pyarrow import fs

    if isinstance(filesystem, fs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
        return
    with filesystem.open_output_stream(path) as out:
        out.write(data)


def _get(filesystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


class SweepStore:
    """One sweep on object storage: STORAGE/<name> on the store, and its staging folder."""

    def __init__(self, uri: str, local: Path, what: str | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = open_uri(self.uri, what)
        self.root = self.root.rstrip("/")
        self.local = Path(local)
        self.seen_local: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) last synced
        self.seen_remote: dict[str, tuple[int, Any]] = {}  # rel -> (size, mtime) last synced
        self._last_push = 0.0
        self._guard = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # Ray pickles its callbacks: no fs, no lock
        return {"uri": self.uri, "local": self.local}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["local"])

    @classmethod
    def for_sweep(cls, storage: str, name: str) -> SweepStore:
        """The store of sweep `name` under a storage URI, staged in Ray's temporary folder."""
        uri = f"{storage.rstrip('/')}/{name}"
        digest = hashlib.sha1(uri.encode()).hexdigest()[:12]
        local = ray_temp() / "towerspace" / f"sweep-{digest}" / name
        return cls(uri, local, what=f"--storage {storage}")

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def remote_files(self) -> dict[str, tuple[int, Any]]:
        """towerspace's files under the sweep's prefix (not Ray's trial folders, not the lease)."""
        from pyarrow import fs

        selector = fs.FileSelector(self.root, recursive=True, allow_not_found=True)
        found = {}
        for info in self.fs.get_file_info(selector):
            rel = info.path[len(self.root) + 1 :]
            if info.type != fs.FileType.File or RAY_OWNED.match(rel) or NOT_SYNCED.search(rel):
                continue
            found[rel] = (info.size, info.mtime)
        return found

    def exists(self) -> bool:
        """Whether the sweep's prefix holds anything of a sweep (its experiment or records)."""
        return bool(self.remote_files())

    def stage(self) -> Path:
        """A fresh staging folder holding the sweep's files as they are on the store."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)
        self.seen_local.clear()
        self.seen_remote.clear()
        self.pull()
        return self.local

    def pull(self, only: str = "") -> list[str]:
        """Download the store's files that changed since last synced (under `only`)."""
        got = []
        for rel, stamp in self.remote_files().items():
            if not rel.startswith(only) or self.seen_remote.get(rel) == stamp:
                continue
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as out:
                out.write(_get(self.fs, self._path(rel)))
            if stamp[1] is not None:  # the store's time: ages read from files stay true
                os.utime(tmp, (stamp[1].timestamp(), stamp[1].timestamp()))
            os.replace(tmp, target)
            self._mark(rel, stamp)
            got.append(rel)
        return got

    def _mark(self, rel: str, remote: tuple[int, Any] | None = None) -> None:
        st = (self.local / rel).stat()
        self.seen_local[rel] = (st.st_size, st.st_mtime_ns)
        if remote is None:
            info = self.fs.get_file_info(self._path(rel))
            remote = (info.size, info.mtime)
        self.seen_remote[rel] = remote

    def local_files(self) -> dict[str, tuple[int, int]]:
        """The staging folder's files that are synced, with (size, mtime_ns)."""
        found = {}
        for path in self.local.rglob("*"):
            rel = path.relative_to(self.local).as_posix()
            if path.is_file() and not path.is_symlink() and not NOT_SYNCED.search(rel):
                st = path.stat()
                found[rel] = (st.st_size, st.st_mtime_ns)
        return found

    def push(self, force: bool = True) -> list[str]:
        """Upload the staging files changed since last synced, each as one whole object, and
        remove the objects of staged files removed since (records set aside on a resume)."""
        with self._guard:
            if not force and time.monotonic() - self._last_push < SYNC_EVERY_S:
                return []
            self._last_push = time.monotonic()
            now = self.local_files()
            sent = []
            for rel, stamp in sorted(now.items()):
                if self.seen_local.get(rel) != stamp:
                    self.put_file(rel)
                    sent.append(rel)
            for rel in sorted(set(self.seen_local) - set(now)):
                with contextlib.suppress(FileNotFoundError, OSError):
                    self.fs.delete_file(self._path(rel))
                self.seen_local.pop(rel, None)
                self.seen_remote.pop(rel, None)
            return sent

    def put_file(self, rel: str) -> None:
        """Upload one staged file (read whole first: a file renamed over meanwhile is whole)."""
        data = (self.local / rel).read_bytes()
        _put(self.fs, self._path(rel), data)
        self._mark(rel)

    def clear_remote(self) -> None:
        """--restart: remove everything under the sweep's prefix but the lease."""
        from pyarrow import fs

        selector = fs.FileSelector(self.root, recursive=False, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.base_name == LEASE:
                continue
            if info.type == fs.FileType.Directory:
                self.fs.delete_dir(info.path)
            else:
                self.fs.delete_file(info.path)
        self.seen_remote.clear()
        self.seen_local.clear()

    def lease(self, what: str) -> Lease:
        """The driver's lease on this sweep (a context manager)."""
        return Lease(self.fs, self._path(LEASE), self.uri, what)

    def holder(self) -> dict[str, Any] | None:
        """Who holds the sweep's lease (pid, host, started), or None."""
        return Lease(self.fs, self._path(LEASE), self.uri, "status").holder()


class Lease:
    """The sweep's driver lock on an object store: a candidate object per driver, contested by
    listing (the module's docstring says how, and what it does not guard against)."""

    def __init__(self, filesystem, prefix: str, uri: str, what: str) -> None:
        self.fs, self.prefix, self.uri, self.what = filesystem, prefix, uri, what
        self.me = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started": now,
                     "owner": self.me, "state": "claiming"}  # fmt: skip
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _mine(self) -> str:
        return f"{self.prefix}/{self.me}.json"

    def _write(self) -> None:
        _put(self.fs, self._mine(), json.dumps(self.info).encode())

    def live(self) -> list[tuple[Any, str, dict[str, Any]]]:
        """The candidates that have not expired: (mtime, owner, info), oldest first."""
        from pyarrow import fs

        selector = fs.FileSelector(self.prefix, recursive=False, allow_not_found=True)
        found = []
        for item in self.fs.get_file_info(selector):
            if item.type != fs.FileType.File:
                continue
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(_get(self.fs, item.path))
                if self._expired(item.mtime, info):
                    with contextlib.suppress(OSError):  # a dead driver's: removed
                        self.fs.delete_file(item.path)
                    continue
                found.append((item.mtime, str(info.get("owner", item.base_name)), info))
        return sorted(found, key=lambda c: (c[0].timestamp() if c[0] else 0, c[1]))

    @staticmethod
    def _expired(mtime, info: dict[str, Any]) -> bool:
        if mtime is not None and time.time() - mtime.timestamp() > LEASE_S:
            return True
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            return not _alive(info["pid"])  # a driver of this machine that was killed
        return False

    def holder(self) -> dict[str, Any] | None:
        """The driver holding the sweep, or None."""
        held = [c[2] for c in self.live() if c[2].get("state") == "held"]
        return held[0] if held else None

    def _refuse(self, info: dict[str, Any], doing: str) -> None:
        from towerspace.storage import describe

        raise SweepLocked(f"{self.what}: {self.uri} is {doing} by another driver "
                          f"({describe(info)}); wait for it to end, or stop it first (its lease "
                          f"expires {LEASE_S:g} s after it stops renewing it)")  # fmt: skip

    def __enter__(self) -> Lease:
        self._write()
        try:
            self._contest(self.live())
            time.sleep(SETTLE_S)
            self._contest(self.live(), last=True)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_file(self._mine())
            raise
        self.info["state"] = "held"
        self._write()
        self._beat = threading.Thread(target=self._renew, daemon=True, name="towerspace-lease")
        self._beat.start()
        return self

    def _contest(self, live: list, last: bool = False) -> None:
        others = [c for c in live if c[1] != self.me]
        for _, _, info in others:
            if info.get("state") == "held":
                self._refuse(info, "in use")
        if last and live and live[0][1] != self.me:
            self._refuse(live[0][2], "being started")

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_S / 4):
            with contextlib.suppress(Exception):  # a missed renewal: the next one tries again
                self._write()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        with contextlib.suppress(Exception):
            self.fs.delete_file(self._mine())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged(sweep_uri: str, write: bool = False) -> Iterator[Path]:
    """A sweep on a store, read into a staging folder of its own in Ray's temporary folder
    (removed afterwards); with write, what was added there (figures) is uploaded first."""
    parent = ray_temp() / "towerspace"
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=parent, prefix="read-"))
    try:
        name = sweep_uri.rstrip("/").rsplit("/", 1)[-1]
        store = SweepStore(sweep_uri, scratch / name, what=sweep_uri)
        store.local.mkdir()
        store.pull()
        if not store.seen_remote:
            raise StorageError(f"{sweep_uri}: no sweep here (nothing of a towerspace sweep under "
                               f"that prefix)")  # fmt: skip
        (store.local / "records").mkdir(exist_ok=True)  # a sweep whose trials left none yet
        yield store.local
        if write:
            store.push()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
