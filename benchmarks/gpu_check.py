"""The prepared device check: one command, at most 8 minutes on one GPU, no network.

Writes report.json (after every section, so a cut-off run keeps what it measured) and report.md
to OUT. Sections: the environment; `pytest -m gpu`; Xception's training throughput and peak
memory at 299 px (depthwise, 8, 4, 1 towers, params-matched; bf16, channels_last) against
torchvision's ResNet-50 and timm's legacy_xception; the block at Xception's shapes at every
power-of-2 tower count with each impl and auto (with roof efficiency); torch.compile of the
block; `towerspace estimate --measure` of imagenet_xception against its memory_mb_est; a 4-trial
fractional-GPU sweep on synthetic data. Exit 0 when no section failed, 1 otherwise.

    python benchmarks/gpu_check.py OUT          # on a machine with a GPU
    python benchmarks/gpu_check.py OUT --cpu    # every section on the CPU at toy sizes (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent

# per mode: the sizes each section runs at (cpu: a few seconds each, to catch typos, not speed)
SIZES = {
    "cuda": {
        "image": 299,
        "batch": 64,
        "impl": "auto",
        "towers": ["depthwise", 8, 4, 1],
        "width": 1.0,
        "middle": 8,
        "shapes": [(728, 19), (256, 74), (128, 147)],
        "block_batch": 32,
        "repeats": 3,
        "min_time": 0.05,
        "roof_batch": 32,
        "compile_backend": "inductor",
        "compile_shapes": [(728, 19)],  # each inductor compile of forward+backward takes ~20 s
        "steps": 5,
        "dtype": torch.bfloat16,
        "epochs": 2,
        "samples": 4096,
        "sweep_image": 32,
    },
    "cpu": {
        "image": 40,
        "batch": 2,
        "impl": "native",  # auto's timing of every layer shape takes seconds in bf16 on a CPU
        "towers": ["depthwise", 8, 4, 1],
        "width": 0.25,
        "middle": 1,
        "shapes": [(32, 8), (16, 12)],
        "block_batch": 4,
        "repeats": 1,
        "min_time": 0.002,
        "roof_batch": 1,
        "compile_backend": "aot_eager",
        "compile_shapes": [(32, 8), (16, 12)],
        "steps": 1,
        "dtype": torch.bfloat16,
        "epochs": 1,
        "samples": 64,
        "sweep_image": 16,
    },
}


def environment(ctx: dict) -> dict:
    """torch, CUDA, cuDNN, the GPU and its memory, the host."""
    from towerspace import __version__

    found = {
        "towerspace": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cpus": os.cpu_count(),
        "mode": ctx["mode"],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpus": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
        }
    return found


def gpu_tests(ctx: dict) -> dict:
    """tests/test_gpu.py for real (skipped, with the reason, on the CPU)."""
    xml = ctx["out"] / "gpu_tests.xml"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_gpu.py",
        f"--junitxml={xml}",
    ]
    done = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=ctx["budget"]["gpu_tests"],
    )
    import xml.etree.ElementTree as ET

    suite = ET.parse(xml).getroot().find("testsuite")
    failed = [
        f"{case.get('name')}: {(case[0].get('message') or '')[:300]}"
        for case in suite.iter("testcase")
        if len(case) and case[0].tag in ("failure", "error")
    ]
    found = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    found |= {
        "exit_code": done.returncode,
        "failed": failed,
        "summary": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "",
    }
    if done.returncode not in (0, 5) or failed:
        raise CheckFailed(f"{len(failed)} GPU tests failed", found)
    return found


def models(ctx: dict) -> dict:
    """Training images/s and peak memory: Xception (params-matched) vs ResNet-50 and timm."""
    import timm
    import torchvision

    from towerspace.data import DataSizes
    from towerspace.models.build import ModelConfig, build_model
    from towerspace.train import TrainConfig

    s, device = SIZES[ctx["mode"]], ctx["device"]
    recipe = TrainConfig(batch_size=s["batch"], lr=0.01, amp="bf16", channels_last="on")
    sizes = DataSizes(s["batch"], 0, 1000, 3, s["image"])
    rows = []
    for towers in s["towers"]:
        cfg = ModelConfig(
            width=s["width"],
            middle_blocks=s["middle"],
            stem="imagenet",
            towers=towers,
            match="params",
            impl=s["impl"],
        )
        model = build_model(cfg, in_chans=3, num_classes=1000, image_size=s["image"])
        rows.append({"model": f"xception {towers} towers", **_rate(model, recipe, sizes, ctx)})
    rows.append(
        {
            "model": "timm legacy_xception",
            **_rate(timm.create_model("legacy_xception"), recipe, sizes, ctx),
        }
    )
    rows.append(
        {
            "model": "torchvision resnet50",
            **_rate(torchvision.models.resnet50(), recipe, sizes, ctx),
        }
    )
    table = pd.DataFrame(rows)
    rate = table.set_index("model")["images_per_s"]
    return {
        "rows": rows,
        "device": device,
        "image": s["image"],
        "batch": s["batch"],
        "xception_over_resnet50": rate["xception depthwise towers"] / rate["torchvision resnet50"],
        "towerspace_over_timm": rate["xception depthwise towers"] / rate["timm legacy_xception"],
    }


def _rate(model, recipe, sizes, ctx: dict) -> dict:
    from towerspace.estimate import time_steps

    found = time_steps(
        model, recipe, sizes.train_images, sizes, ctx["device"], timed=SIZES[ctx["mode"]]["steps"]
    )
    found["params"] = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return found


def blocks(ctx: dict) -> dict:
    """The block at Xception's shapes: every power-of-2 tower count, each impl and auto."""
    from towerspace.impls import IMPLS
    from towerspace.profile import auto_choices, block_speed, machine_roofs, with_roof_efficiency

    s, device = SIZES[ctx["mode"]], ctx["device"]
    roofs = machine_roofs(device, s["dtype"], batch=s["roof_batch"])
    tables = []
    for channels, size in s["shapes"]:
        towers = powers_of_two(channels)
        table = block_speed(
            channels,
            size,
            batch=s["block_batch"],
            towers=towers,
            impls=sorted(IMPLS),
            channels_last=True,
            dtype=s["dtype"],
            device=device,
            repeats=s["repeats"],
            min_time=s["min_time"],
        )
        table = with_roof_efficiency(table, roofs)
        picks = auto_choices(
            channels,
            size,
            batch=s["block_batch"],
            towers=towers,
            device=device,
            repeats=s["repeats"],
            dtype=s["dtype"],
            channels_last=True,
        )
        table["auto_pick"] = table["towers"].map(picks) == table["impl"]
        tables.append(table.assign(C=channels, HW=size))
    table = pd.concat(tables, ignore_index=True)
    chosen = table[table["auto_pick"]]
    return {
        "roofs": roofs,
        "rows": table.drop(columns=["flops", "bytes"]).round(4).to_dict("records"),
        "lowest_auto_roof_efficiency": float(chosen["roof_efficiency"].min()),
        "auto_over_fastest_worst": float(_auto_over_fastest(table).max()),
    }


def powers_of_two(channels: int) -> list[int]:
    """1, 2, 4, ... dividing channels, and depthwise."""
    return sorted({*(2**i for i in range(channels.bit_length()) if channels % 2**i == 0), channels})


def _auto_over_fastest(table: pd.DataFrame) -> pd.Series:
    """Per (shape, towers): the time of auto's pick over the fastest impl's."""
    keys = ["C", "HW", "towers"]
    fastest = table.groupby(keys)["time_ms"].min()
    picked = table[table["auto_pick"]].set_index(keys)["time_ms"]
    return picked / fastest.loc[picked.index]


def compiled(ctx: dict) -> dict:
    """torch.compile of the block against eager, per shape and a few tower counts."""
    from towerspace import TowerConv2d
    from towerspace.timing import time_interleaved

    s, dev = SIZES[ctx["mode"]], torch.device(ctx["device"])
    rows = []
    for channels, size in s["compile_shapes"]:
        for towers in (1, 8, channels):
            block = TowerConv2d(channels, channels, towers=towers).to(dev, s["dtype"])
            block = block.to(memory_format=torch.channels_last)
            x = torch.randn(s["block_batch"], channels, size, size, device=dev, dtype=s["dtype"])
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
            row = {"C": channels, "HW": size, "towers": towers}
            try:
                fast = torch.compile(block, backend=s["compile_backend"])
                steps = {"eager": _step(block, x), "compiled": _step(fast, x)}
                steps["compiled"]()  # compiles
                times = time_interleaved(steps, dev, s["repeats"], s["min_time"])
                row |= {
                    "eager_ms": 1e3 * min(times["eager"]),
                    "compiled_ms": 1e3 * min(times["compiled"]),
                }
                row["speedup"] = row["eager_ms"] / row["compiled_ms"]
            except Exception as err:  # "where it works": a failure is a finding, not a stop
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            rows.append(row)
    return {
        "backend": s["compile_backend"],
        "rows": rows,
        "failed": sum("error" in r for r in rows),
    }


def _step(module, x):
    """A training step's forward and backward through module."""
    return lambda: module(x).sum().backward()


def _towerspace(args: list[str], ctx: dict, section: str) -> subprocess.CompletedProcess:
    """`towerspace ARGS` of this environment, in the report's folder, within a section's budget."""
    exe = str(Path(sys.executable).parent / "towerspace")
    return subprocess.run([exe, *args], cwd=ctx["out"], capture_output=True, text=True,
                          check=False, timeout=ctx["budget"][section])  # fmt: skip


def estimate(ctx: dict) -> dict:
    """`towerspace estimate imagenet_xception --measure` against its memory_mb_est."""
    out = ctx["out"] / "estimate.csv"
    argv = [
        "estimate",
        str(ROOT / "experiments/imagenet_xception.yaml"),
        "--measure",
        "--device",
        ctx["device"],
        "--train-images",
        "1281167",
        "--classes",
        "1000",
        "--out",
        str(out),
    ]
    if ctx["mode"] == "cuda":  # auto times every layer shape of 5 points first: >120 s on an H200
        argv.append("--set=model.impl=native")
    if ctx["mode"] == "cpu":  # toy sizes; native: auto times every layer shape first
        toy = [
            "data.image_size=40",
            "model.width=0.25",
            "model.middle_blocks=1",
            "train.batch_size=16",
            "model.impl=native",
        ]
        argv += [f"--set={x}" for x in toy]
    done = _towerspace(argv, ctx, "estimate")
    if done.returncode != 0:
        raise CheckFailed(f"estimate exit {done.returncode}: {done.stderr.strip()[-300:]}", {})
    table = pd.read_csv(out)
    found = {"printed": done.stdout, "rows": table.round(3).to_dict("records")}
    if "peak_memory_mb" in table:
        ratio = table["peak_memory_mb"] / table["memory_mb_est"]
        found |= {
            "measured_over_estimate_min": float(ratio.min()),
            "measured_over_estimate_max": float(ratio.max()),
        }
    return found


def packed_sweep(ctx: dict) -> dict:
    """4 trials of synthetic data, a quarter of the GPU each (half a CPU each on the CPU)."""
    from towerspace import results
    from towerspace.progress import most_at_once, trial_spans

    s = SIZES[ctx["mode"]]
    share = ["resources.gpus=0.25", "resources.cpus=2", "train.device=cuda"]
    if ctx["mode"] == "cpu":
        share = ["resources.gpus=0", "resources.cpus=0.5", "train.device=cpu"]
    sets = [
        "data.name=synthetic",
        f"data.num_samples={s['samples']}",
        f"data.image_size={s['sweep_image']}",
        "model.width=0.25",
        "model.middle_blocks=2",
        f"train.epochs={s['epochs']}",
        "train.batch_size=16",
        "seeds=[0]",
        *share,
        "space.params={model.towers: {grid: [1, 2, 4, depthwise]}}",
    ]
    argv = [
        "sweep",
        str(ROOT / "experiments/digits_continuum.yaml"),
        "--storage",
        str(ctx["out"] / "runs"),
        "--yes",
        *[f"--set={x}" for x in sets],
    ]
    done = _towerspace(argv, ctx, "packed_sweep")
    sweep_dir = ctx["out"] / "runs" / "digits_continuum"
    found = {"exit_code": done.returncode, "printed": done.stdout[-2000:]}
    if done.returncode != 0:
        raise CheckFailed(f"sweep exit {done.returncode}: {done.stderr.strip()[-300:]}", found)
    table = results.load(sweep_dir)
    found |= {
        "statuses": table["status"].value_counts().to_dict(),
        "at_once": most_at_once(trial_spans(results.read_records(sweep_dir)).values()),
        "peak_memory_mb": table.set_index("towers")["peak_memory_mb"].round(1).to_dict(),
        "images_per_s": table.set_index("towers")["images_per_s"].round(1).to_dict(),
    }
    return found


class CheckFailed(RuntimeError):
    """A section ran and found something wrong; figures says what it measured anyway."""

    def __init__(self, message: str, figures: dict) -> None:
        super().__init__(message)
        self.figures = figures


SECTIONS = {
    "environment": environment,
    "gpu_tests": gpu_tests,
    "models": models,
    "blocks": blocks,
    "estimate": estimate,
    "packed_sweep": packed_sweep,
    "compiled": compiled,  # last: inductor's compiles take the longest and matter least
}
BUDGET_S = {"gpu_tests": 240, "estimate": 150, "packed_sweep": 150}  # subprocess timeouts


def run(out: Path, mode: str, skip: list[str]) -> dict:
    """Every section in turn; the report is rewritten after each one."""
    device = "cuda" if mode == "cuda" else "cpu"
    ctx = {"out": out, "mode": mode, "device": device, "budget": BUDGET_S}
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": mode, "sections": {}}
    for name, section in SECTIONS.items():
        start = time.perf_counter()
        entry: dict = {"status": "skipped", "reason": "--skip"} if name in skip else {}
        if not entry:
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            try:
                entry = {"status": "ok", **section(ctx)}
            except CheckFailed as err:
                entry = {"status": "failed", "error": str(err), **err.figures}
            except Exception as err:
                entry = {
                    "status": "failed",
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc()[-3000:],
                }
        entry["seconds"] = round(time.perf_counter() - start, 1)
        report["sections"][name] = entry
        print(
            f"    {entry['status']} in {entry['seconds']} s"
            f"{': ' + entry['error'] if 'error' in entry else ''}",
            flush=True,
        )
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    """The report for people: one heading per section, its figures and tables."""
    lines = [f"# Device check ({report['mode']}), {report['started']}", ""]
    for name, entry in report["sections"].items():
        lines += [f"## {name}: {entry['status']} ({entry['seconds']} s)", ""]
        if "error" in entry:
            lines += [f"    {entry['error']}", ""]
        for key, value in entry.items():
            if key in ("status", "seconds", "error", "traceback", "printed"):
                continue
            if key == "rows" and value:
                table = pd.DataFrame(value).to_string(index=False, float_format="{:.4g}".format)
                lines += ["```", table, "```", ""]
            else:
                lines.append(f"- {key}: {value}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for report.json, report.md and logs")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="every section on the CPU at toy sizes, skipping what needs CUDA",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=sorted(SECTIONS),
        help="sections to leave out (default: none)",
    )
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible (allowed: a GPU, or --cpu for the CPU mode)",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args.out.resolve(), "cpu" if args.cpu else "cuda", args.skip)
    failed = [n for n, e in report["sections"].items() if e["status"] == "failed"]
    print(f"wrote {args.out}/report.md and report.json; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
