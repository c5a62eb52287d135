"""Reliability of real sweeps, with real processes, signals and a real full disk: one driver per
folder, failures as results, Ctrl-C twice, ENOSPC mid-sweep and a resume that loses nothing."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from towerspace import results, storage
from towerspace.cli import main

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = str(REPO / "experiments/digits_continuum.yaml")
SETS = ("train.epochs=6", "train.max_steps=6", "train.batch_size=32", "model.width=0.125",
        "model.middle_blocks=1", "seeds=[0]",
        "space.params={model.towers: {grid: [1, depthwise]}}")  # fmt: skip
pytestmark = pytest.mark.slow


def _sweep(storage_dir: Path, *extra: str, sets=SETS, log: str = "log") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    argv = [sys.executable, "-m", "towerspace.cli", "sweep", EXPERIMENT, "--storage",
            str(storage_dir), *[f"--set={s}" for s in sets], *extra]  # fmt: skip
    out = open(storage_dir.parent / f"{log}.txt", "w")  # noqa: SIM115
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, text=True)  # fmt: skip


def _log(storage_dir: Path, log: str = "log") -> str:
    return (storage_dir.parent / f"{log}.txt").read_text()


def _wait_for(condition, *procs: subprocess.Popen, timeout: float = 180.0, what: str = "") -> None:
    """Wait for `condition` while at least one of `procs` still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert any(p.poll() is None for p in procs), f"the sweep ended before {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_drivers_on_one_folder_one_is_refused_and_the_results_stay_whole(
    tmp_path, capsys, records_now
):
    runs = tmp_path / "runs"
    runs.mkdir()
    sweep_dir = runs / "digits_continuum"
    first = _sweep(runs, log="first")
    time.sleep(1.0)  # "started seconds apart": both pass the early checks
    second = _sweep(runs, log="second")
    procs = {"first": first, "second": second}
    try:
        # either may win the lock (under load the second can get there first)
        _wait_for(lambda: any(r["epochs_run"] >= 1 for r in records_now(sweep_dir)), first,
                  second, what="a trial's first epoch")  # fmt: skip
        running = storage.holder(sweep_dir)["pid"]
        for extra in ("--resume", "--restart"):  # while it runs: refused, nothing touched
            argv = ["sweep", EXPERIMENT, "--storage", str(runs), *[f"--set={s}" for s in SETS]]
            assert main([*argv, extra]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"towerspace: error: {extra}: {sweep_dir} is in use by another "
                                  f"driver (pid {running} on "), err  # fmt: skip
        codes = {name: proc.wait(timeout=300) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    logs = {name: _log(runs, name) for name in procs}
    assert sorted(codes.values()) == [0, 2], logs
    loser = "first" if codes["first"] == 2 else "second"
    assert procs["second" if loser == "first" else "first"].pid == running
    refusal = logs[loser].strip().splitlines()[-1]
    assert refusal.startswith(f"towerspace: error: sweep: {sweep_dir} is in use by another "
                              f"driver (pid {running} on "), logs  # fmt: skip
    table = results.load(sweep_dir / "results.parquet")
    assert len(table) == 2 and set(table["status"]) == {"finished"}  # 2 trials, not 4
    assert len(list((sweep_dir / "records").glob("*.json"))) == 2
    assert storage.holder(sweep_dir) is None


def _tree_with_a_corrupt_image(root: Path) -> Path:
    from PIL import Image

    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (12, 12), (40 * i, 100 * c, 0)).save(root / f"class{c}" / f"{i}.png")
    (root / "class1" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    return root


def test_a_sweep_whose_every_trial_fails_at_start_still_writes_its_tables(tmp_path, capsys,
                                                                          local_ray):  # fmt: skip
    tree = _tree_with_a_corrupt_image(tmp_path / "tree")
    sets = [*SETS[1:], "train.epochs=1", "data.name=imagefolder", f"data.root={tree}",
            "data.image_size=16", "data.stream=never"]  # fmt: skip
    argv = ["sweep", EXPERIMENT, "--storage", str(tmp_path / "runs"), *[f"--set={s}" for s in sets]]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "digits_continuum: 2 trials (2 error)" in out
    bad = str(tree / "class1" / "5.png")
    failures = [line for line in out.splitlines() if line.startswith("  error")]
    assert len(failures) == 2 and all(bad in line and "DataError" in line for line in failures)
    sweep_dir = tmp_path / "runs" / "digits_continuum"
    table = results.load(sweep_dir / "results.parquet")
    assert sorted(table["towers"].astype(str)) == ["1", "depthwise"]
    assert set(table["status"]) == {"error"} and table["error"].str.contains(bad).all()
    assert (sweep_dir / "history.parquet").is_file()
    assert main(["plot", str(sweep_dir)]) == 0  # no KeyError, no traceback
    assert "no finished trials: nothing to plot" in capsys.readouterr().err


def test_a_corrupt_image_found_mid_epoch_ends_that_trial_naming_the_file(tmp_path, capsys,
                                                                         local_ray):  # fmt: skip
    tree = _tree_with_a_corrupt_image(tmp_path / "tree")
    sets = [*SETS[1:], "train.epochs=1", "data.name=imagefolder", f"data.root={tree}",
            "data.image_size=16", "data.stream=always", "train.batch_size=4"]  # fmt: skip
    argv = ["sweep", EXPERIMENT, "--storage", str(tmp_path / "runs"), *[f"--set={s}" for s in sets]]
    assert main(argv) == 1
    table = results.load(tmp_path / "runs" / "digits_continuum" / "results.parquet")
    assert set(table["status"]) == {"error"}
    bad = str(tree / "class1" / "5.png")
    assert table["error"].str.startswith(f"DataError: {bad}: cannot decode this image").all()
    capsys.readouterr()


def test_ctrl_c_twice_stops_at_once_and_exits_non_zero(tmp_path, records_now):
    """(Ctrl-C once: tests/test_resume.py, exit code 130 and a resume that loses nothing.)"""
    runs = tmp_path / "runs"
    runs.mkdir()
    sweep_dir = runs / "digits_continuum"
    proc = _sweep(runs)
    _wait_for(lambda: any(r["epochs_run"] >= 1 for r in records_now(sweep_dir)), proc,
              what="a trial's first epoch")  # fmt: skip
    for _ in range(2):
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.2)
    assert proc.wait(timeout=120) != 0, _log(runs)
    assert storage.holder(sweep_dir) is None


@pytest.fixture
def small_disk(tmp_path, tmpfs):
    """A 96 MiB disk of its own."""
    with tmpfs(tmp_path / "disk", "96m") as mount:
        yield mount


def _fill(disk: Path, leave: int) -> Path:
    """A file that takes all but `leave` bytes of the disk."""
    filler = disk / "filler.bin"
    free = shutil.disk_usage(disk).free
    try:
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, free - leave))
    except OSError:  # ENOSPC: what fitted is written
        pass
    return filler


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def test_a_disk_full_from_the_start_is_one_line_and_leaves_nothing(small_disk, capsys):
    _fill(small_disk, leave=0)
    argv = ["sweep", EXPERIMENT, "--storage", str(small_disk / "runs"),
            *[f"--set={s}" for s in SETS]]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("towerspace: error: ") and "no space left on device" in err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler.bin"]


def test_a_disk_that_fills_mid_sweep_stops_it_and_resume_loses_nothing(
    small_disk, records_now, capsys, local_ray
):
    sets = (*SETS[:-1], "train.epochs=8", "train.max_steps=4",  # checkpoints fill it, not steps
            "space.params={model.towers: {grid: [1, 2, 4, 8]}}")  # fmt: skip
    runs = small_disk / "runs"
    filler = _fill(small_disk, leave=6 * 2**20)
    first = _sweep(runs, sets=sets)
    code = first.wait(timeout=300)
    log = _log(runs)
    assert code == 1, log
    assert log.strip().splitlines()[-1].startswith("towerspace: error: ") and "Traceback" not in log
    assert "no space left on device; the sweep stopped" in log
    records = records_now(runs / "digits_continuum")
    assert not [r for r in records if r["status"] == "running"]  # none left stuck
    assert _leftovers(runs) == []
    filler.unlink()
    argv = ["sweep", EXPERIMENT, "--storage", str(runs), *[f"--set={s}" for s in sets]]
    code = main([*argv, "--resume"])  # in this process, on the session's Ray
    out = capsys.readouterr()
    assert code == 0, (out.out + out.err)[-3000:]
    table = results.load(runs / "digits_continuum" / "results.parquet")
    assert len(table) == 4 and set(table["status"]) == {"finished"}
    assert (table["epochs_run"] == 8).all()
    assert _leftovers(runs) == []
