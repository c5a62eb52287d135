"""Rerun the sweeps whose output the docs show and ship what they wrote: the default demo
(`make run`'s sweep) as examples/digits_continuum/ (its printed output, `towerspace status` after
it, trial records, tables and figures; the analysis notebook is re-executed on it), and in
examples/outputs/ the outputs of the ResNet-18 sweep, of a sweep started from depthwise weights,
of the latency-aware per-flow search (with its accuracy/latency figure) and of the residual
ablation's smoke run. About 25 minutes on 2 CPUs; `python docs/gen_examples.py latency` reruns
one part (parts: demo, resnet, init_from, latency, residual). `make docs-examples` runs all,
then `make docs`, which copies the outputs into the README and the docs
(docs/gen_reference.py)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digits_continuum"
OUTPUT = "output.txt"  # what the sweep printed, as a user sees it
OUTPUTS = ROOT / "examples" / "outputs"  # other commands' outputs: "$ command", then its output
TINY = ["--set", "model.match=none", "--set", "model.width=0.125", "--set", "model.middle_blocks=1",
        "--set", "train.epochs=1", "--set", "seeds=[0]",
        "--set", "space.params={model.towers: {grid: [1, 4, depthwise]}}"]  # fmt: skip
SHIPPED = ("records", "results.parquet", "history.parquet")


def towerspace(work: Path, *args: str) -> str:
    """`towerspace ARGS` in the folder work (experiments/ beside it); its stdout."""
    (work / "experiments").exists() or (work / "experiments").symlink_to(ROOT / "experiments")
    exe = Path(sys.executable).parent / "towerspace"
    done = subprocess.run([str(exe), *args], cwd=work, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"towerspace {' '.join(args)} failed (exit {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")  # fmt: skip
    return done.stdout


def shown(args: list[str]) -> str:
    """A command line as a user types it."""
    return "$ towerspace " + " ".join(shlex.quote(a) for a in args)


def run_demo(work: Path) -> str:
    """The demo sweep, run from a fresh folder as `towerspace sweep` from the README; its stdout."""
    return towerspace(work, "sweep", "experiments/digits_continuum.yaml", "--yes")


def run_init_from(work: Path) -> str:
    """A small sweep whose every point starts from one depthwise state dict (random weights)."""
    import torch

    from towerspace import config
    from towerspace.models.build import build_model

    cfg = config.load_experiment(ROOT / "experiments/digits_continuum.yaml", [
        "model.match=none", "model.width=0.125", "model.middle_blocks=1",
        "model.towers=depthwise"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model, in_chans=1, num_classes=10, image_size=16)
    torch.save(model.state_dict(), work / "depthwise.pt")
    args = ["sweep", "experiments/digits_continuum.yaml", "--set", "model.init_from=depthwise.pt",
            *TINY]  # fmt: skip
    return f"{shown(args)}\n{towerspace(work, *args)}"


LATENCY = ["sweep", "experiments/digits_continuum.yaml", "--set", "space=per_flow_latency",
           "--set", "seeds=[0]", "--set", "train.epochs=8", "--yes"]  # fmt: skip


def run_latency(work: Path) -> None:
    """The per-flow space searched for accuracy and measured step time on this machine: its
    output, and its accuracy/latency figure."""
    printed = towerspace(work, *LATENCY)
    (OUTPUTS / "per_flow_latency.txt").write_text(f"{shown(LATENCY)}\n{printed}")
    figure = work / "runs" / "digits_continuum" / "plots" / "pareto_latency.png"
    shutil.copy2(figure, OUTPUTS / "per_flow_latency.png")


def run_residual(work: Path) -> None:
    """The residual ablation's smoke run: with and without shortcuts, at both ends."""
    args = ["sweep", "experiments/cifar10_residual.yaml", "--smoke"]
    (OUTPUTS / "residual_smoke.txt").write_text(f"{shown(args)}\n{towerspace(work, *args)}")


def run_demo_parts(work: Path) -> None:
    """The demo, shipped, with `towerspace status` after it; the notebook re-run on it."""
    output = run_demo(work)
    status = towerspace(work, "status", "runs/digits_continuum")
    ship(work / "runs" / "digits_continuum", output)
    (EXAMPLE / "status.txt").write_text(f"$ towerspace status runs/digits_continuum\n{status}")
    run_notebook()


def run_resnet(work: Path) -> None:
    """The ResNet-18 sweep's output."""
    resnet = ["sweep", "experiments/digits_resnet18.yaml", "--yes"]
    printed = towerspace(work, *resnet)
    (OUTPUTS / "digits_resnet18.txt").write_text(f"{shown(resnet)}\n{printed}")


PARTS = {
    "demo": run_demo_parts,
    "resnet": run_resnet,
    "init_from": lambda work: (OUTPUTS / "init_from.txt").write_text(run_init_from(work)),
    "latency": run_latency,
    "residual": run_residual,
}


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


def main(argv: list[str] | None = None) -> int:
    parts = (argv if argv is not None else sys.argv[1:]) or list(PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown parts: {', '.join(unknown)} (parts: {', '.join(PARTS)})")
    OUTPUTS.mkdir(exist_ok=True)
    for part in parts:
        with tempfile.TemporaryDirectory() as tmp:  # each part in a fresh folder
            PARTS[part](Path(tmp))
        print(f"ran {part}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
