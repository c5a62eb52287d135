"""A sweep folder received from someone else is read as data: mistyped records, links, special
files, damaged tables and read-only folders are skipped or refused, never crashed on or written
through (a copy of the session's real tiny sweep)."""

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from towerspace import results
from towerspace.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture
def received(tiny_sweep, tmp_path) -> Path:
    """A copy of a real finished sweep (6 trials), as if sent by someone else."""
    folder = tmp_path / "received"
    shutil.copytree(tiny_sweep.sweep_dir, folder, ignore=shutil.ignore_patterns("driver.lock"))
    return folder


def _records(folder: Path) -> list[Path]:
    return sorted((folder / "records").glob("*.json"))


def _edit(path: Path, **fields) -> None:
    record = json.loads(path.read_text())
    record.update(fields)
    path.write_text(json.dumps(record))


def test_records_with_missing_or_mistyped_fields_are_skipped_naming_file_and_field(
    received, capsys
):
    paths = _records(received)
    _edit(paths[0], seed="zero")
    _edit(paths[1], history=[{"epoch": 1, "val_acc": "high"}])
    record = json.loads(paths[2].read_text())
    del record["towers"]
    paths[2].write_text(json.dumps(record))
    assert main(["plot", str(received)]) == 0
    err = capsys.readouterr().err
    warning = err.splitlines()[0]
    assert warning == (
        f"towerspace: warning: skipped damaged trial records: "
        f"records/{paths[0].name} (field 'seed': expected an integer, got 'zero'); "
        f"records/{paths[1].name} (field 'history[0]': expected a mapping of numbers); "
        f"records/{paths[2].name} (field 'towers': missing (required))"
    )
    assert "Traceback" not in err
    table = results.load(received / "results.parquet")
    assert len(table) == 3 and set(table["status"]) == {"finished"}
    assert (received / "plots" / "continuum.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "value", [None, 1.5, [1], {"a": 1}, True], ids=["null", "float", "list", "dict", "bool"]
)
def test_every_wrong_type_of_a_required_field_is_a_skip_not_a_crash(received, value):
    path = _records(received)[0]
    _edit(path, trial_id=value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = results.load(received)
    assert len(table) == 5
    (message,) = [str(w.message) for w in caught if w.category is results.DamagedRecord]
    assert f"records/{path.name} (field 'trial_id': expected a string, got " in message


def test_links_and_special_files_in_records_are_skipped_never_followed(received, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(_records(received)[0], outside)
    _records(received)[0].unlink()
    (received / "records" / "linked.json").symlink_to(outside)
    os.mkfifo(received / "records" / "pipe.json")  # a reader that opened it would block
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = results.load(received)
    assert len(table) == 5
    (message, missing) = [str(w.message) for w in caught if w.category is results.DamagedRecord]
    assert message == (
        "skipped damaged trial records: records/linked.json (a link, not read); "
        "records/pipe.json (not a regular file, not read)"
    )
    assert missing.startswith("no record for trials: ")  # its trial folder is still there


@pytest.mark.parametrize("target", ["results.parquet", "plots/continuum.png"])
def test_nothing_is_written_through_a_link_in_the_folder(received, tmp_path, target, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    (received / target).parent.mkdir(exist_ok=True)
    (received / target).unlink(missing_ok=True)
    (received / target).symlink_to(victim)
    assert main(["plot", str(received)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"towerspace: error: {received / target}: not written: it is a link (nothing in "
        f"{received} is written through a link)\n"
    )
    assert victim.read_text() == "not yours"


def test_a_linked_plots_folder_is_not_written_through(received, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (received / "plots").symlink_to(elsewhere)
    assert main(["plot", str(received)]) == 2
    assert "it is a link" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_results_table_is_rebuilt_from_the_records(received, damage):
    for name in ("results.parquet", "history.parquet"):
        path = received / name
        path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:200])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = results.load(received / "results.parquet")
        history = results.load_history(received / "history.parquet")
    assert len(table) == 6 and set(table["status"]) == {"finished"}
    assert len(history) == 6 and set(history["epoch"]) == {1}
    notes = [str(w.message) for w in caught if w.category is results.DamagedRecord]
    assert len(notes) == 2 and all("rebuilt from records/" in n for n in notes)


@pytest.fixture
def read_only(received, tmp_path, tmpfs):
    """The received sweep on a read-only file system (root ignores permission bits)."""
    with tmpfs(tmp_path / "ro", "16m") as mount:
        shutil.copytree(received, mount / "sweep", symlinks=True)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount / "sweep"


def test_a_read_only_folder_is_refused_in_one_line_or_plotted_elsewhere(
    read_only, tmp_path, capsys
):
    before = sorted(p.name for p in read_only.rglob("*"))
    assert main(["plot", str(read_only)]) == 2
    assert capsys.readouterr().err == (
        f"towerspace: error: {read_only}: not writable; pass --out FOLDER to write the tables "
        f"and figures elsewhere\n"
    )
    out_dir = tmp_path / "mine"
    assert main(["plot", str(read_only), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert f"results: {out_dir / 'results.parquet'}" in out
    assert len(results.load(out_dir / "results.parquet")) == 6
    assert (out_dir / "plots" / "continuum.png").stat().st_size > 10_000
    assert sorted(p.name for p in read_only.rglob("*")) == before


def test_status_reads_a_read_only_folder(read_only, capsys):
    assert main(["status", str(read_only)]) == 0
    assert capsys.readouterr().out.startswith("digits_continuum: 6 trials: 6 finished\n")
