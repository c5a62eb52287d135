"""A sweep on a real two-node Ray cluster (`ray start` head and worker), losing the worker."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from towerspace import results

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
EPOCHS = 6
SETS = (f"train.epochs={EPOCHS}", "model.width=0.125", "model.middle_blocks=1", "seeds=[0]",
        "space.params={model.towers: {grid: [4, depthwise]}}", "retries=2")  # fmt: skip
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster():
    """A head node and a worker node of one CPU each, as separate `ray start` processes."""
    temp = tempfile.mkdtemp(prefix="tsray", dir="/tmp")  # short: Ray's socket paths are long
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # a token of its own, so that no other Ray on this machine can rewrite the shared one
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    port, worker_port = _free_port(), _free_port()
    common = ["--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    start = dict(env=env, check=True, capture_output=True, timeout=120)
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                    f"--temp-dir={temp}", *common], **start)  # fmt: skip
    subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}",
                    f"--node-manager-port={worker_port}", *common], **start)  # fmt: skip
    try:
        yield {"address": f"127.0.0.1:{port}", "env": env, "worker_port": worker_port}
    finally:  # this cluster's processes only: another Ray may be running here (the tests')
        for proc in _processes(temp):
            proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _processes(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def _kill_worker_node(worker_port: int) -> int:
    """SIGKILL the worker node's raylet and everything it started (its trial's process too)."""
    (raylet,) = _processes(f"--node_manager_port={worker_port}")
    doomed = [raylet, *raylet.children(recursive=True)]
    for proc in doomed:
        proc.send_signal(signal.SIGKILL)
    return len(doomed)


def test_a_sweep_on_a_two_node_cluster_survives_losing_the_worker_node(
    cluster, tmp_path, records_now
):
    argv = [sys.executable, "-m", "towerspace.cli", "sweep",
            str(REPO / "experiments/digits_continuum.yaml"), "--address", cluster["address"],
            "--storage", str(tmp_path), *[f"--set={s}" for s in SETS]]  # fmt: skip
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        sweep = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=cluster["env"])
        deadline = time.monotonic() + 300  # a wait, not a timing: a loaded CI machine is slow
        while True:  # both trials under way, one on each node, each with a checkpoint on disk
            records = records_now(tmp_path / "digits_continuum")
            # a trial records epoch k before it persists k's checkpoint: at 2, epoch 1's is there
            running = [r for r in records if r["status"] == "running" and r["epochs_run"] >= 2]
            if len(running) == 2 and all(r["epochs_run"] < EPOCHS - 1 for r in running):
                break
            assert sweep.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert _kill_worker_node(cluster["worker_port"]) >= 2  # the raylet and the trial
        assert sweep.wait(timeout=300) == 0, log.read_text()
    table = results.load(tmp_path / "digits_continuum")
    assert sorted(table["status"]) == ["finished", "finished"]
    assert (table["epochs_run"] == EPOCHS).all()
    history = results.load_history(tmp_path / "digits_continuum" / "history.parquet")
    assert sorted(history.groupby("trial_id")["epoch"].apply(list)) == [[*range(1, EPOCHS + 1)]] * 2
    resumed = sorted(len(r["resumed_at"]) for r in records_now(tmp_path / "digits_continuum"))
    assert resumed == [0, 1]  # the lost trial continued from its checkpoint, once; no re-run
    (lost,) = [r for r in records_now(tmp_path / "digits_continuum") if r["resumed_at"]]
    assert lost["resumed_at"][0] >= 1
