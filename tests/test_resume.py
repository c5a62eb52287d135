"""Resume after a kill, with real processes and real signals: nothing re-run, nothing lost."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from towerspace import results

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = str(REPO / "experiments/digits_continuum.yaml")
SETS = ("train.epochs=8", "model.width=0.125", "model.middle_blocks=1", "seeds=[0]",
        "space.params={model.towers: {grid: [1, 2, 4, depthwise]}}")  # fmt: skip
pytestmark = pytest.mark.slow


def _sweep(storage: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    argv = [sys.executable, "-m", "towerspace.cli", "sweep", EXPERIMENT, "--storage",
            str(storage), *[f"--set={s}" for s in SETS], *extra]  # fmt: skip
    log = open(storage / f"log{len(list(storage.glob('log*')))}.txt", "w")  # noqa: SIM115
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip


def _records(storage: Path) -> dict[str, dict]:
    found = {}
    for path in (storage / "digits_continuum" / "records").glob("*.json"):
        try:
            found[path.stem] = json.loads(path.read_text())
        except ValueError:
            continue  # being written
    return found


def _wait_until_some_finished_and_one_midway(storage: Path, proc, timeout=180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = _records(storage).values()
        finished = [r for r in recs if r["status"] == "finished"]
        midway = [r for r in recs if r["status"] == "running" and 1 <= r["epochs_run"] < 8]
        if len(finished) >= 2 and midway:
            return
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("the sweep never reached two finished trials and one mid-way")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_resume_after_a_kill_reruns_nothing_and_loses_nothing(tmp_path, how):
    first = _sweep(tmp_path)
    _wait_until_some_finished_and_one_midway(tmp_path, first)
    if how == "SIGKILL":  # the whole job dies at once: driver and its local Ray
        os.killpg(first.pid, signal.SIGKILL)
    else:  # Ctrl-C: Ray Tune saves its state and stops
        os.kill(first.pid, signal.SIGINT)
    first.wait(timeout=120)
    before = _records(tmp_path)
    finished_before = {k: r for k, r in before.items() if r["status"] == "finished"}
    midway = {k: r["epochs_run"] for k, r in before.items() if r["status"] == "running"}
    assert len(finished_before) >= 2 and midway

    again = _sweep(tmp_path, "--resume")
    assert again.wait(timeout=300) == 0, (tmp_path / "log1.txt").read_text()[-3000:]
    after = _records(tmp_path)
    table = results.load(tmp_path / "digits_continuum" / "results.parquet")
    assert len(table) == 4 and table["trial_id"].is_unique  # one row per trial, none lost
    assert set(table["status"]) == {"finished"}
    rerun = [k for k, r in finished_before.items() if after[k] != r]
    assert rerun == []  # finished trials were not re-run: their records are untouched
    for trial_id, epochs in midway.items():
        resumed = after[trial_id]["resumed_at"]
        assert len(resumed) == 1 and 1 <= resumed[0] <= epochs  # from its last checkpoint
        assert [h["epoch"] for h in after[trial_id]["history"]] == list(range(1, 9))


def test_resume_refuses_what_it_cannot_resume(tmp_path):
    from towerspace.cli import main

    assert main(["sweep", EXPERIMENT, "--storage", str(tmp_path), "--resume"]) == 2
    (tmp_path / "digits_continuum").mkdir()
    (tmp_path / "digits_continuum" / "notes.txt").write_text("not a sweep")
    assert main(["sweep", EXPERIMENT, "--storage", str(tmp_path), "--resume"]) == 2
    assert (tmp_path / "digits_continuum" / "notes.txt").read_text() == "not a sweep"
