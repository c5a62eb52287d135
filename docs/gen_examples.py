"""Rerun the default demo (`make run`'s sweep) and ship what it wrote as examples/digits_continuum/:
its printed output, trial records, tables and figures; then re-execute the analysis notebook on
it. About 8 minutes on 2 CPUs. `make docs-examples` runs this, then `make docs`, which copies
excerpts of the output into the README and the docs (docs/gen_reference.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digits_continuum"
OUTPUT = "output.txt"  # what the sweep printed, as a user sees it
SHIPPED = ("records", "results.parquet", "history.parquet")


def run_demo(work: Path) -> str:
    """The demo sweep, run from a fresh folder as `towerspace sweep` from the README; its stdout."""
    exe = Path(sys.executable).parent / "towerspace"
    argv = [str(exe), "sweep", str(ROOT / "experiments/digits_continuum.yaml"), "--yes"]
    done = subprocess.run(argv, cwd=work, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the demo failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def ship(sweep_dir: Path, output: str) -> None:
    """Replace examples/digits_continuum/ with the new run's records, tables, figures, output."""
    for name in (*SHIPPED, "plots"):
        target = EXAMPLE / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for name in SHIPPED:
        source = sweep_dir / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, EXAMPLE / name)
    (EXAMPLE / "plots").mkdir()
    for png in sorted((sweep_dir / "plots").glob("*.png")):
        shutil.copy2(png, EXAMPLE / "plots" / png.name)
    (EXAMPLE / OUTPUT).write_text(output)


def run_notebook(name: str = "continuum_analysis.ipynb") -> None:
    """Execute a notebook in place (it reads examples/digits_continuum/ by default)."""
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()  # fmt: skip
    nbformat.write(nb, path)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        output = run_demo(Path(tmp))
        ship(Path(tmp) / "runs" / "digits_continuum", output)
    run_notebook()
    print(f"wrote {EXAMPLE.relative_to(ROOT)}/ and re-ran notebooks/continuum_analysis.ipynb")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
