"""towerspace status: a sweep's progress read from its folder, without Ray and writing nothing;
on hand-made folders, on a real sweep while it runs, and on a finished one."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from towerspace import storage
from towerspace.cli import main
from towerspace.progress import duration, read_progress
from towerspace.progress import lines as status_lines

REPO = Path(__file__).resolve().parent.parent
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CHANGES = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.chmod", "os.utime",
           "os.truncate", "os.symlink", "os.link", "shutil.rmtree")  # fmt: skip
_watched: list[tuple[Path, list]] = []  # (folder, what was written there) while a test watches


def _audit(event: str, args: tuple) -> None:
    if not _watched:
        return
    folder, writes = _watched[-1]
    paths = [a for a in args if isinstance(a, str | bytes | os.PathLike)]
    inside = [p for p in paths if Path(os.fsdecode(p)).absolute().is_relative_to(folder)]
    if not inside:
        return
    opened_to_write = event == "open" and isinstance(args[2], int) and args[2] & WRITE_FLAGS
    if opened_to_write or event in CHANGES:
        writes.append((event, inside[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one acts only while watching


@contextlib.contextmanager
def _writes_in(folder: Path):
    """Every file this process opens for writing, or changes, in folder while in the block."""
    writes: list = []
    _watched.append((Path(folder).absolute(), writes))
    try:
        yield writes
    finally:
        _watched.pop()


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _record(trial_id, status, towers, seed, accs, *, epoch_s=3.0, planned=2, error=None):
    history = [{"epoch": i + 1, "val_acc": a, "epoch_time_s": epoch_s} for i, a in enumerate(accs)]
    return {"trial_id": trial_id, "status": status, "towers": str(towers), "seed": seed,
            "epochs_planned": planned, "epochs_run": len(accs), "error": error,
            "resumed_at": [], "history": history}  # fmt: skip


def _sweep(folder: Path, records, starting=(), damaged=()) -> Path:
    """A sweep folder as a driver leaves it mid-run: 3 points x 2 seeds of 2 epochs."""
    (folder / "records").mkdir(parents=True)
    space = {"name": "toy", "searcher": "grid", "metric": "val_acc", "mode": "max",
             "params": {"model.towers": {"grid": [1, 4, "depthwise"]}}}  # fmt: skip
    experiment = {"name": "toy", "space": space, "seeds": [0, 1], "train": {"epochs": 2},
                  "scheduler": {"name": "fifo"}}  # fmt: skip
    (folder / storage.EXPERIMENT_FILE).write_text(json.dumps(experiment))
    for record in records:
        (folder / "records" / f"{record['trial_id']}.json").write_text(json.dumps(record))
    for trial_id in starting:  # Ray made its folder; no epoch ended, so no record yet
        trial_dir = folder / f"run_trial_{trial_id}_3_model_towers=1,seed=1_2026-12-03_10-00-00"
        trial_dir.mkdir()
        (trial_dir / "params.json").write_text("{}")
    for trial_id in damaged:
        (folder / "records" / f"{trial_id}.json").write_text('{"trial_id": ')
    return folder


RECORDS = [
    _record("abc12_00000", "finished", 1, 0, [0.5, 0.8]),
    _record("abc12_00001", "running", 4, 0, [0.9]),
    _record("abc12_00002", "error", "depthwise", 0, [0.2], error="RuntimeError: boom"),
]


def test_a_running_sweep_counts_best_and_eta(tmp_path, capsys):
    sweep_dir = _sweep(tmp_path / "toy", RECORDS, starting=["abc12_00003"])
    with storage.DriverLock(sweep_dir):  # a driver runs it
        before = _snapshot(sweep_dir)
        with _writes_in(sweep_dir) as writes:
            assert main(["status", str(sweep_dir)]) == 0
            lines = capsys.readouterr().out.splitlines()
            assert main(["status", str(sweep_dir), "--json"]) == 0
            report = json.loads(capsys.readouterr().out)
        assert writes == [] and _snapshot(sweep_dir) == before
    counts = {"running": 2, "finished": 1, "stopped": 0, "diverged": 0, "error": 1, "pending": 2}
    assert report["counts"] == counts and report["total"] == 6
    assert report["driver"]["pid"] == os.getpid()
    # 1 epoch left of the running trial, 2 of the starting one, 2 x 2 of the pending ones,
    # at 3 s an epoch, 2 trials at once
    assert (report["epochs_left"], report["mean_epoch_s"], report["at_once"]) == (7, 3.0, 2)
    assert report["eta_s"] == pytest.approx(10.5)
    assert report["best"] == {"value": 0.9, "best_epoch_value": 0.9, "towers": "4", "seed": 0,
                              "trial_id": "abc12_00001", "status": "running", "epochs_run": 1,
                              "epochs_planned": 2}  # fmt: skip
    assert lines[0] == "toy: 6 trials: 2 running, 1 finished, 1 error, 2 pending"
    assert re.fullmatch(r"driver: pid \d+ on .+, started .+ UTC; running for \d+s", lines[1])
    assert lines[2] == ("best so far: val_acc 0.9000 after 1/2 epochs (its best epoch 0.9000)  "
                        "towers=4  seed=0  trial abc12_00001 (running)")  # fmt: skip
    assert lines[3] == ("ETA: about 10s (7 epochs left x 3.0 s, the mean of 4 epochs so far, / 2 "
                        "trials at once; trial start-up not counted)")  # fmt: skip
    assert lines[4:] == ["  error    towers=depthwise seed=0 (abc12_00002): RuntimeError: boom"]


def test_a_stopped_sweep_says_so_and_names_damaged_records(tmp_path):
    sweep_dir = _sweep(tmp_path / "toy", RECORDS, damaged=["abc12_00004"])
    progress = read_progress(sweep_dir)
    assert progress.driver is None and progress.eta_s is None
    assert progress.counts["pending"] == 2  # 6 less 3 records less 1 damaged
    assert progress.notes == ["records/abc12_00004.json: unreadable, left out"]
    lines = status_lines(progress)
    assert re.fullmatch(
        r"no driver running: stopped after \d+s with 3 trials unfinished "
        r"\(towerspace sweep EXPERIMENT --resume continues them\)",
        lines[1],
    )
    assert not any(line.startswith("ETA") for line in lines)
    assert lines[-1] == "note: records/abc12_00004.json: unreadable, left out"


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (0, 42.4, 185, 7380, 3 * 86400 + 4 * 3600)] == [
        "0s", "42s", "3m05s", "2h03m", "3d04h"]  # fmt: skip


def _bad_target(kind: str, target: Path) -> Path:
    if kind == "a-file":
        target.write_text("x")
    elif kind in ("not-a-sweep", "bad-experiment"):
        target.mkdir()
        if kind == "bad-experiment":
            (target / "experiment.json").write_text("[1")
    return target


EXPECTED = "expected a sweep's folder, e.g. runs/digits_continuum"


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("missing", "{d}: does not exist"),
        ("a-file", "{d}: is not a folder"),
        ("not-a-sweep", "{d}: not a towerspace sweep (no experiment.json)"),
        ("bad-experiment", "{d}/experiment.json: unreadable (not valid JSON)"),
    ],
)
def test_bad_input_is_one_line_naming_the_value_and_exit_2(kind, problem, tmp_path, capsys):
    target = _bad_target(kind, tmp_path / "thing")
    assert main(["status", str(target)]) == 2
    assert capsys.readouterr().err == f"towerspace: error: {problem.format(d=target)}; {EXPECTED}\n"


@pytest.mark.slow  # a fresh interpreter
def test_status_loads_neither_ray_nor_torch(tmp_path):
    sweep_dir = _sweep(tmp_path / "toy", RECORDS)
    code = (
        "import sys\nfrom towerspace.cli import main\ncode = main(['status', sys.argv[1]])\n"
        "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))\nsys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(sweep_dir)], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


SWEEP = ("--set", "train.epochs=2", "--set", "train.max_steps=2", "--set", "model.width=0.125",
         "--set", "model.middle_blocks=1", "--set", "seeds=[0]", "--set", "train.batch_size=32",
         "--set", "space.params={model.towers: {grid: [1, 4, depthwise]}}")  # fmt: skip


def _finished(records) -> int:
    return sum(r["status"] == "finished" for r in records)


@pytest.mark.slow  # a real sweep, in a process of its own
def test_status_of_a_running_sweep_and_the_sweeps_own_lines(tmp_path, records_now, capsys):
    import towerspace.progress  # noqa: F401  (loaded before the sweep is caught mid-run)

    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "towerspace.cli", "sweep",
           str(REPO / "experiments/digits_continuum.yaml"), "--storage", str(tmp_path / "runs"),
           "--yes", *SWEEP]  # fmt: skip
    with out.open("w") as stdout, err.open("w") as stderr:
        driver = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, cwd=tmp_path)
    sweep_dir = tmp_path / "runs" / "digits_continuum"
    try:
        deadline = time.monotonic() + 240
        while not any(r.get("epochs_run", 0) >= 1 for r in records_now(sweep_dir)):
            assert driver.poll() is None, f"the sweep ended first:\n{err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no epoch ended in 240 s"
            time.sleep(0.2)
        finished_before = _finished(records_now(sweep_dir))
        with _writes_in(sweep_dir) as writes:
            assert main(["status", str(sweep_dir), "--json"]) == 0
        finished_after = _finished(records_now(sweep_dir))
        report = json.loads(capsys.readouterr().out)
        assert writes == []
        assert driver.wait(timeout=300) == 0, err.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    counts = report["counts"]
    assert report["total"] == 3 and sum(counts.values()) == 3  # 3 points x 1 seed
    assert finished_before <= counts["finished"] <= finished_after
    assert counts["running"] + counts["pending"] >= 1  # caught before the end
    assert counts["error"] == counts["diverged"] == 0
    assert report["driver"]["pid"] == driver.pid
    assert report["mean_epoch_s"] > 0 and report["eta_s"] is not None
    assert report["best"]["epochs_run"] >= 1
    # the sweep's own lines: one when a trial starts, one per epoch with the sweep's ETA
    text, errors = out.read_text(), err.read_text()
    assert len(re.findall(r"\] started  towers=\S+  seed=0\n", text)) == 3
    epochs = re.findall(r"\] running  towers=\S+  seed=0  val_acc [\d.]+ after (\d)/2 epochs  "
                        r"ETA \d+[smhd]", text)  # fmt: skip
    assert sorted(epochs) == ["1"] * 3 + ["2"] * 3
    assert f"TensorBoard: tensorboard --logdir {Path('runs/digits_continuum')}\n" in text
    # no Ray warnings that do not concern the user: token authentication, a staging folder
    for noise in ("Token authentication", "RAY_AUTH_MODE", "To visualize your results",
                  "View detailed results"):  # fmt: skip
        assert noise not in text + errors
    assert main(["status", str(sweep_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "digits_continuum: 3 trials: 3 finished"
    assert lines[1].startswith("ended: ran ")


@pytest.mark.slow  # the session's real sweep
def test_status_of_a_finished_sweep(tiny_sweep, capsys):
    import pandas as pd

    sweep_dir = tiny_sweep.sweep_dir
    before = _snapshot(sweep_dir)
    with _writes_in(sweep_dir) as writes:
        assert main(["status", str(sweep_dir), "--json"]) == 0
    assert writes == [] and _snapshot(sweep_dir) == before
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"running": 0, "finished": 6, "stopped": 0, "diverged": 0,
                                "error": 0, "pending": 0}  # fmt: skip
    assert report["driver"] is None and report["eta_s"] is None and report["epochs_left"] == 0
    table = pd.read_parquet(tiny_sweep.results_path)
    best = report["best"]
    assert best["value"] == pytest.approx(table["final_val_acc"].max())
    row = table[table["trial_id"] == best["trial_id"]].iloc[0]
    assert (str(row["towers"]), row["seed"]) == (best["towers"], best["seed"])
