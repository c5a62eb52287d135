"""The Ray cluster of a sweep: starting or joining it, and what its trials may reserve there."""

from __future__ import annotations

import logging
import os
import socket
import time

import ray
import torch

from towerspace import storage as storage_lib
from towerspace.config import ExperimentConfig
from towerspace.errors import ConfigError

DRIVER_MEMORY = 256 * 2**20  # bytes Tune reserves for a data-parallel trial's driver
AUTH_MODE = "RAY_AUTH_MODE"  # Ray's token authentication: "token" or "disabled"
ADDRESS_WAIT_S = 10.0  # --address: how long to wait for a Ray head to answer


def init_ray(address: str | None) -> None:
    """Connect to a Ray cluster (address or RAY_ADDRESS), or start a local one on this machine."""
    if ray.is_initialized():
        return
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # a stopped sweep's trials end in errors Tune already handled (and towerspace recorded):
    # Ray would print each again with its traceback as "unhandled"
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    # Tune's console output engine prints a banner even at verbose=0, pointing TensorBoard at
    # a staging copy under /tmp/ray; the sweep folder holds the event files (the CLI says so
    # at the end). The legacy engine (a documented switch) prints nothing at verbose=0
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    quiet = {"log_to_driver": False, "configure_logging": True, "logging_level": "warning"}
    if address or os.environ.get("RAY_ADDRESS"):
        check_address(
            address or os.environ["RAY_ADDRESS"], "--address" if address else "RAY_ADDRESS"
        )
        ray.init(address=address, **quiet)
    else:
        _token_auth_for_local_ray()
        ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(),
                 include_dashboard=False, **quiet)  # fmt: skip
    for handler in logging.getLogger("ray").handlers:
        handler.addFilter(_disk_full_in_one_line)


def _token_auth_for_local_ray() -> None:
    """Token authentication for the local Ray this driver starts, asked for explicitly.

    Ray (2.59 on) turns it on for a cluster that ray.init() starts, with a warning on every start
    unless RAY_AUTH_MODE is set: set to what Ray chooses anyway, it keeps the security and drops
    the warning. A RAY_AUTH_MODE the user set is kept; a cluster joined by address is Ray's
    and the user's to configure.
    """
    if AUTH_MODE in os.environ:
        return
    os.environ[AUTH_MODE] = "token"
    # Ray read its settings when imported: read them again, as Ray does when it turns token
    # authentication on itself (ray._private.authentication.authentication_token_setup)
    from ray._raylet import Config

    Config.initialize("")


def _disk_full_in_one_line(record: logging.LogRecord) -> bool:
    """Ray's log lines about a full disk without their tracebacks: the sweep stops and says so."""
    if record.exc_info and storage_lib.disk_full(record.exc_info[1]):
        record.msg, record.args = f"{record.getMessage().strip()} {storage_lib.NO_SPACE}", ()
        record.exc_info = record.exc_text = None
    return True


def check_address(address: str, what: str = "--address", wait_s: float | None = None) -> None:
    """Refuse a Ray address where nothing answers, after a bounded wait (ray.init would retry
    for minutes; default ADDRESS_WAIT_S). 'auto' and 'local' are Ray's to resolve."""
    if address in ("auto", "local"):
        return
    wait_s = ADDRESS_WAIT_S if wait_s is None else wait_s
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{what} {address}: not allowed; allowed: HOST:PORT of a Ray head, "
                          f"ray://HOST:PORT (Ray Client), auto")  # fmt: skip
    deadline, problem = time.monotonic() + wait_s, "no answer"
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                return
        except OSError as err:
            problem = err.strerror or type(err).__name__
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise ConfigError(f"{what} {address}: nothing answers there after {wait_s:g} s ({problem}); "
                      f"start the cluster (ray start --head) or check the address")  # fmt: skip


def check_resources(cfg: ExperimentConfig) -> None:
    """Refuse a sweep whose trials can never be placed (Ray would wait forever)."""
    available = ray.cluster_resources()
    workers = cfg.resources.workers
    for field, key in (("cpus", "CPU"), ("gpus", "GPU")):
        asked = getattr(cfg.resources, field)
        if asked * workers > available.get(key, 0):
            hint = " (--set resources.gpus=0 runs on CPU)" if key == "GPU" else ""
            each = f"{asked:g} per worker x {workers} workers" if workers > 1 else f"{asked:g}"
            raise ConfigError(
                f"{cfg.source}: resources.{field}: {each} per trial, but the Ray cluster has "
                f"{available.get(key, 0):g}{hint}"
            )


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What Tune reserves for a trial: its resources, or for a data-parallel trial only its
    driver's memory (Ray Train reserves the workers' CPUs and GPUs itself; a CPU held by
    the driver could leave the workers waiting for it forever)."""
    if cfg.resources.workers > 1:
        return {"memory": DRIVER_MEMORY}
    return {"cpu": cfg.resources.cpus, "gpu": cfg.resources.gpus}


def max_concurrent(cfg: ExperimentConfig) -> int:
    """Trials that fit on the cluster at once (0: Tune decides, from the trials' resources).

    Data-parallel trial drivers reserve nothing, so without a cap Tune would start every
    trial and leave their worker groups queueing for the same resources.
    """
    res = cfg.resources
    if res.workers == 1:
        return 0
    available = ray.cluster_resources()
    fits = [available.get("CPU", 0) // (res.cpus * res.workers)]
    if res.gpus:
        fits.append(available.get("GPU", 0) // (res.gpus * res.workers))
    return max(1, int(min(fits)))
