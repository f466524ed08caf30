"""Multi-process (multi-host) start-up and helpers.

``initialize()`` picks, in order: explicit arguments (or ``REASONEMBED_COORDINATOR``,
``REASONEMBED_NUM_PROCESSES``, ``REASONEMBED_PROCESS_ID``), then the cluster environments JAX
detects by itself (Cloud TPU pods, SLURM with more than one task), else a single process.
Each process then feeds only its own rows (the data pipeline slices by ``jax.process_index()``)
and the global arrays are assembled with ``make_array_from_process_local_data``.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

log = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def cluster_detected() -> str | None:
    """The name of a multi-process environment JAX can initialise from on its own.
    ``REASONEMBED_AUTO_DISTRIBUTED=1`` (set by ``launch/tpu_pod.sh``) forces detection."""
    if os.environ.get("REASONEMBED_AUTO_DISTRIBUTED") == "1":
        return "auto"
    if _env_int("SLURM_NTASKS") and _env_int("SLURM_NTASKS") > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
        if "," in hosts:
            return "tpu"
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts ``jax.distributed`` when there is more than one process; returns whether it did.

    Must run before anything touches a JAX device.
    """
    coordinator_address = coordinator_address or os.environ.get("REASONEMBED_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int(
        "REASONEMBED_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("REASONEMBED_PROCESS_ID")
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id too")
        if num_processes == 1:
            return False
        if "cpu" in platforms or not platforms:
            # CPU devices of different processes talk through gloo (ignored on GPU/TPU).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif cluster_detected():
        kind = cluster_detected()
        log.info("initialising jax.distributed from the %s environment", kind)
        jax.distributed.initialize()
    else:
        return False
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of ``x`` as numpy on every process (a collective when ``x`` spans
    processes: every process must call it)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_primary() -> bool:
    return jax.process_index() == 0
