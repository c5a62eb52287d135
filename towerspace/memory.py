"""Peak memory of a stretch of work: CUDA's allocator statistics, or the process's peak RSS."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import resource
import sys
from collections.abc import Callable
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
    return _mb(device, torch.cuda.max_memory_allocated, "VmHWM", _peak_rss_mb)


def now_mb(device: torch.device) -> float:
    """Memory held now, MiB: CUDA allocations, or the RSS on a CPU (NaN without /proc)."""
    return _mb(device, torch.cuda.memory_allocated, "VmRSS", lambda: math.nan)


def _mb(
    device: torch.device, cuda_bytes: Callable[[torch.device], int], field: str,
    fallback: Callable[[], float],
) -> float:  # fmt: skip
    """MiB: cuda_bytes(device) on a GPU, else a /proc/self/status field, else fallback()."""
    if device.type == "cuda":
        return cuda_bytes(device) / 2**20
    try:
        return _status_kb(field) / 1024
    except (OSError, KeyError):
        return fallback()


def _peak_rss_mb() -> float:
    """The process's peak RSS since it started, MiB (getrusage: where /proc is missing)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


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


def machine_bytes() -> int | None:
    """This machine's memory, or its cgroup's limit when lower (None where unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    return total


def gpu_bytes() -> int | None:
    """The first visible GPU's memory (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def words(num_bytes: float) -> str:
    """A size in words: '512 MiB', '23.4 GiB', '72.0 TiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes / 2**10:.0f} KiB"
