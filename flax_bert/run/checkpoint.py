"""Checkpoints: one Orbax bundle per step, written asynchronously, restored (the newest intact one) onto any mesh.
This module writes them and is the one door to them (Checkpointer); which one to restore and what is damaged is
flax_bert.run.checkpoint_search, restoring one bundle flax_bert.run.checkpoint_restore. The resume order and the
output-directory guard live in flax_bert.run.start, signals in flax_bert.training.preemption; all are re-exported.

OUTPUT_DIR/checkpoints/STEP holds four items:
  state   the TrainState (step, params, optimizer state): sharded arrays, written by every process
  data    the data iterator's state_dict()
  config  the run configuration the caller passes (secrets already dropped)
  meta    step, the run seed's RNG key data, eval metrics, when and on how many devices it was saved
Orbax writes a bundle into STEP.orbax-checkpoint-tmp-* and renames it once every item is complete, so
a folder named by a bare step number is whole; a kill mid-save leaves only the tmp folder, which is
never read and is removed by the next run.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from flax_bert.run.checkpoint_restore import (CheckpointMismatchError, Restored, abstract_leaf, local_scalar,
                                              restore_bundle, restore_params_only)
from flax_bert.run.checkpoint_search import candidates, first_intact, move_aside
from flax_bert.training.distributed import barrier
from flax_bert.training.preemption import AnyProcess, PreemptionGuard
# the run directory's layout and start rules live in run.layout / run.start; re-exported so that
# `flax_bert.run.checkpoint` stays the one import for checkpoint users
from flax_bert.run.layout import (CHECKPOINTS, DAMAGED, OWNED_ENTRIES, RUN_CONFIG_FILE, SUPERSEDED, complete_steps,
                                  locate_checkpoints, orbax_path)
from flax_bert.run.start import (RUN_IDENTITY_KEYS, DamagedCheckpointError, OutputDirError, StartPoint,
                                 check_output_dir, claim_written, jsonable, record_run_config, resolve_start)

__all__ = ["CHECKPOINTS", "DAMAGED", "ITEMS", "OWNED_ENTRIES", "RUN_CONFIG_FILE", "RUN_IDENTITY_KEYS", "SUPERSEDED",
           "CheckpointMismatchError", "Checkpointer", "DamagedCheckpointError", "OutputDirError", "PreemptionGuard",
           "Restored", "StartPoint", "check_output_dir", "claim_written", "complete_steps", "locate_checkpoints", "record_run_config",
           "resolve_start"]

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config", "meta")
# An array replicated over R devices is written by all R, a 1/R slice each, only when each slice holds at least
# this many bytes. Orbax slices every replicated array by default, and each slice of a new shape or offset is a
# small program compiled at the first save: on 8 CPU devices that was 2.4 s of a tiny run's 10.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def _write_small_arrays_from_one_replica() -> None:
    """Orbax's handler for jax.Array is chosen from its global registry (StandardSave takes no handler), so the
    threshold is set there; it changes who writes an array, not what is written."""
    from orbax.checkpoint._src.metadata.array_metadata_store import Store  # the default handler's own store

    handler = ocp.type_handlers.ArrayHandler(array_metadata_store=Store(),
                                             min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


# ----------------------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Saves bundles into OUTPUT_DIR/checkpoints asynchronously and restores the newest intact one."""

    def __init__(self, output_dir, *, save_steps: int = 500, save_minutes: float | None = None,
                 save_total_limit: int = 3, keep_best: bool = False, async_save: bool = True,
                 read_only: bool = False, checkpoint_dir=None):
        self.output_dir = orbax_path(output_dir)
        self.directory = orbax_path(checkpoint_dir) if checkpoint_dir else self.output_dir / CHECKPOINTS
        self.save_steps, self.save_minutes = save_steps, save_minutes
        self.keep_best, self.read_only = keep_best, read_only
        self.default_step: int | None = None        # for_path(".../checkpoints/STEP") restores STEP by default
        self.damaged: list[tuple[str, str]] = []    # (path, reason) of checkpoints the last restore skipped
        self.last_save_blocked_seconds = 0.0         # how long the caller waited in the last save()
        self._saved: set[int] = set()
        self._decision: tuple[int, bool] | None = None
        self._stale_checked = False
        self._last_save = time.monotonic()
        self._time_due = AnyProcess()
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        else:
            _write_small_arrays_from_one_replica()
            if jax.process_index() == 0:  # a run's output_dir records the checkpoints folder as written
                claim_written(str(self.directory.parent), self.directory.name)
            keep = [policies.LatestN(n=save_total_limit)]
            if keep_best:  # lowest eval_loss among the checkpoints saved with eval metrics
                keep.append(policies.BestN(get_metric_fn=_eval_loss, reverse=True, n=1,
                                           keep_checkpoints_without_metrics=False))
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policies.AnyPreservationPolicy(keep), best_fn=_eval_loss if keep_best else None,
                best_mode="min", enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        with _quiet("absl"):  # read-only managers warn that they are read-only
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    @classmethod
    def for_path(cls, path) -> Checkpointer:
        """Read-only access to a run directory, its checkpoints/ folder, or one checkpoints/STEP folder."""
        directory, step = locate_checkpoints(path)
        checkpointer = cls(directory.parent, read_only=True, checkpoint_dir=directory)
        checkpointer.default_step = step
        return checkpointer

    # ------------------------------------------------------------------ saving
    def should_save(self, step: int) -> bool:
        """Whether save(step, ...) writes: every save_steps and/or save_minutes. Equal on all processes
        when they all call it at the same steps (save_minutes is agreed with one step of delay)."""
        step = int(step)
        if self._decision is None or self._decision[0] != step:
            self._set_aside_stale(step)
            by_steps = self.save_steps > 0 and step % self.save_steps == 0
            overdue = bool(self.save_minutes) and time.monotonic() - self._last_save >= self.save_minutes * 60
            by_time = self._time_due(overdue) if self.save_minutes else False
            self._decision = (step, not self.read_only and step not in self._saved and (by_steps or by_time))
        return self._decision[1]

    def save(self, step: int, state, data_state: dict, run_config: dict, metrics: dict | None = None,
             force: bool = False, rng_key: jax.Array | None = None) -> bool:
        """Start writing the bundle when due (or `force`); returns once the arrays are copied off the
        devices, so training goes on while files are written. False when nothing was saved."""
        if self.read_only:
            raise ValueError(f"{self.directory} was opened read-only (Checkpointer.for_path): it cannot save")
        step = int(step)
        if step in self._saved or not (self.should_save(step) or force):
            return False
        state_step = local_scalar(getattr(state, "step", step))  # waits for the step, as the device copy must
        if state_step != step:
            raise ValueError(f"save(step={step}) got a train state at step {state_step}")
        metrics = jsonable(metrics) if metrics else None
        meta = {"step": step, "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "process_count": jax.process_count(), "device_count": jax.device_count(), "metrics": metrics,
                "rng": _rng_record(rng_key, run_config or {})}
        started = time.perf_counter()
        self._manager.save(step, force=True, metrics=metrics if self.keep_best and metrics and "eval_loss" in metrics
                           else None, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(jsonable(data_state or {})),
            config=ocp.args.JsonSave(jsonable(run_config or {})), meta=ocp.args.JsonSave(meta)))
        self.last_save_blocked_seconds = time.perf_counter() - started
        self._saved.add(step)
        self._last_save = time.monotonic()
        self._time_due.reset()
        log.info("%s checkpoint %s (step %d)", "writing" if self._manager.is_saving_in_progress() else "saved",
                 self.directory / str(step), step)
        return True

    def wait(self) -> None:
        """Block until the bundles being written are complete on disk (raises if writing failed)."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _set_aside_stale(self, step: int) -> None:
        """Checkpoints at or after the first step this process saves belong to an abandoned future (the run
        went back to an earlier one, e.g. past a damaged checkpoint): move them aside instead of failing."""
        if self._stale_checked or self.read_only:
            return
        self._stale_checked = True
        stale = [s for s in complete_steps(self.directory) if s >= step]
        barrier("flax_bert_listed_stale_checkpoints")  # every process has listed them before any is moved
        for s in stale:
            move_aside(self.directory, s, SUPERSEDED, "it is newer than the step this run continues from")
        if stale:
            self._manager.reload()

    # ------------------------------------------------------------------ reading
    def all_steps(self) -> list[int]:
        """Complete checkpoints only (a bundle still being written is not listed)."""
        return complete_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, target, step: int | None = None, *, reset_optimizer: Callable | None = None) -> Restored:
        """The newest intact checkpoint at or before `step` (default: the latest), placed straight onto the
        shardings of `target` (a TrainState of jax.ShapeDtypeStruct with .sharding, or of arrays), so it
        restores onto any mesh. A damaged one is reported, moved to checkpoints_damaged/ and skipped; one that
        holds another model or optimizer raises CheckpointMismatchError and stays; any other failure (out of
        memory, I/O) is re-raised and the checkpoint stays. `reset_optimizer(params, step) -> opt_state`: when
        only the optimizer state does not fit, keep the parameters, step and data position with its result."""
        abstract = jax.tree.map(abstract_leaf, target)
        return self._first_intact(step, lambda s: restore_bundle(self._manager, self.directory, s, abstract,
                                                                 reset_optimizer))

    def restore_params(self, step: int | None = None) -> tuple[Any, dict, int]:
        """(parameters as host numpy arrays, run config, step) without building a model or mesh (export)."""
        restored = self._first_intact(step, lambda s: restore_params_only(self.directory, s))
        return restored.state, restored.run_config, restored.step

    def _first_intact(self, step: int | None, restore_one: Callable[[int], Restored]) -> Restored:
        self.damaged = []
        steps = candidates(self.directory, self.default_step if step is None else step)
        return first_intact(self.directory, steps, restore_one, read_only=self.read_only, damaged=self.damaged,
                            reload=self._manager.reload)


def _eval_loss(metrics) -> float:
    return float(metrics["eval_loss"]) if metrics and "eval_loss" in metrics else math.inf


def _rng_record(rng_key, run_config: dict) -> dict | None:
    """The key data of the run's base key (jax.random.key(seed) unless one is given)."""
    if rng_key is None:
        seed = run_config.get("seed", (run_config.get("run") or {}).get("seed"))
        if seed is None:
            return None
        rng_key = jax.random.key(int(seed))
    return {"impl": str(jax.random.key_impl(rng_key)), "key_data": np.asarray(jax.random.key_data(rng_key)).tolist()}


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
