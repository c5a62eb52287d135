"""Sweeps on object storage: a real S3 server (moto, in server mode) on loopback, pyarrow.fs,
and the command line end to end: a sweep written there, killed, resumed, plotted, loaded, and
a second driver refused."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pyarrow import fs

from towerspace import objectstore, results
from towerspace.errors import StorageError, SweepLocked
from towerspace.objectstore import SweepStore, staged

REPO = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "towerspace"


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free port; the AWS_* variables point pyarrow (and Ray) at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    yield env
    server.terminate()
    server.wait(timeout=10)
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket: s3://<name>."""
    name = "b" + str(abs(hash(request.node.name)) % 10**10)
    store = fs.S3FileSystem(allow_bucket_creation=True,
                            endpoint_override=s3_server["AWS_ENDPOINT_URL"])  # fmt: skip
    store.create_dir(name)
    return f"s3://{name}"


def _objects(uri: str) -> dict[str, int]:
    store, root = fs.FileSystem.from_uri(uri)
    infos = store.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1 :]: i.size for i in infos if i.type == fs.FileType.File}


def test_a_staging_folder_syncs_whole_objects_both_ways(bucket, tmp_path):
    store = SweepStore(f"{bucket}/runs/x", tmp_path / "x")
    store.local.mkdir()
    (store.local / "records").mkdir()
    (store.local / "records" / "a.json").write_text('{"a": 1}')
    (store.local / "experiment.json").write_text("{}")
    (store.local / ".results.parquet.123.tmp").write_text("partial")  # a write in progress
    (store.local / "driver.lock").write_text("")  # the local flock: never uploaded
    assert store.push() == ["experiment.json", "records/a.json"]
    assert _objects(f"{bucket}/runs/x") == {"experiment.json": 2, "records/a.json": 8}
    assert store.push() == []  # nothing changed, nothing sent
    (store.local / "records" / "a.json").rename(store.local / "records" / "b.json")
    assert store.push() == ["records/b.json"]
    assert _objects(f"{bucket}/runs/x") == {"experiment.json": 2, "records/b.json": 8}
    # a second copy reads what the first wrote, with the store's times
    other = SweepStore(f"{bucket}/runs/x", tmp_path / "y" / "x")
    assert other.stage() == tmp_path / "y" / "x"
    assert (other.local / "records" / "b.json").read_text() == '{"a": 1}'
    assert sorted(p.name for p in other.local.rglob("*") if p.is_file()) == [
        "b.json", "experiment.json"]  # fmt: skip
    assert other.pull() == []


def test_a_second_driver_is_refused_while_the_lease_is_held(bucket):
    first = SweepStore(f"{bucket}/runs/x", Path("unused")).lease("sweep")
    with first:
        holder = SweepStore(f"{bucket}/runs/x", Path("unused")).holder()
        assert holder["pid"] == os.getpid() and holder["state"] == "held"
        second = SweepStore(f"{bucket}/runs/x", Path("unused")).lease("--resume")
        with pytest.raises(SweepLocked, match=r"^--resume: s3://.*/runs/x is in use by "
                           r"another driver \(pid \d+ on .*, started .*\); wait"):  # fmt: skip
            second.__enter__()
    assert SweepStore(f"{bucket}/runs/x", Path("unused")).holder() is None  # released
    assert _objects(f"{bucket}/runs/x") == {}  # and its object removed


def test_of_two_drivers_starting_at_once_exactly_one_gets_the_lease(bucket):
    won, refused = [], []

    def drive():
        try:
            with SweepStore(f"{bucket}/runs/x", Path("unused")).lease("sweep"):
                won.append(1)
                time.sleep(objectstore.SETTLE_S + 1)  # held while the other one decides
        except SweepLocked as err:
            refused.append(str(err))

    threads = [threading.Thread(target=drive) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 1, (won, refused)


def test_a_killed_drivers_lease_on_this_machine_is_taken_over(bucket):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    lease = SweepStore(f"{bucket}/runs/x", Path("unused")).lease("sweep")
    stale = {**lease.info, "pid": int(dead.stdout), "state": "held", "owner": "0-dead"}
    objectstore._put(lease.fs, f"{lease.prefix}/0-dead.json", json.dumps(stale).encode())
    with lease:  # the dead driver's candidate is removed, not waited for
        assert [c[1] for c in lease.live()] == [lease.me]


def test_storage_uris_that_cannot_be_opened_are_refused_in_one_line(tmp_path):
    with pytest.raises(StorageError, match=r"^--storage nosuch://b/runs: cannot open it "
                       r"\(Unrecognized filesystem type in URI: nosuch://b/runs\); allowed: a "
                       r"folder, or a URI that pyarrow.fs opens"):  # fmt: skip
        objectstore.open_uri("nosuch://b/runs", "--storage nosuch://b/runs")
    with pytest.raises(StorageError, match="no sweep here"), staged(f"s3://no{os.getpid()}/x"):
        pass


@pytest.mark.slow  # three CLI sweeps (about 60 s)
def test_a_sweep_on_s3_is_killed_resumed_plotted_loaded_and_guarded(bucket, tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    (work / "experiments").symlink_to(REPO / "experiments")
    storage = f"{bucket}/runs"
    sweep = f"{storage}/digits_continuum"
    argv = [str(EXE), "sweep", "experiments/digits_continuum.yaml", "--storage", storage, "--yes",
            "--set", "model.match=none", "--set", "model.width=0.125", "--set",
            "model.middle_blocks=1", "--set", "train.epochs=3", "--set", "seeds=[0]", "--set",
            "space.params={model.towers: {grid: [1, 4, depthwise]}}", "--set",
            "resources.cpus=1"]  # fmt: skip
    env = {**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, text=True,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    seen = []
    for line in first.stdout:  # killed once a trial has a checkpoint and an epoch on the store
        seen.append(line)
        if "after 1/3 epochs" in line and any("checkpoint_" in k for k in _objects(sweep)):
            break
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed = results.load(sweep)  # read from the store, as it was left
    assert killed["epochs_run"].max() >= 1 and (killed["status"] == "running").any(), seen

    with SweepStore(sweep, Path("unused")).lease("sweep"):  # another driver holds it
        refused = subprocess.run([*argv, "--resume"], cwd=work, env=env, capture_output=True,
                                 text=True, check=False)  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(f"towerspace: error: --resume: {sweep} is in use by another "
                                     f"driver (pid {os.getpid()} on")  # fmt: skip

    resumed = subprocess.run([*argv, "--resume"], cwd=work, env=env, capture_output=True,
                             text=True, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"in {sweep}" in resumed.stdout and f"results: {sweep}/results.parquet" in resumed.stdout
    table = results.load(sweep)
    assert sorted(table["status"]) == ["finished"] * 3
    assert (table["epochs_run"] == 3).all()
    history = results.load_history(sweep)
    assert len(history) == 9  # every epoch once: resumed trials continued from the store
    objects = _objects(sweep)
    for name in ("experiment.json", "results.parquet", "history.parquet", "optuna.journal",
                 "plots/continuum.png"):  # fmt: skip
        assert name in objects, sorted(objects)
    assert not any(k.startswith("driver.lock") for k in objects)  # the lease was given back
    for trial in table["trial_id"]:  # at most the newest 2 checkpoints of a finished trial
        kept = {k.rsplit("/", 2)[-2] for k in objects if f"run_trial_{trial}_" in k
                and "checkpoint_" in k}  # fmt: skip
        assert 1 <= len(kept) <= 3, kept

    status = subprocess.run([str(EXE), "status", sweep], cwd=work, env=env, capture_output=True,
                            text=True, check=True)  # fmt: skip
    assert status.stdout.startswith("digits_continuum: 3 trials: 3 finished")
    fs_, root = fs.FileSystem.from_uri(sweep)
    fs_.delete_dir(f"{root}/plots")
    plotted = subprocess.run([str(EXE), "plot", sweep], cwd=work, env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
    assert f"  {sweep}/plots/continuum.png" in plotted.stdout
    assert "plots/continuum.png" in _objects(sweep)
    # nothing of the sweep on the local disk but in Ray's temporary folder: the working folder
    # is as it was, and HOME holds only Ray's cluster token and matplotlib's font cache
    assert sorted(p.name for p in work.iterdir()) == ["experiments"]
    kept = [p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file()]
    assert all(k == ".ray/auth_token" or k.startswith(".cache/matplotlib/") for k in kept), kept
