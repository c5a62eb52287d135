"""The device check's CPU mode, end to end: every section runs (at toy sizes) and reports, so the
check cannot fail on a typo when a GPU is finally lent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.slow  # a subprocess with its own Ray, a sweep and a nested pytest
def test_the_device_check_runs_every_section_in_cpu_mode(tmp_path):
    done = subprocess.run([sys.executable, str(CHECK), str(tmp_path / "out"), "--cpu"],
                          capture_output=True, text=True, check=False, timeout=600)  # fmt: skip
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    sections = report["sections"]
    failed = {k: v.get("error") for k, v in sections.items() if v["status"] != "ok"}
    assert done.returncode == 0 and not failed, (failed, done.stderr[-2000:])
    assert list(sections) == ["environment", "gpu_tests", "models", "blocks", "estimate",
                              "packed_sweep", "compiled"]  # fmt: skip
    assert sections["environment"]["mode"] == "cpu" and sections["environment"]["torch"]
    tests = sections["gpu_tests"]
    assert tests["tests"] == tests["skipped"] > 40 and tests["failures"] == 0  # none ran on a CPU
    models = {r["model"]: r for r in sections["models"]["rows"]}
    assert len(models) == 6 and all(r["images_per_s"] > 0 for r in models.values())
    # params-matched: every tower count within 2% of depthwise's parameters
    depthwise = models["xception depthwise towers"]["params"]
    for towers in (8, 4, 1):
        assert models[f"xception {towers} towers"]["params"] == pytest.approx(depthwise, rel=0.02)
    blocks = sections["blocks"]
    assert {(r["C"], r["towers"]) for r in blocks["rows"] if r["auto_pick"]} == {
        (32, t) for t in (1, 2, 4, 8, 16, 32)} | {(16, t) for t in (1, 2, 4, 8, 16)}  # fmt: skip
    assert all(r["roof_efficiency"] > 0 for r in blocks["rows"])
    compiled = sections["compiled"]
    assert compiled["failed"] == 0 and all(r["compiled_ms"] > 0 for r in compiled["rows"])
    assert len(sections["estimate"]["rows"]) == 5  # inception_points: 1, 3, 4, 8, depthwise
    sweep = sections["packed_sweep"]
    assert sweep["statuses"] == {"finished": 4} and sweep["at_once"] >= 2
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown.startswith("# Device check (cpu)") and "## packed_sweep: ok" in markdown


def test_without_a_gpu_the_check_asks_for_cpu_mode(tmp_path):
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("a GPU is visible")
    done = subprocess.run([sys.executable, str(CHECK), str(tmp_path / "out")], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == ("gpu_check: no CUDA device is visible (allowed: a GPU, or "
                                   "--cpu for the CPU mode)")  # fmt: skip
    assert not (tmp_path / "out").exists()  # nothing written
