"""Checkpoints: one Orbax bundle per step, written asynchronously, restored (the newest intact one) onto any mesh.
The resume order and the output-directory guard live in flax_bert.run.start, signals in flax_bert.training.preemption;
both are re-exported here.

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
import dataclasses
import datetime
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from flax_bert.errors import InputError, InputFileNotFoundError
from flax_bert.training.preemption import AnyProcess, PreemptionGuard, all_processes, barrier
# the run directory's layout and start rules live in run.layout / run.start; re-exported so that
# `flax_bert.run.checkpoint` stays the one import for checkpoint users
from flax_bert.run.layout import (CHECKPOINTS, DAMAGED, OWNED_ENTRIES, RUN_CONFIG_FILE, SUPERSEDED, complete_steps,
                                  locate_checkpoints, orbax_path)
from flax_bert.run.start import (RUN_IDENTITY_KEYS, DamagedCheckpointError, OutputDirError, StartPoint,
                                 check_output_dir, jsonable, record_run_config, resolve_start)

__all__ = ["CHECKPOINTS", "DAMAGED", "ITEMS", "OWNED_ENTRIES", "RUN_CONFIG_FILE", "RUN_IDENTITY_KEYS", "SUPERSEDED",
           "CheckpointMismatchError", "Checkpointer", "DamagedCheckpointError", "OutputDirError", "PreemptionGuard",
           "Restored", "StartPoint", "check_output_dir", "complete_steps", "locate_checkpoints", "record_run_config",
           "resolve_start"]

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config", "meta")


class CheckpointMismatchError(InputError):
    """The checkpoint is intact but holds a different model or optimizer than the one to restore into.
    `optimizer_only`: the parameters and step fit, only the optimizer state differs (--reset_optimizer helps)."""

    def __init__(self, message: str, optimizer_only: bool = False):
        super().__init__(message)
        self.optimizer_only = optimizer_only


@dataclasses.dataclass
class Restored:
    state: Any
    data_state: dict
    run_config: dict
    step: int
    rng_key: jax.Array | None = None
    metrics: dict | None = None
    path: str = ""
    optimizer_reset: bool = False  # the saved optimizer state did not fit: parameters kept, optimizer state fresh

    def __iter__(self):  # `state, data_state, run_config, step = checkpointer.restore(...)`
        return iter((self.state, self.data_state, self.run_config, self.step))


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
        state_step = _local_scalar(getattr(state, "step", step))  # waits for the step, as the device copy must
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
            self._move_aside(s, SUPERSEDED, "it is newer than the step this run continues from")
        if stale:
            self._manager.reload()

    def _move_aside(self, step: int, folder: str, why: str) -> None:
        source = self.directory / str(step)
        target = self.directory.parent / folder / str(step)
        if jax.process_index() == 0 and source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = target.parent / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            source.rename(target)
            log.warning("moved checkpoint %s to %s: %s", source, target, why)
        barrier(f"flax_bert_move_aside_{folder}_{step}")

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
        abstract = jax.tree.map(_abstract_leaf, target)
        return self._first_intact(step, lambda s: self._restore_step(s, abstract, reset_optimizer))

    def restore_params(self, step: int | None = None) -> tuple[Any, dict, int]:
        """(parameters as host numpy arrays, run config, step) without building a model or mesh (export)."""
        restored = self._first_intact(step, self._restore_params_step)
        return restored.state, restored.run_config, restored.step

    def _candidates(self, step: int | None) -> list[int]:
        steps = self.all_steps()
        step = self.default_step if step is None else step
        if not steps:
            raise InputFileNotFoundError(f"no complete checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise InputFileNotFoundError(f"no complete checkpoint {self.directory / str(step)}; the complete ones "
                                         f"are steps {', '.join(map(str, steps))}")
        return [s for s in reversed(steps) if step is None or s <= step]

    def _first_intact(self, step: int | None, restore_one: Callable[[int], Restored]) -> Restored:
        from flax_bert.run import restore_log

        self.damaged = []
        restore_log.start_capture()  # the tracebacks of a damaged checkpoint's reads go to a debug log file
        for s in self._candidates(step):
            path = self.directory / str(s)
            try:
                restored, error = restore_one(s), None
            except CheckpointMismatchError:
                raise  # the same on every process: the metadata is shared
            except Exception as err:  # noqa: BLE001 - classified below: damage, or a failure to re-raise
                restored, error = None, err
            if all_processes(error is None):
                if not self.damaged:
                    restore_log.end_capture()
                return restored
            # damage shows again when the bundle is read on the host alone; a failure that does not (out of
            # device memory, a passing I/O error) is not the checkpoint's fault: it stays where it is
            read_here_or_damaged = error is None or not _readable(path)
            if not all_processes(read_here_or_damaged):
                if error is not None:
                    raise error
                raise RuntimeError(f"another process failed to restore {path}: see its log; {path} is kept")
            reason = _one_line(error) if error is not None else "another process could not read it"
            self.damaged.append((str(path), reason))
            details = restore_log.record(restore_log.debug_log_path(
                self.directory.parent, not self.read_only, jax.process_index()), path, error)
            log.warning("checkpoint %s is damaged (%s); trying the previous one (details in %s)", path, reason, details)
            if not self.read_only:
                self._move_aside(s, DAMAGED, "it is damaged")
                self._manager.reload()
        names = ", ".join(path for path, _ in self.damaged)
        where = f"moved to {self.directory.parent / DAMAGED}" if not self.read_only else "left in place"
        raise DamagedCheckpointError(f"no intact checkpoint in {self.directory}: damaged {names} ({where}); "
                                     "nothing restarts by itself: pass --overwrite_output_dir to start over, or "
                                     "--resume_from_checkpoint with a checkpoint you trust")

    def _restore_step(self, step: int, abstract, reset_optimizer: Callable | None = None) -> Restored:
        path = self.directory / str(step)
        mismatch = _incompatibility(path, abstract, offer_reset=reset_optimizer is None)
        if mismatch is not None and not (reset_optimizer and mismatch.optimizer_only):
            raise mismatch
        if mismatch is not None:
            return self._restore_with_fresh_optimizer(path, abstract, reset_optimizer)
        items = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        state = jax.block_until_ready(items.state)
        meta = dict(items.meta or {})
        return Restored(state=state, data_state=dict(items.data or {}), run_config=dict(items.config or {}), step=step,
                        rng_key=_rng_key(meta.get("rng")), metrics=meta.get("metrics"),
                        path=str(self.directory / str(step)))

    def _restore_with_fresh_optimizer(self, path: epath.Path, abstract, reset_optimizer: Callable) -> Restored:
        """Step and parameters from the checkpoint (onto the target's shardings), the optimizer state new."""
        wanted = {"step": abstract.step, "params": abstract.params}
        kept = ocp.PyTreeCheckpointer().restore(path / "state", args=ocp.args.PyTreeRestore(
            item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted), partial_restore=True))
        step = _local_scalar(kept["step"])
        state = abstract.replace(step=kept["step"], params=kept["params"],
                                 opt_state=reset_optimizer(kept["params"], step))
        json_items = {name: ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path / name)
                      for name in ("data", "config", "meta")}
        meta = dict(json_items["meta"] or {})
        return Restored(state=jax.block_until_ready(state), data_state=dict(json_items["data"] or {}),
                        run_config=dict(json_items["config"] or {}), step=step, rng_key=_rng_key(meta.get("rng")),
                        metrics=meta.get("metrics"), path=str(path), optimizer_reset=True)

    def _restore_params_step(self, step: int) -> Restored:
        path = self.directory / str(step)
        tree = _tree_metadata(path / "state")
        if "params" not in tree:
            raise CheckpointMismatchError(f"{path} holds no 'params' item: not a flax-bert checkpoint")
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree["params"])
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        state = ocp.PyTreeCheckpointer().restore(path / "state", args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": as_numpy}, partial_restore=True))
        config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path / "config")
        return Restored(state=state["params"], data_state={}, run_config=dict(config), step=step, path=str(path))


def _incompatibility(path: epath.Path, abstract, offer_reset: bool = True) -> CheckpointMismatchError | None:
    """A different model or optimizer is a mistake to report, not damage to skip past. Compares every array's
    name, shape and dtype in the saved tree metadata with the tree this run builds, named the way Orbax names
    them (ocp.tree.serialize_tree), before anything is read."""
    saved = {_path_key(k): (tuple(m.shape), np.dtype(m.dtype)) for k, m in
             jax.tree_util.tree_flatten_with_path(_tree_metadata(path / "state"))[0]}
    wanted = {_path_key(k): (tuple(a.shape), np.dtype(a.dtype)) for k, a in
              jax.tree_util.tree_flatten_with_path(ocp.tree.serialize_tree(abstract, keep_empty_nodes=True))[0]}
    if saved == wanted:
        return None

    def shown(spec):
        return "absent" if spec is None else f"{spec[1]}{list(spec[0])}"
    differing = [k for k in sorted(set(saved) | set(wanted), key=lambda k: (k[:1] != ("params",), k))  # params first
                 if saved.get(k) != wanted.get(k)]
    details = "; ".join(f"{'.'.join(k)}: {shown(saved.get(k))} saved, {shown(wanted.get(k))} wanted"
                        for k in differing[:3]) + ("; ..." if len(differing) > 3 else "")
    if all(k[:1] == ("opt_state",) for k in differing):
        fix = ("resume with the optimizer options it was saved with (--optimizer, --max_grad_norm, ...)"
               + (", or pass --reset_optimizer to keep its parameters, step and data position with a fresh "
                  "optimizer state" if offer_reset else ""))
        return CheckpointMismatchError(f"checkpoint {path} holds another optimizer state than this run builds "
                                       f"({len(differing)} arrays differ: {details}): {fix}", optimizer_only=True)
    return CheckpointMismatchError(f"checkpoint {path} holds a different model ({details}): resume with the model "
                                   "options it was saved with, or start over in another --output_dir")


def _readable(path: epath.Path) -> bool:
    """Whether every item of the bundle reads back on this host (into NumPy, as saved): after a failed restore,
    False means the bundle is damaged, True that the failure lay elsewhere."""
    try:
        tree = _tree_metadata(path / "state")
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        ocp.PyTreeCheckpointer().restore(path / "state", args=ocp.args.PyTreeRestore(
            item=target, restore_args=as_numpy, partial_restore=True))
        for name in ("data", "config", "meta"):
            ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path / name)
    except Exception:  # noqa: BLE001 - whatever stops the read, the bundle cannot be used
        return False
    return True


def _tree_metadata(item_dir: epath.Path) -> dict:
    metadata = ocp.StandardCheckpointHandler().metadata(item_dir)
    return dict(getattr(metadata, "tree", metadata))


def _path_key(key_path) -> tuple[str, ...]:
    """The same leaf named the same way in a restored target and in Orbax's metadata dicts."""
    return tuple(re.findall(r"[A-Za-z0-9_]+", jax.tree_util.keystr(key_path)))


def _abstract_leaf(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        raise ValueError("restore needs the target shardings: pass jax.ShapeDtypeStruct(shape, dtype, sharding=...) "
                         "leaves (Trainer.abstract_state with Trainer.state_shardings) or arrays")
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _local_scalar(x) -> int:
    """A replicated scalar's value; this process's copy, as the array may span several processes."""
    return int(np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x))


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


def _rng_key(record: dict | None):
    if not record:
        return None
    return jax.random.wrap_key_data(np.asarray(record["key_data"], np.uint32), impl=record["impl"])


def _one_line(error: BaseException) -> str:
    """The root cause: Orbax wraps TensorStore's precise message (which file, which byte range) in a vaguer one."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
