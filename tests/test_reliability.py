"""A sweep never loses data: names that escape, two drivers on one folder, trials that fail at
any stage, bad values refused before launch, bugs told apart from mistakes (no Ray here)."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from towerspace import config, storage
from towerspace.cli import main
from towerspace.errors import StorageError, SweepLocked

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = str(REPO / "experiments/digits_continuum.yaml")


def _bystanders(tmp_path: Path) -> dict[str, str]:
    """Files beside the storage folder and inside it that no sweep may touch."""
    (tmp_path / "runs" / "other_sweep").mkdir(parents=True)
    files = {"notes.txt": "mine", "runs/other_sweep/experiment.json": "{}", "runs/keep.txt": "k"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return files


@pytest.mark.parametrize("name", ["..", ".", "../escape", ".hidden", "-x", "a/b"])
@pytest.mark.parametrize("restart", [False, True])
def test_a_name_that_escapes_is_refused_and_touches_nothing(name, restart, tmp_path, capsys):
    files = _bystanders(tmp_path)
    argv = ["sweep", EXPERIMENT, "--storage", str(tmp_path / "runs"), f"--set=name={name}"]
    assert main(argv + ["--restart"] * restart) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"towerspace: error: {EXPERIMENT}: name: {name!r} is not allowed")
    assert err.count("\n") == 1
    assert {n: (tmp_path / n).read_text() for n in files} == files
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["keep.txt", "other_sweep"]


def test_the_storage_layer_checks_names_itself(tmp_path):
    """A config made in Python (not through the loader) still cannot leave the storage."""
    for name in ("..", ".", "a/../..", "x/y"):
        with pytest.raises(StorageError, match="is not allowed"):
            storage.sweep_folder(tmp_path, name)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match="is a link"):
        storage.sweep_folder(tmp_path / "runs", "linked")
    assert storage.sweep_folder(tmp_path, "a.b-c_1") == tmp_path.resolve() / "a.b-c_1"


def test_restart_removes_only_a_towerspace_sweep_and_says_what(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(StorageError, match=r"holds no towerspace sweep \(no experiment.json\); "
                                           r"nothing removed"):  # fmt: skip
        storage.clear(folder)
    assert (folder / "thesis.tex").read_text() == "years of work"
    (folder / "experiment.json").write_text("{}")
    (folder / "records").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "precious.txt").write_text("p")
    (folder / "link").symlink_to(tmp_path / "outside")
    with storage.DriverLock(folder):
        removed = storage.clear(folder)
        assert sorted(p.name for p in folder.iterdir()) == [storage.LOCK_FILE]
    assert removed == ["experiment.json", "link", "records/", "thesis.tex"]
    assert (tmp_path / "outside" / "precious.txt").read_text() == "p"  # a link, not followed


def test_restart_through_the_cli_refuses_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    (tmp_path / "digits_continuum").mkdir()
    (tmp_path / "digits_continuum" / "data.csv").write_text("1,2")
    argv = ["sweep", EXPERIMENT, "--storage", str(tmp_path), "--restart"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"towerspace: error: --restart: {tmp_path}/digits_continuum holds no towerspace sweep "
        f"(no experiment.json); nothing removed: remove it yourself, or choose another name or "
        f"--storage\n"
    )
    assert [p.name for p in (tmp_path / "digits_continuum").iterdir()] == ["data.csv"]


HOLD = """
import sys, time
from pathlib import Path
from towerspace.storage import DriverLock
with DriverLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow  # a real process
def test_a_locked_folder_names_its_driver_and_a_sigkill_releases_it(tmp_path):
    folder = tmp_path / "sweep"
    proc = _holder(folder)
    try:
        info = storage.holder(folder)
        assert info["pid"] == proc.pid and info["host"] == os.uname().nodename
        with pytest.raises(SweepLocked) as refused, storage.DriverLock(folder, "--resume"):
            pass
        assert str(refused.value).startswith(
            f"--resume: {folder} is in use by another driver (pid {proc.pid} on "
            f"{os.uname().nodename}, started 20"
        )
        assert str(refused.value).endswith("UTC); wait for it to end, or stop it first")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert storage.holder(folder) is None  # the kernel released it with the process
    with storage.DriverLock(folder):
        assert storage.holder(folder) is not None  # readers see it without blocking


@pytest.mark.slow  # a real process
def test_a_sweep_on_a_locked_folder_is_refused_before_anything_starts(tmp_path, capsys):
    folder = tmp_path / "digits_continuum"
    proc = _holder(folder)
    try:
        for extra in ([], ["--restart"], ["--resume"]):
            assert main(["sweep", EXPERIMENT, "--storage", str(tmp_path), *extra]) == 2
            err = capsys.readouterr().err
            assert f"{folder} is in use by another driver (pid {proc.pid} on" in err, err
        assert sorted(p.name for p in folder.iterdir()) == [storage.LOCK_FILE]
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_lock_taken_on_a_new_folder_and_dropped_leaves_nothing(tmp_path):
    with storage.DriverLock(tmp_path / "new"):
        assert (tmp_path / "new" / storage.LOCK_FILE).exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["data.name=synthetic", "data.num_samples=1000000000"],
         "data.num_samples=1000000000, data.image_size=16: one trial needs about 2.8 TiB (data "
         "2.8 TiB in memory), more than this machine's"),
        (["data.image_size=100000"],
         "data.image_size=100000: one trial needs about 65.4 TiB (data 65.4 TiB in memory), more "
         "than this machine's"),
        (["data.name=synthetic", "data.num_samples=8", "data.image_size=4096",
          "train.batch_size=4096"],
         "data.image_size=4096, train.batch_size=4096: one trial needs about"),
        (["train.device=cuda"],
         "train.device: 'cuda' with resources.gpus=0: a trial without a GPU sees none (allowed: "
         "auto, cpu; or set resources.gpus)"),
    ],
)  # fmt: skip
def test_what_cannot_fit_or_run_is_refused_before_launch(sets, message, tmp_path, capsys):
    start = time.monotonic()
    argv = ["sweep", EXPERIMENT, "--storage", str(tmp_path / "runs")]
    assert main([*argv, *[f"--set={s}" for s in sets]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"towerspace: error: {EXPERIMENT}: {message}"), err
    assert err.count("\n") == 1 and time.monotonic() - start < 60
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_asked_for_without_a_gpu_is_refused(tmp_path, capsys):
    argv = ["sweep", EXPERIMENT, "--storage", str(tmp_path), "--set=train.device=cuda",
            "--set=resources.gpus=1"]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"towerspace: error: {EXPERIMENT}: train.device: 'cuda' but no CUDA device is visible "
        f"here (allowed: auto, cpu)\n"
    )


def test_an_empty_class_folder_is_refused_before_launch(tmp_path, capsys):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "tree" / c).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "tree" / "cat" / "0.png")
    argv = ["sweep", EXPERIMENT, "--storage", str(tmp_path / "runs"), "--set=data.name=imagefolder",
            f"--set=data.root={tmp_path / 'tree'}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"towerspace: error: data.root: class folder '{tmp_path / 'tree' / 'dog'}' holds no images"
    ), err
    assert not (tmp_path / "runs").exists()


def test_an_address_where_nothing_listens_is_refused_after_a_bounded_wait(monkeypatch, capsys):
    from towerspace.sweep import cluster

    monkeypatch.setattr(cluster, "ADDRESS_WAIT_S", 1.0)
    start = time.monotonic()
    with pytest.raises(config.ConfigError) as refused:
        cluster.check_address("127.0.0.1:9")
    assert time.monotonic() - start < 10
    assert str(refused.value) == (
        "--address 127.0.0.1:9: nothing answers there after 1 s (Connection refused); start the "
        "cluster (ray start --head) or check the address"
    )
    with pytest.raises(config.ConfigError, match="allowed: HOST:PORT of a Ray head"):
        cluster.check_address("nowhere")


def test_a_bug_is_reported_as_one_with_its_traceback_and_exit_1(monkeypatch, capsys):
    """A ValueError from inside (pyarrow's and json's errors are ValueErrors) is no typo."""
    from towerspace import tables

    def broken(*args, **kwargs):
        raise ValueError("an internal mistake")

    monkeypatch.setattr(tables, "block_table", broken)
    assert main(["blocks", "--channels", "8", "--size", "4"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and "in broken" in err
    assert err.splitlines()[-1] == (
        "towerspace: internal error (a bug, not your input): ValueError: an internal mistake; "
        "please report it with the traceback above"
    )


def test_a_validation_loss_that_is_not_finite_diverges_the_trial():
    """Training loss finite (batch statistics), validation NaN (running statistics blown)."""
    from towerspace import data as datasets
    from towerspace.models import ModelConfig, build_model
    from towerspace.train import Diverged, TrainConfig, Trainer

    bundle = datasets.load(datasets.DataConfig(name="synthetic", num_samples=64, image_size=8))
    model = build_model(ModelConfig(width=0.125, middle_blocks=0, stem="small"), in_chans=3,
                        num_classes=10, image_size=8)  # fmt: skip
    trainer = Trainer(model, bundle, TrainConfig(epochs=2, batch_size=16, max_steps=1))
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_var.fill_(float("nan"))
    with pytest.raises(Diverged, match=r"^val_loss is nan at epoch 1$"):
        next(trainer.epochs())


def test_a_trial_whose_validation_turns_nan_is_recorded_as_diverged(tmp_path):
    """Through a real Trial and its record on disk (no Ray): diverged, not finished."""
    from towerspace import results
    from towerspace.trial import Trial

    sets = ["train.epochs=2", "train.max_steps=1", "model.width=0.125", "model.middle_blocks=1"]
    cfg = config.load_experiment(EXPERIMENT, sets)
    trial = Trial(cfg, seed=0, trial_id="t_00000", point={}, record_path=tmp_path / "t.json")
    for norm in (m for m in trial.model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_var.fill_(float("nan"))
    assert list(trial.epochs()) == []
    record = results.read_record(tmp_path / "t.json")
    assert record["status"] == "diverged" and record["error"] == "val_loss is nan at epoch 1"


def test_records_ray_never_saw_are_set_aside_on_resume_and_kept(tmp_path):
    from towerspace.results import ORPHANED, read_records
    from towerspace.sweep.state import set_aside_orphans

    records = tmp_path / "records"
    records.mkdir()
    shipped = sorted((REPO / "examples/digits_continuum/records").glob("*.json"))[0]
    record = json.loads(shipped.read_text())  # a real record, under other trial ids
    for trial_id in ("a_00000", "a_00001", "b_00002"):
        (records / f"{trial_id}.json").write_text(json.dumps({**record, "trial_id": trial_id}))
    assert set_aside_orphans(tmp_path) == []  # no saved state to read: nothing moves
    saved = ("a_00000", "a_00001")  # Ray's last save knew these two
    trials = [[json.dumps({"trial_id": t, "status": "RUNNING"}), "{}"] for t in saved]
    state = tmp_path / "experiment_state-2026-12-03_10-00-00.json"
    state.write_text(json.dumps({"trial_data": trials}))
    assert set_aside_orphans(tmp_path) == ["b_00002"]
    assert sorted(p.name for p in records.glob("*.json")) == ["a_00000.json", "a_00001.json"]
    kept = records / ORPHANED / "b_00002.json"
    assert json.loads(kept.read_text()) == {**record, "trial_id": "b_00002"}
    assert set_aside_orphans(tmp_path) == []  # once
    # a set-aside trial's Ray folder is not reported as a trial without a record
    (tmp_path / "run_trial_b_00002_1_x=1_2026-12-03_10-00-01").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["trial_id"] for r in read_records(tmp_path)] == ["a_00000", "a_00001"]


def test_a_trial_restored_after_its_last_epoch_still_reports_its_result(tmp_path):
    # a kill between a trial's last checkpoint and its final record: the resumed trial has no
    # epoch left to run, and Tune refuses a trial that ends without one result with the metric
    from ray.tune import Checkpoint

    from towerspace.sweep.trainable import _train
    from towerspace.trial import Trial

    cfg = config.load_experiment(EXPERIMENT, ["train.epochs=1", "train.max_steps=1",
                                              "model.width=0.125", "model.middle_blocks=1",
                                              "model.match=none"])  # fmt: skip
    (tmp_path / "records").mkdir()
    job = {"seed": 0, "trial_id": "t_00000", "point": {}, "origin": {},
           "record_path": tmp_path / "records" / "t_00000.json"}  # fmt: skip
    first, saved = [], tmp_path / "checkpoint"

    def keep(metrics, checkpoint=None):
        first.append(metrics)
        checkpoint.to_directory(str(saved))

    _train(Trial(cfg, **job), cfg, None, keep, Checkpoint)
    assert [m["epoch"] for m in first] == [1]
    again = []
    _train(Trial(cfg, **job), cfg, Checkpoint.from_directory(str(saved)),
           lambda metrics, checkpoint=None: again.append(metrics), Checkpoint)  # fmt: skip
    assert again == [first[0]]  # the last epoch's metrics, val_acc among them, reported once
    assert json.loads(job["record_path"].read_text())["status"] == "finished"
