"""Checkpoints: one Orbax bundle per step, the resume order, the output-directory guard, signals.

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
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)

CHECKPOINTS, DAMAGED, SUPERSEDED = "checkpoints", "checkpoints_damaged", "checkpoints_superseded"
RUN_CONFIG_FILE = "run_config.json"
ITEMS = ("state", "data", "config", "meta")

# What a run writes at the top of its output_dir. --overwrite_output_dir deletes these and nothing else.
OWNED_ENTRIES = frozenset({
    CHECKPOINTS, DAMAGED, SUPERSEDED, RUN_CONFIG_FILE, f".{RUN_CONFIG_FILE}.tmp", "metrics.jsonl", "tensorboard",
    "eval_results.json", "tokenizer", "curves.png",
    # the exported Hugging Face model (written at the end of training)
    "config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt"})

# Settings a run resuming an output_dir must share with the run that wrote it: they fix the model's
# shapes, the tokenizer, which rows are read in which order, and the masks. Everything else (max_steps,
# logging, saving, learning rate, batch size, mesh, dtype, ...) may change on resume.
RUN_IDENTITY_KEYS = (
    "model_type", "config_name", "model_name_or_path", "tokenizer_name", "tokenizer_vocab_size", "vocab_size",
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
    "dataset_name", "dataset_config_name", "train_file", "text_column", "validation_split_percentage",
    "max_train_samples", "streaming", "max_seq_length", "line_by_line", "mlm_probability", "whole_word_masking",
    "objective", "optimizer", "seed")


class DamagedCheckpointError(FileNotFoundError):
    """No intact checkpoint is left to restore."""


class CheckpointMismatchError(ValueError):
    """The checkpoint is intact but holds a different model or optimizer than the one to restore into."""


class OutputDirError(FileExistsError):
    """The output directory holds files of something else."""


@dataclasses.dataclass
class Restored:
    state: Any
    data_state: dict
    run_config: dict
    step: int
    rng_key: jax.Array | None = None
    metrics: dict | None = None
    path: str = ""

    def __iter__(self):  # `state, data_state, run_config, step = checkpointer.restore(...)`
        return iter((self.state, self.data_state, self.run_config, self.step))


# ----------------------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Saves bundles into OUTPUT_DIR/checkpoints asynchronously and restores the newest intact one."""

    def __init__(self, output_dir, *, save_steps: int = 500, save_minutes: float | None = None,
                 save_total_limit: int = 3, keep_best: bool = False, async_save: bool = True,
                 read_only: bool = False, checkpoint_dir=None):
        self.output_dir = epath.Path(output_dir)
        self.directory = epath.Path(checkpoint_dir) if checkpoint_dir else self.output_dir / CHECKPOINTS
        self.save_steps, self.save_minutes = save_steps, save_minutes
        self.keep_best, self.read_only = keep_best, read_only
        self.default_step: int | None = None        # for_path(".../checkpoints/STEP") restores STEP by default
        self.damaged: list[tuple[str, str]] = []    # (path, reason) of checkpoints the last restore skipped
        self.last_save_blocked_seconds = 0.0         # how long the caller waited in the last save()
        self._saved: set[int] = set()
        self._decision: tuple[int, bool] | None = None
        self._stale_checked = False
        self._last_save = time.monotonic()
        self._time_due = _AnyProcess()
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
        metrics = _jsonable(metrics) if metrics else None
        meta = {"step": step, "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "process_count": jax.process_count(), "device_count": jax.device_count(), "metrics": metrics,
                "rng": _rng_record(rng_key, run_config or {})}
        started = time.perf_counter()
        self._manager.save(step, force=True, metrics=metrics if self.keep_best and metrics and "eval_loss" in metrics
                           else None, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(_jsonable(data_state or {})),
            config=ocp.args.JsonSave(_jsonable(run_config or {})), meta=ocp.args.JsonSave(meta)))
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
        _barrier("flax_bert_listed_stale_checkpoints")  # every process has listed them before any is moved
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
        _barrier(f"flax_bert_move_aside_{folder}_{step}")

    # ------------------------------------------------------------------ reading
    def all_steps(self) -> list[int]:
        """Complete checkpoints only (a bundle still being written is not listed)."""
        return complete_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, target, step: int | None = None) -> Restored:
        """The newest intact checkpoint at or before `step` (default: the latest), placed straight onto the
        shardings of `target` (a TrainState of jax.ShapeDtypeStruct with .sharding, or of arrays), so it
        restores onto any mesh. A damaged one is reported, moved to checkpoints_damaged/ and skipped."""
        abstract = jax.tree.map(_abstract_leaf, target)
        return self._first_intact(step, lambda s: self._restore_step(s, abstract))

    def restore_params(self, step: int | None = None) -> tuple[Any, dict, int]:
        """(parameters as host numpy arrays, run config, step) without building a model or mesh (export)."""
        restored = self._first_intact(step, self._restore_params_step)
        return restored.state, restored.run_config, restored.step

    def _candidates(self, step: int | None) -> list[int]:
        steps = self.all_steps()
        step = self.default_step if step is None else step
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no complete checkpoint {self.directory / str(step)}; the complete ones are "
                                    f"steps {', '.join(map(str, steps))}")
        return [s for s in reversed(steps) if step is None or s <= step]

    def _first_intact(self, step: int | None, restore_one: Callable[[int], Restored]) -> Restored:
        self.damaged = []
        for s in self._candidates(step):
            path = self.directory / str(s)
            try:
                restored, error = restore_one(s), None
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 - any read failure means the bundle cannot be trusted
                restored, error = None, err
            if not _all_processes(error is None):
                error = error or RuntimeError("another process could not read it")
            if error is None:
                return restored
            reason = _one_line(error)
            self.damaged.append((str(path), reason))
            log.warning("checkpoint %s is damaged (%s); trying the previous one", path, reason)
            if not self.read_only:
                self._move_aside(s, DAMAGED, "it is damaged")
                self._manager.reload()
        names = ", ".join(path for path, _ in self.damaged)
        raise DamagedCheckpointError(f"no intact checkpoint in {self.directory}: damaged {names}; "
                                     "start over with --overwrite_output_dir or resume from another run")

    def _restore_step(self, step: int, abstract) -> Restored:
        _check_fits(self.directory / str(step), abstract)
        items = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        state = jax.block_until_ready(items.state)
        meta = dict(items.meta or {})
        return Restored(state=state, data_state=dict(items.data or {}), run_config=dict(items.config or {}), step=step,
                        rng_key=_rng_key(meta.get("rng")), metrics=meta.get("metrics"),
                        path=str(self.directory / str(step)))

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


def complete_steps(directory) -> list[int]:
    """Steps of the finished bundles in a checkpoints/ folder (tmp folders of unfinished saves excluded)."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(m.step for m in ocp.path.step.standard_name_format().find_all(directory))


def locate_checkpoints(path) -> tuple[epath.Path, int | None]:
    """(checkpoints folder, step or None) for a run directory, a checkpoints/ folder or a checkpoints/STEP folder."""
    path = epath.Path(path)
    if path.name.isdigit() and int(path.name) in complete_steps(path.parent):
        return path.parent, int(path.name)
    if ".orbax-checkpoint-tmp" in path.name:
        raise FileNotFoundError(f"{path} is a checkpoint that never finished writing; pass its run directory instead")
    for directory in (path / CHECKPOINTS, path):
        if complete_steps(directory):
            return directory, None
    raise FileNotFoundError(f"{path} holds no complete checkpoint: pass a run's --output_dir, its checkpoints/ "
                            "folder or one checkpoints/STEP folder")


def _check_fits(path: epath.Path, abstract) -> None:
    """A different model or optimizer is a mistake to report, not damage to skip past."""
    saved = {_path_key(k): (tuple(m.shape), np.dtype(m.dtype)) for k, m in
             jax.tree_util.tree_flatten_with_path(_tree_metadata(path / "state"))[0]}
    wanted = {_path_key(k): (tuple(a.shape), np.dtype(a.dtype)) for k, a in
              jax.tree_util.tree_flatten_with_path(abstract)[0]}
    if saved == wanted or (set(saved) != set(wanted) and Counter(saved.values()) == Counter(wanted.values())):
        return  # equal, or the same arrays under other container names (e.g. optax NamedTuple vs dict)
    def shown(spec):
        return "absent" if spec is None else f"{spec[1]}{list(spec[0])}"
    differences = [f"{'.'.join(k)}: {shown(saved.get(k))} saved, {shown(wanted.get(k))} wanted"
                   for k in sorted(set(saved) | set(wanted), key=lambda k: (k[:1] != ("params",), k))  # params first
                   if saved.get(k) != wanted.get(k)]
    raise CheckpointMismatchError(f"checkpoint {path} holds a different model or optimizer "
                                  f"({'; '.join(differences[:3])}{'; ...' if len(differences) > 3 else ''}): resume "
                                  "with the settings it was saved with, or start over with --overwrite_output_dir")


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


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _one_line(error: BaseException) -> str:
    """The root cause: Orbax wraps TensorStore's precise message (which file, which byte range) in a vaguer one."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


# ----------------------------------------------------------------------------- where a run starts
@dataclasses.dataclass(frozen=True)
class StartPoint:
    kind: str                  # "checkpoint" | "hf" | "fresh"
    path: str | None = None    # checkpoint: its checkpoints/STEP folder; hf: the folder or hub id
    step: int = 0
    source: str = "fresh"      # "output_dir" | "resume_from_checkpoint" | "model_name_or_path" | "fresh"

    def describe(self) -> str:
        if self.kind == "checkpoint":
            origin = "" if self.source == "output_dir" else ", from --resume_from_checkpoint"
            return f"resuming from checkpoint {self.path} (step {self.step}{origin})"
        if self.kind == "hf":
            return f"starting from the Hugging Face weights {self.path} (weights only: new optimizer state, step 0)"
        return ("starting fresh from random initialization "
                "(no checkpoint, --resume_from_checkpoint or --model_name_or_path)")


def resolve_start(output_dir, resume_from_checkpoint: str | None = None, model_name_or_path: str | None = None,
                  *, overwrite_output_dir: bool = False) -> StartPoint:
    """The latest complete checkpoint in output_dir, else --resume_from_checkpoint, else
    --model_name_or_path (weights only), else fresh. With overwrite_output_dir the output_dir's own
    checkpoints are about to be deleted (check_output_dir), so they do not count."""
    own = epath.Path(output_dir) / CHECKPOINTS
    steps = [] if overwrite_output_dir else complete_steps(own)
    if steps:
        return StartPoint("checkpoint", str(own / str(steps[-1])), steps[-1], "output_dir")
    if resume_from_checkpoint:
        directory, step = locate_checkpoints(resume_from_checkpoint)
        step = complete_steps(directory)[-1] if step is None else step
        return StartPoint("checkpoint", str(directory / str(step)), step, "resume_from_checkpoint")
    if model_name_or_path:
        return StartPoint("hf", str(model_name_or_path), 0, "model_name_or_path")
    return StartPoint("fresh")


# ----------------------------------------------------------------------------- the output directory
def check_output_dir(output_dir, overwrite: bool, run_config: dict, *, resuming: bool = False,
                     record: bool = True) -> list[str]:
    """Refuse an output_dir holding another run's files unless `overwrite`; then record run_config.json
    (unless `record` is False, e.g. for a run directory prepared for a later run to take over).

    The same run: its run_config.json agrees on RUN_IDENTITY_KEYS. A folder without run_config.json is
    accepted only empty, or (`resuming`: the caller restores its checkpoint) holding nothing but what
    runs write. `overwrite` deletes only OWNED_ENTRIES at the top level and keeps everything else.
    Call it on one process, before resolve_start(..., overwrite_output_dir=overwrite)'s result is used.
    Returns the names it deleted."""
    out = epath.Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--output_dir {out} is a file: choose a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    problem = _foreign(out, entries, run_config, resuming)
    if problem and not overwrite:
        raise OutputDirError(f"--output_dir {out} {problem}: pass --overwrite_output_dir to replace it "
                             "or choose another --output_dir")
    deleted = [name for name in entries if name in OWNED_ENTRIES] if overwrite else []
    for name in deleted:
        (out / name).rmtree() if (out / name).is_dir() else (out / name).unlink()
    if deleted:
        kept = [name for name in entries if name not in OWNED_ENTRIES]
        log.warning("--overwrite_output_dir: deleted %s from %s%s", ", ".join(deleted), out,
                    f" (kept {', '.join(kept)}: flax-bert did not write them)" if kept else "")
    out.mkdir(parents=True, exist_ok=True)
    if not record:
        return deleted
    temporary = out / f".{RUN_CONFIG_FILE}.tmp"
    temporary.write_text(json.dumps(_jsonable(run_config), indent=2, sort_keys=True) + "\n")
    temporary.replace(out / RUN_CONFIG_FILE)
    return deleted


def _foreign(out: epath.Path, entries: list[str], run_config: dict, resuming: bool) -> str | None:
    """Why `out` is not this run's directory, or None."""
    if not entries:
        return None
    if RUN_CONFIG_FILE in entries:
        try:
            theirs = json.loads((out / RUN_CONFIG_FILE).read_text())
        except (OSError, ValueError):
            theirs = None
        if not isinstance(theirs, dict):
            return f"holds a {RUN_CONFIG_FILE} that flax-bert did not write"
        differences = [f"{key} {theirs[key]!r} there, {run_config[key]!r} now" for key in RUN_IDENTITY_KEYS
                       if key in theirs and key in run_config and not _same_setting(theirs[key], run_config[key])]
        return f"holds a different run ({'; '.join(differences)})" if differences else None
    unknown = [name for name in entries if name not in OWNED_ENTRIES]
    if unknown:
        return f"holds files flax-bert did not write ({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''})"
    if resuming and complete_steps(out / CHECKPOINTS):
        return None
    return f"holds another run's files without its {RUN_CONFIG_FILE} ({', '.join(entries[:5])})"


def _same_setting(a, b) -> bool:
    if a == b:
        return True
    paths = isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)
    return paths and os.path.realpath(a) == os.path.realpath(b)


# ----------------------------------------------------------------------------- signals
class PreemptionGuard:
    """SIGTERM / SIGINT ask the loop to stop: it finishes the step, saves, waits for the save, exits 0.
    A second signal exits at once (128 + signal number). Handlers are restored on leaving the block.

        with PreemptionGuard() as guard:
            for step in ...:
                state = train_step(...)
                if guard.should_stop(step):
                    checkpointer.save(step, ..., force=True); checkpointer.wait(); break
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False        # a signal arrived in this process
        self.signal_name: str | None = None
        self.stopped_at: int | None = None  # the step should_stop() first said True (the same on all processes)
        self._previous: dict = {}
        self._agree = _AnyProcess()

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        else:  # Python delivers signals to the main thread only
            log.warning("PreemptionGuard outside the main thread: SIGTERM/SIGINT are not caught")
        return self

    def __exit__(self, *exc) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            os.write(2, f"\n{name} again: exiting now without saving\n".encode())
            os._exit(128 + signum)
        self.requested, self.signal_name = True, name
        # os.write, not print/logging: a signal handler may interrupt a write in progress
        os.write(2, f"\n{name} received: finishing this step, saving a checkpoint, then exiting "
                    f"(send it again to exit at once)\n".encode())

    @property
    def stopped(self) -> bool:
        """should_stop() said True: use this, not `requested`, to decide what to do next on every process."""
        return self.stopped_at is not None

    def should_stop(self, step: int) -> bool:
        """True on every process at the same step once any process got a signal (call it every step;
        with several processes the answer comes one step late, so nobody waits on the devices for it)."""
        stop = self._agree(self.requested)
        if stop and self.stopped_at is None:
            self.stopped_at = int(step)
            log.warning("stopping at step %d (%s)", step, self.signal_name or "a signal on another process")
        return stop


# ----------------------------------------------------------------------------- several processes
class _AnyProcess:
    """`agree(flag)`: True on every process when any process's flag is True. One process: the flag. Several:
    a tiny all-reduce dispatched now and read at the next call, so it never stalls the step pipeline;
    all processes must call it at the same steps."""

    def __init__(self):
        self._pending = None
        self._reduce = None

    def __call__(self, flag: bool) -> bool:
        if jax.process_count() == 1:
            return bool(flag)
        agreed = self._pending is not None and bool(np.asarray(self._pending.addressable_data(0)))
        if self._reduce is None:
            mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("processes",))
            self._sharding = NamedSharding(mesh, P("processes"))
            self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
        local = np.full((jax.local_device_count(),), bool(flag), np.int32)
        self._pending = self._reduce(jax.make_array_from_process_local_data(self._sharding, local))
        return agreed

    def reset(self) -> None:
        self._pending = None


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _all_processes(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
