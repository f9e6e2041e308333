"""Several processes (TPU pod slices, GPU clusters): JAX's own distributed runtime, nothing home-made."""
from __future__ import annotations

import logging
import os

import jax
import numpy as np

from flax_bert.errors import InputError

log = logging.getLogger(__name__)

# When a process dies, JAX's coordination service notices the missing heartbeats and terminates every
# other process ("Terminating process because the JAX distributed service detected fatal errors ...
# another task died"), so nobody hangs in a collective forever. It waits this long (JAX's default is
# 100 s); a shorter wait stops a broken job sooner but risks killing a healthy one on a flaky network.
HEARTBEAT_TIMEOUT_VARIABLE = "FLAX_BERT_HEARTBEAT_TIMEOUT_SECONDS"


def heartbeat_timeout_seconds() -> int | None:
    """The heartbeat timeout from the environment, or None for JAX's default."""
    value = os.environ.get(HEARTBEAT_TIMEOUT_VARIABLE, "").strip()
    if not value:
        return None
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise InputError(f"{HEARTBEAT_TIMEOUT_VARIABLE}={value!r} is not a whole number of seconds >= 1: "
                         "set e.g. 60, or unset it for JAX's default of 100")
    return seconds


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
    heartbeat = heartbeat_timeout_seconds()
    options = {} if heartbeat is None else {"heartbeat_timeout_seconds": heartbeat}
    if explicit:
        if run.coordinator_address is None or run.num_processes is None or run.process_id is None:
            raise InputError("multi-process runs need --coordinator_address, --num_processes and --process_id together")
        jax.distributed.initialize(run.coordinator_address, run.num_processes, run.process_id, **options)
    else:
        jax.distributed.initialize(**options)  # cluster auto-detection (TPU metadata, SLURM)
    log.info("process %d of %d joined; %d local and %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def settle_before_host_collectives(outputs) -> None:
    """With several processes on CPU, wait until every local device has finished the program that made `outputs`
    (a no-op elsewhere). XLA:CPU's gloo collectives carry no tag, and its client starts the next program with
    collectives once one device of the previous one has finished: a collective fed from the host (the stop flag's
    all-reduce, a barrier, Orbax's save barriers) dispatched right after a step could otherwise meet the step's
    last collective on another device, and gloo aborts ("Received data size doesn't match expected size").
    TPUs and GPUs run each device's programs in order."""
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        jax.block_until_ready(outputs)


def barrier(name: str) -> None:
    """All processes reach this point before any goes on (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_sum(value: int) -> int:
    """The sum of ``value`` (< 2**31 per process) over all processes (itself for one process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(value, np.int32))
    return int(np.sum(np.asarray(gathered, np.int64)))


def process_sum_array(values: np.ndarray) -> np.ndarray:
    """The element-wise sum of ``values`` (int64, the same shape on every process) over all processes."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64))).sum(axis=0)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one."""
    return process_sum(int(bool(flag))) > 0


def all_processes(ok: bool) -> bool:
    """True on every process when ``ok`` is true on all of them (a blocking all-gather: for rare decisions such as
    a restore)."""
    return not any_process(not ok)
