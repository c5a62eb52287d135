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
from towerspace.study import load_study

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = str(REPO / "experiments/digits_continuum.yaml")
# 8 short epochs (6 steps of 32 images): a kill lands with trials finished, mid-way and not started
SETS = ("train.epochs=8", "train.max_steps=6", "train.batch_size=32", "model.width=0.125",
        "model.middle_blocks=1", "seeds=[0]",
        "space.params={model.towers: {grid: [1, 2, 4, depthwise]}}")  # fmt: skip
pytestmark = pytest.mark.slow


def _sweep(storage: Path, *extra: str, sets: tuple[str, ...] = SETS) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    argv = [sys.executable, "-m", "towerspace.cli", "sweep", EXPERIMENT, "--storage",
            str(storage), *[f"--set={s}" for s in sets], *extra]  # fmt: skip
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


def _checkpointed(storage: Path, trial_id: str) -> int:
    """The epoch of a trial's newest complete checkpoint on disk (0: none yet)."""
    import torch

    from towerspace.sweep.checkpoints import newest_checkpoint, trial_folder

    found = newest_checkpoint(None, trial_folder(storage / "digits_continuum", trial_id))
    if found is None:
        return 0
    return torch.load(Path(found.path) / "trainer.pt", weights_only=True)["epoch"]


def _wait_until_some_finished_and_one_midway(storage: Path, proc, timeout=180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = _records(storage).values()
        finished = [r for r in recs if r["status"] == "finished"]
        # a trial records epoch k before it persists k's checkpoint: at 2, epoch 1's is on disk
        midway = [r for r in recs if r["status"] == "running" and 2 <= r["epochs_run"] < 8]
        if len(finished) >= 2 and midway:
            return
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("the sweep never reached two finished trials and one mid-way")


def _resume(storage: Path, capsys, sets: tuple[str, ...] = SETS) -> str:
    """--resume in this process, on the session's Ray (the kill, not the resume, needs a
    process of its own); what it printed."""
    from towerspace.cli import main

    argv = ["sweep", EXPERIMENT, "--storage", str(storage), *[f"--set={s}" for s in sets]]
    code = main([*argv, "--resume"])
    out = capsys.readouterr()
    assert code == 0, (out.out + out.err)[-3000:]
    return out.out


@pytest.mark.parametrize(
    ("how", "space"),
    [("SIGKILL", "per_flow"), ("SIGINT", "grid")],  # Optuna's searcher and Tune's grid
)
def test_resume_after_a_kill_reruns_nothing_and_loses_nothing(how, space, tmp_path, capsys,
                                                              local_ray):  # fmt: skip
    sets = (*SETS[:-1], "space=per_flow", "space.num_samples=4") if space == "per_flow" else SETS
    first = _sweep(tmp_path, sets=sets)
    _wait_until_some_finished_and_one_midway(tmp_path, first)
    if how == "SIGKILL":  # the whole job dies at once: driver and its local Ray
        os.killpg(first.pid, signal.SIGKILL)
    else:  # Ctrl-C: Ray Tune saves its state and stops
        os.kill(first.pid, signal.SIGINT)
    code = first.wait(timeout=120)
    if how == "SIGINT":  # Ray Tune saved its state and stopped: interrupted, resumable
        log = (tmp_path / "log0.txt").read_text()
        assert code == 130, log[-3000:]
        assert "trials unfinished; the same command with --resume continues them" in log
    before = _records(tmp_path)
    finished_before = {k: r for k, r in before.items() if r["status"] == "finished"}
    midway = {k: _checkpointed(tmp_path, k) for k, r in before.items() if r["status"] == "running"}
    assert len(finished_before) >= 2 and max(midway.values()) >= 1

    printed = _resume(tmp_path, capsys, sets)
    # a trial that started after Ray's last state save is unknown to the resumed run (a SIGKILL
    # can land there): its record is kept aside, out of the tables, and the resume says so
    orphaned = tmp_path / "digits_continuum" / "records" / "orphaned"
    orphans = {p.stem: json.loads(p.read_text()) for p in orphaned.glob("*.json")}
    assert orphans == {k: before[k] for k in orphans}  # kept as the kill left them
    assert (f"{len(orphans)} trials started after Ray last saved its state" in printed) == bool(
        orphans)  # fmt: skip
    before = {k: r for k, r in before.items() if k not in orphans}
    finished_before = {k: r for k, r in finished_before.items() if k not in orphans}
    midway = {k: e for k, e in midway.items() if k not in orphans}
    after = _records(tmp_path)
    table = results.load(tmp_path / "digits_continuum" / "results.parquet")
    # one row per trial, none lost; a searcher knew what it had proposed: 4, not 4 more
    assert len(table) == 4 and table["trial_id"].is_unique
    assert set(table["status"]) == {"finished"}
    rerun = [k for k, r in finished_before.items() if after[k] != r]
    assert rerun == []  # finished trials were not re-run: their records are untouched
    points = dict(zip(table["trial_id"], table["point"], strict=True))
    assert all(json.loads(points[k]) == r["point"] for k, r in before.items())  # continued
    for trial_id, epoch in midway.items():  # from the newest checkpoint on disk (a trial may
        resumed = after[trial_id]["resumed_at"]  # persist one more while the kill lands)
        assert (resumed == [] and epoch == 0) or (len(resumed) == 1 and resumed[0] >= epoch >= 0)
        assert [h["epoch"] for h in after[trial_id]["history"]] == list(range(1, 9))
    if space == "per_flow":
        assert list((tmp_path / "digits_continuum").glob("searcher-state-*.pkl"))
        # the Optuna study in the folder, after the kill and the resume: the 4 points, no more
        study = load_study(tmp_path / "digits_continuum", "digits_continuum")
        trials = study.get_trials(deepcopy=False)
        assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
        shown = {json.dumps(r["point"], sort_keys=True) for r in after.values()}
        assert {json.dumps(t.params, sort_keys=True) for t in trials} == shown


def test_resume_refuses_what_it_cannot_resume(tmp_path, capsys):
    from towerspace.cli import main

    argv = ["sweep", EXPERIMENT, "--storage", str(tmp_path), "--resume"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"towerspace: error: --resume: no sweep named 'digits_continuum' under {tmp_path}\n"
    )
    assert list(tmp_path.iterdir()) == []  # nothing written
    (tmp_path / "digits_continuum").mkdir()
    (tmp_path / "digits_continuum" / "notes.txt").write_text("not a sweep")
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"towerspace: error: --resume: {tmp_path}/digits_continuum is not a towerspace sweep (no "
        f"readable experiment.json)\n"
    )
    assert [p.name for p in (tmp_path / "digits_continuum").iterdir()] == ["notes.txt"]
    assert (tmp_path / "digits_continuum" / "notes.txt").read_text() == "not a sweep"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set=model.snap=strict", "--set=space=inception_points", "--set=model.match=none"],
         "{exp}: space inception_points: model.towers=3: entry.block2.convs.0: towers=3 does not "
         "divide 16 channels; valid: 1, 2, 4, 8, 16"),
        (["--set=data.name=cifar10", "--set=data.root=nowhere"],
         "{exp}: data.root: 'nowhere' is not a folder; cifar10 needs its files there (or --set "
         "data.download=true)"),
        (["--storage={tmp}/file.txt/runs"],
         "--storage {tmp}/file.txt/runs: cannot write there ({tmp}/file.txt is not a writable "
         "folder)"),
        (["--resume", "--restart"],
         "--resume and --restart exclude each other: continue, or start over"),
    ],
)  # fmt: skip
def test_bad_input_refused_before_anything_starts(argv, message, tmp_path, capsys, monkeypatch):
    from towerspace.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    storage = [] if any(a.startswith("--storage") for a in args) else [f"--storage={tmp_path}/s"]
    assert main(["sweep", EXPERIMENT, *storage, *args]) == 2
    expected = message.format(exp=EXPERIMENT, tmp=tmp_path)
    assert capsys.readouterr().err == f"towerspace: error: {expected}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing written


def test_resume_refuses_a_different_experiment_and_a_damaged_state(tiny_sweep, tmp_path, capsys):
    import shutil

    from towerspace.cli import main

    shutil.copytree(tiny_sweep.sweep_dir, tmp_path / "digits_continuum")
    grid = "--set=space.params={model.towers: {grid: [1, 4, depthwise]}}"
    base = ["sweep", EXPERIMENT, "--storage", str(tmp_path), "--resume",
            "--set=train.epochs=1", "--set=model.width=0.125", "--set=model.middle_blocks=1",
            "--set=seeds=[0, 1]", grid]  # fmt: skip
    assert main([*base[:-2], "--set=seeds=[0, 1, 2]", base[-1]]) == 2
    assert capsys.readouterr().err == (
        f"towerspace: error: --resume: {tmp_path}/digits_continuum holds a different experiment "
        f"(changed: seeds)\n"
    )
    for state in (tmp_path / "digits_continuum").glob("experiment_state-*.json"):
        state.write_text("{ truncated")
    (tmp_path / "digits_continuum" / "tuner.pkl").write_bytes(b"\x80\x04 not a pickle")
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"towerspace: error: --resume: cannot read the Ray Tune state in "
                          f"{tmp_path}/digits_continuum (")  # fmt: skip
    assert err.endswith("); pass --restart to start over\n") and err.count("\n") == 1


def test_a_sweep_from_before_a_new_field_resumes_when_the_field_has_its_default(tmp_path):
    from towerspace import config
    from towerspace.config import ConfigError
    from towerspace.errors import StorageError
    from towerspace.sweep.state import EXPERIMENT_FILE, _comparable, plan_storage

    cfg = config.load_experiment(EXPERIMENT, SETS)
    sweep_dir = tmp_path / "digits_continuum"
    sweep_dir.mkdir()
    old = _comparable(cfg)
    del old["resources"]["workers"], old["data"]["stream"]  # written by an older towerspace
    (sweep_dir / EXPERIMENT_FILE).write_text(json.dumps(old))
    with pytest.raises(StorageError, match="holds no Ray Tune state to resume"):
        plan_storage(cfg, tmp_path, restart=False, resume=True)  # the experiment matched
    changed = config.apply(cfg, {"resources.workers": 2})
    with pytest.raises(ConfigError, match=r"different experiment \(changed: resources.workers\)"):
        plan_storage(changed, tmp_path, restart=False, resume=True)


def test_a_trial_continues_from_its_newest_complete_checkpoint_even_if_ray_knows_an_older(
    tmp_path,
):
    import torch
    from ray import tune

    from towerspace.sweep.checkpoints import newest_checkpoint

    trial_dir = tmp_path / "run_trial_x"
    for epoch in (3, 4, 5):
        (trial_dir / f"checkpoint_00000{epoch}").mkdir(parents=True)
        torch.save({"epoch": epoch}, trial_dir / f"checkpoint_00000{epoch}" / "trainer.pt")
    cut = trial_dir / "checkpoint_000005" / "trainer.pt"
    cut.write_bytes(cut.read_bytes()[:40])  # a copy cut short by the kill
    known = tune.Checkpoint.from_directory(str(trial_dir / "checkpoint_000003"))
    assert Path(newest_checkpoint(known, trial_dir).path).name == "checkpoint_000004"
    assert Path(newest_checkpoint(None, trial_dir).path).name == "checkpoint_000004"
    assert newest_checkpoint(None, tmp_path / "empty") is None
    later = tune.Checkpoint.from_directory(str(tmp_path / "checkpoint_000009"))
    assert newest_checkpoint(later, trial_dir) is later  # Ray's own, when it is the newest


def test_old_checkpoints_are_pruned_only_when_no_saved_state_can_name_them(tmp_path):
    from towerspace.sweep.checkpoints import prune

    for k in range(5):
        (tmp_path / f"checkpoint_00000{k}").mkdir()
    stale = time.time() - 3600
    for k in (0, 1):
        os.utime(tmp_path / f"checkpoint_00000{k}", (stale, stale))
    prune(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint_000002", "checkpoint_000003", "checkpoint_000004"]  # recent ones
    prune(tmp_path, keep_s=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000003", "checkpoint_000004"]
