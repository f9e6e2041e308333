"""Which checkpoint to restore: the complete ones newest first, each tried on every process; damage (a bundle
that does not read back on the host either) told apart from other failures; damaged bundles moved aside to
checkpoints_damaged/ and the previous one tried. Restoring one bundle is flax_bert.run.checkpoint_restore's job."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import jax
from etils import epath

from flax_bert.errors import InputFileNotFoundError
from flax_bert.run import restore_log
from flax_bert.run.checkpoint_restore import CheckpointMismatchError, read_arrays_on_host, read_json_item, tree_metadata
from flax_bert.run.layout import DAMAGED, complete_steps
from flax_bert.run.start import DamagedCheckpointError
from flax_bert.training.distributed import all_processes, barrier

log = logging.getLogger("flax_bert.run.checkpoint")


def candidates(directory: epath.Path, step: int | None) -> list[int]:
    """The complete checkpoints to try, newest first: all of them, or those at or before `step`."""
    steps = complete_steps(directory)
    if not steps:
        raise InputFileNotFoundError(f"no complete checkpoint in {directory}")
    if step is not None and step not in steps:
        raise InputFileNotFoundError(f"no complete checkpoint {directory / str(step)}; the complete ones "
                                     f"are steps {', '.join(map(str, steps))}")
    return [s for s in reversed(steps) if step is None or s <= step]


def first_intact(directory: epath.Path, steps: list[int], restore_one: Callable[[int], Any], *, read_only: bool,
                 damaged: list[tuple[str, str]], reload: Callable[[], None]):
    """restore_one(step) of the newest intact checkpoint among `steps` (newest first), agreed by every process.
    A damaged one (it does not read back on the host either) is recorded in `damaged`, moved to
    checkpoints_damaged/ unless `read_only` (then `reload()` the manager) and skipped; a failure that is not
    the checkpoint's fault (out of device memory, a passing I/O error) is re-raised and the checkpoint stays."""
    restore_log.start_capture()  # the tracebacks of a damaged checkpoint's reads go to a debug log file
    for s in steps:
        path = directory / str(s)
        try:
            restored, error = restore_one(s), None
        except CheckpointMismatchError:
            raise  # the same on every process: the metadata is shared
        except Exception as err:  # noqa: BLE001 - classified below: damage, or a failure to re-raise
            restored, error = None, err
        if all_processes(error is None):
            if not damaged:
                restore_log.end_capture()
            return restored
        # damage shows again when the bundle is read on the host alone; a failure that does not (out of
        # device memory, a passing I/O error) is not the checkpoint's fault: it stays where it is
        read_here_or_damaged = error is None or not readable(path)
        if not all_processes(read_here_or_damaged):
            if error is not None:
                raise error
            raise RuntimeError(f"another process failed to restore {path}: see its log; {path} is kept")
        reason = _one_line(error) if error is not None else "another process could not read it"
        damaged.append((str(path), reason))
        details = restore_log.record(restore_log.debug_log_path(directory.parent, not read_only, jax.process_index()),
                                     path, error)
        log.warning("checkpoint %s is damaged (%s); trying the previous one (details in %s)", path, reason, details)
        if not read_only:
            move_aside(directory, s, DAMAGED, "it is damaged")
            reload()
    names = ", ".join(path for path, _ in damaged)
    where = f"moved to {directory.parent / DAMAGED}" if not read_only else "left in place"
    raise DamagedCheckpointError(f"no intact checkpoint in {directory}: damaged {names} ({where}); "
                                 "nothing restarts by itself: pass --overwrite_output_dir to start over, or "
                                 "--resume_from_checkpoint with a checkpoint you trust")


def move_aside(directory: epath.Path, step: int, folder: str, why: str) -> None:
    """checkpoints/STEP to OUTPUT_DIR/FOLDER/STEP (process 0 moves it; every process waits for the move)."""
    source = directory / str(step)
    target = directory.parent / folder / str(step)
    if jax.process_index() == 0 and source.exists():
        from flax_bert.run.start import claim_written

        claim_written(str(directory.parent), folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.parent / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        source.rename(target)
        log.warning("moved checkpoint %s to %s: %s", source, target, why)
    barrier(f"flax_bert_move_aside_{folder}_{step}")


def readable(path: epath.Path) -> bool:
    """Whether every item of the bundle reads back on this host (into NumPy, as saved): after a failed restore,
    False means the bundle is damaged, True that the failure lay elsewhere."""
    try:
        read_arrays_on_host(path / "state", tree_metadata(path / "state"))
        for name in ("data", "config", "meta"):
            read_json_item(path / name)
    except Exception:  # noqa: BLE001 - whatever stops the read, the bundle cannot be used
        return False
    return True


def _one_line(error: BaseException) -> str:
    """The root cause: Orbax wraps TensorStore's precise message (which file, which byte range) in a vaguer one."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"
