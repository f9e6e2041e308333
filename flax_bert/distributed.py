"""Several processes (TPU pod slices, GPU clusters): JAX's own distributed runtime, nothing home-made."""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _environment_says_multiprocess() -> bool:
    """TPU VMs (pod slices learn their workers from the TPU metadata, which jax.distributed reads),
    GKE and SLURM jobs describe their processes in the environment."""
    if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):  # a TPU VM: initialize() finds the slice
        return True
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in tpu_hosts.split(",") if h]) > 1:
        return True
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return True
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(run) -> None:
    """Join the other processes when there are several; a single process does nothing."""
    explicit = run.coordinator_address is not None or (run.num_processes or 1) > 1
    if not explicit and not _environment_says_multiprocess():
        return
    if jax.distributed.is_initialized():
        return
    # CPU collectives across processes need gloo; the setting does not touch GPU/TPU backends, and
    # asking which backend runs here would start it before initialize(), which JAX forbids.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        if run.coordinator_address is None or run.num_processes is None or run.process_id is None:
            raise ValueError("multi-process runs need --coordinator_address, --num_processes and --process_id together")
        jax.distributed.initialize(run.coordinator_address, run.num_processes, run.process_id)
    else:
        jax.distributed.initialize()  # cluster auto-detection (TPU metadata, SLURM)
    log.info("process %d of %d joined; %d local and %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def barrier(name: str) -> None:
    """All processes reach this point before any goes on (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
