"""Peak memory of a stretch of work: CUDA's allocator statistics, or the process's peak RSS."""

from __future__ import annotations

import contextlib
import ctypes
import math
import resource
import sys
from pathlib import Path

import torch

CLEAR_REFS, PROC_STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")  # Linux


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or (Linux) the process's peak RSS.

    Processes are reused (a sweep's trial workers, a profiler's rounds), so without a reset one
    stretch's peak would carry into the next.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_free_memory()  # else pages freed earlier, still resident, would count as the peak
    with contextlib.suppress(OSError):  # elsewhere the peak is the process's since it started
        CLEAR_REFS.write_text("5")  # Linux >= 4.0: the peak RSS (VmHWM) becomes the RSS now


def peak_mb(device: torch.device) -> float:
    """Peak memory since reset_peak(), MiB: CUDA allocations, or the peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return _status_kb("VmHWM") / 1024
    except (OSError, KeyError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def now_mb(device: torch.device) -> float:
    """Memory held now, MiB: CUDA allocations, or the RSS on a CPU (NaN without /proc)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        return _status_kb("VmRSS") / 1024
    except (OSError, KeyError):
        return math.nan


def release_free_memory() -> None:
    """Hand free heap pages back to the OS where glibc allows it, so that a peak measured next
    sees new allocations rather than pages the allocator kept (no gc: ~70 ms a call)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _status_kb(field: str) -> int:
    """A kB field of /proc/self/status, e.g. VmRSS or VmHWM."""
    lines = PROC_STATUS.read_text().splitlines()
    values = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(values[field].split()[0])
