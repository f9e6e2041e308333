"""Where the details of a damaged checkpoint go: the restore error's full traceback, and the tracebacks that
Orbax's and TensorStore's abandoned reads print afterwards from their threads (asyncio "Event loop is closed",
hundreds to thousands of lines), into a debug log file instead of the run's log. The run's log keeps one
warning per damaged checkpoint, naming this file."""
from __future__ import annotations

import datetime
import pathlib
import sys
import tempfile
import traceback

from flax_bert import storage
from flax_bert.run.layout import DAMAGED

DEBUG_LOG = "restore-debug.log"
_NOISY_SOURCES = ("asyncio", "orbax", "tensorstore")  # the libraries whose late tracebacks belong in the file

_current: dict = {"path": None, "previous_hook": None, "held": []}


def debug_log_path(output_dir, writable: bool, process_index: int = 0) -> pathlib.Path:
    """OUTPUT_DIR/checkpoints_damaged/restore-debug.log beside the damaged checkpoints; a temporary file when the
    run directory is a URL or only read (an evaluation writes nothing there)."""
    name = DEBUG_LOG if process_index == 0 else f"restore-debug.process_{process_index}.log"
    if writable and not storage.is_url(str(output_dir)):
        return pathlib.Path(str(output_dir)) / DAMAGED / name
    return pathlib.Path(tempfile.gettempdir()) / f"flax-bert-{name}"


def start_capture() -> None:
    """Before restoring: hold the checkpoint libraries' late tracebacks until it is known whether a checkpoint
    is damaged (record: into the file) or not (end_capture: printed as Python would have)."""
    if _current["previous_hook"] is None:
        _current["previous_hook"] = sys.unraisablehook
        sys.unraisablehook = _unraisable_hook
    _current["path"], _current["held"] = None, []


def end_capture() -> None:
    """The restore succeeded without damage: print what was held and stop capturing."""
    held, _current["held"] = _current["held"], []
    if _current["previous_hook"] is not None and _current["path"] is None:
        sys.unraisablehook, _current["previous_hook"] = _current["previous_hook"], None
        for text in held:
            sys.stderr.write(text)


def record(log_path: pathlib.Path, checkpoint, error: BaseException | None) -> pathlib.Path:
    """Append why `checkpoint` failed to restore (the whole traceback) and the tracebacks held so far to
    `log_path`, where the later ones go too. Returns `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"--- {_now()} restoring {checkpoint} failed\n"]
    if error is not None:
        lines += traceback.format_exception(error)
    held, _current["held"] = _current["held"], []
    with log_path.open("a") as file:
        file.writelines(lines + held)
    _current["path"] = log_path
    return log_path


def _unraisable_hook(unraisable) -> None:
    if not _from_checkpoint_io(unraisable.exc_traceback):
        _current["previous_hook"](unraisable)
        return
    text = "".join([f"--- {_now()} {unraisable.err_msg or 'unraisable exception'}\n",
                    *traceback.format_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)])
    if _current["path"] is None:
        _current["held"].append(text)
        return
    try:
        with _current["path"].open("a") as file:
            file.write(text)
    except OSError:
        _current["previous_hook"](unraisable)


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _from_checkpoint_io(tb) -> bool:
    """Whether a traceback runs through asyncio, Orbax or TensorStore (the abandoned reads' callbacks)."""
    return any(source in pathlib.Path(frame.f_code.co_filename).parts
               for frame, _ in traceback.walk_tb(tb) for source in _NOISY_SOURCES)
