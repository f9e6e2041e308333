"""Where a run starts and whose directory it is: the resume order (resolve_start) and the guard against writing
over another run (check_output_dir). The directory's names and its complete checkpoints: flax_bert.run.layout."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib

import jax
import numpy as np

from flax_bert import storage
from flax_bert.errors import InputFileExistsError, InputFileNotFoundError
from flax_bert.run.layout import (CHECKPOINTS, DAMAGED, OWNED_ENTRIES, RUN_CONFIG_FILE, WRITTEN_RECORD, complete_steps, locate_checkpoints)
from flax_bert.run.options import IMMUTABLE, fixed_options, same_setting

log = logging.getLogger(__name__)

# Settings a run resuming an output_dir must share with the run that wrote it: the options that may not
# change on resume (run.options.IMMUTABLE, the one list: model shapes, tokenizer, rows and their order,
# masks, objective, optimizer), less the optimizer when --reset_optimizer starts a fresh optimizer state.
RUN_IDENTITY_KEYS = tuple(IMMUTABLE)


class OutputDirError(InputFileExistsError):
    """The output directory holds files of something else."""


class DamagedCheckpointError(InputFileNotFoundError):
    """No intact checkpoint is left to restore."""


def jsonable(value):
    """Plain JSON types for run_config.json and the checkpoint's JSON items: arrays as lists, paths as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


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
    own = storage.checkpoint_path(storage.join(output_dir, CHECKPOINTS))
    steps = [] if overwrite_output_dir else complete_steps(own)
    if steps:
        if resume_from_checkpoint:
            _check_resume_request(own, steps, resume_from_checkpoint)
        return StartPoint("checkpoint", str(own / str(steps[-1])), steps[-1], "output_dir")
    set_aside = storage.checkpoint_path(storage.join(output_dir, DAMAGED))
    if not overwrite_output_dir and set_aside.is_dir() and any(set_aside.iterdir()):
        # a run that trained and lost every checkpoint: starting again at step 0 would throw its work away
        names = ", ".join(sorted(p.name for p in set_aside.iterdir()))
        raise DamagedCheckpointError(f"every checkpoint of the run in {output_dir} was set aside as damaged "
                                     f"({set_aside}: {names}); it will not restart at step 0 by itself: move a "
                                     "checkpoint you trust back into checkpoints/, or pass --overwrite_output_dir "
                                     "to start over")
    if resume_from_checkpoint:
        directory, step = locate_checkpoints(resume_from_checkpoint)
        step = complete_steps(directory)[-1] if step is None else step
        return StartPoint("checkpoint", str(directory / str(step)), step, "resume_from_checkpoint")
    if model_name_or_path:
        return StartPoint("hf", str(model_name_or_path), 0, "model_name_or_path")
    return StartPoint("fresh")


class ResumeRequestError(InputFileExistsError):
    """--resume_from_checkpoint names a step of the output_dir's own run that later checkpoints went on from."""


def _check_resume_request(own, steps: list[int], resume_from_checkpoint: str) -> None:
    """The output_dir's own latest checkpoint goes first (rerunning the same command resumes the run): a
    --resume_from_checkpoint that names an earlier step of this very run would be overruled, so it is refused
    in one line; one that names another run is the start this run already went on from, and is logged."""
    try:
        directory, step = locate_checkpoints(resume_from_checkpoint)
    except FileNotFoundError:  # gone since this run went on from it: the run's own checkpoints are what counts
        directory, step = None, None
    same_run = directory is not None and _comparable(str(directory)) == _comparable(str(own))
    later = [s for s in steps if step is not None and s > step]
    if same_run and later:
        raise ResumeRequestError(
            f"--resume_from_checkpoint {resume_from_checkpoint} is step {step} of this run, whose checkpoints go on "
            f"to step {steps[-1]}: drop --resume_from_checkpoint to continue from step {steps[-1]}, or to go back to "
            f"step {step} move {', '.join(str(own / str(s)) for s in later[:3])}{' ...' if len(later) > 3 else ''} "
            "out of the way first")
    if not same_run:
        log.info("--resume_from_checkpoint %s: not read, the output_dir holds this run's own checkpoints (up to "
                 "step %d), which went on from it", resume_from_checkpoint, steps[-1])


# ----------------------------------------------------------------------------- the output directory
def check_output_dir(output_dir, overwrite: bool, run_config: dict, *, resuming: bool = False,
                     record: bool = True) -> list[str]:
    """Refuse an output_dir holding another run's files unless `overwrite`; then record run_config.json
    (unless `record` is False, e.g. for a run directory prepared for a later run to take over).

    The same run: its run_config.json agrees on RUN_IDENTITY_KEYS. A folder without run_config.json is
    accepted only empty, or (`resuming`: the caller restores its checkpoint) holding nothing but what
    runs write. `overwrite` deletes only what the output_dir's WRITTEN_RECORD says flax-bert wrote, never
    what the run reads (an input inside the output_dir, e.g. the old README's config and tokenizer saved there).
    Call it on one process, before resolve_start(..., overwrite_output_dir=overwrite)'s result is used.
    Returns the names it deleted."""
    out = storage.absolute(output_dir) if storage.is_url(output_dir) else pathlib.Path(output_dir)  # flax_bert.storage
    if storage.isfile(out):
        raise OutputDirError(f"--output_dir {out} is a file: choose a directory")
    entries = storage.listdir(out)
    problem = _foreign(out, entries, run_config, resuming)
    if problem and not overwrite:
        raise OutputDirError(f"--output_dir {out} {problem}: pass --overwrite_output_dir to replace it "
                             "or choose another --output_dir")
    ours = _written_here(out, entries)
    deleted = []
    if overwrite and entries:
        inputs = _inputs_inside(out, entries, run_config)
        if inputs:
            log.info("--overwrite_output_dir keeps what this run reads from %s: %s", out,
                     ", ".join(f"{name} (--{option})" for name, option in sorted(inputs.items())))
        theirs = [name for name in entries if name in OWNED_ENTRIES and name not in ours and name not in inputs]
        if theirs:  # this run would write over them: refuse before anything is deleted
            raise OutputDirError(f"--output_dir {out} holds {', '.join(theirs[:5])} that flax-bert did not write (not "
                                 f"in its {WRITTEN_RECORD}): move them away or choose another --output_dir")
        deleted = [name for name in entries if name in ours and name != WRITTEN_RECORD and name not in inputs]
    for name in deleted:
        storage.remove(storage.join(out, name))
    if deleted:
        kept = [name for name in entries if name not in deleted and name != WRITTEN_RECORD]
        log.warning("--overwrite_output_dir: deleted %s from %s%s", ", ".join(deleted), out,
                    f" (kept {', '.join(kept)}: flax-bert did not write them, or the run reads them)" if kept else "")
    storage.makedirs(out)
    present = set(storage.listdir(out))
    _record_written(out, sorted((ours & present) | {WRITTEN_RECORD}))  # the rest is added as it is written
    if not record:
        return deleted
    record_run_config(out, run_config)
    return deleted


def record_run_config(out, run_config: dict) -> None:
    """The run's options in OUTPUT_DIR/run_config.json (readers see the old file or the new one)."""
    claim_written(out, RUN_CONFIG_FILE)
    storage.write_atomic(storage.join(out, RUN_CONFIG_FILE), json.dumps(jsonable(run_config), indent=2, sort_keys=True) + "\n")


def _written_here(out, entries: list[str]) -> set[str]:
    """The top-level names of `out` that this tool created: its WRITTEN_RECORD lists them (a name is added when
    it is written, claim_written), with the temporaries of the files it writes atomically; a run directory
    older than the record is known by its run_config.json; anything else holds nothing of ours."""
    if WRITTEN_RECORD in entries:
        names = _read_record(out)
        return (set(names) & set(entries)) | ({WRITTEN_RECORD} | ATOMIC_TEMPORARIES) & set(entries)
    if RUN_CONFIG_FILE in entries:
        return {name for name in entries if name in OWNED_ENTRIES}
    return set()


# write_atomic's temporary names of the files a run rewrites (storage.write_atomic), left behind by a kill
ATOMIC_TEMPORARIES = frozenset({f".{RUN_CONFIG_FILE}.tmp", f"{WRITTEN_RECORD}.tmp", ".eval_results.json.tmp"})


def _read_record(out) -> list[str]:
    record = storage.join(out, WRITTEN_RECORD)
    try:
        return list(json.loads(storage.read_text(record))["written"])
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputDirError(f"{record} is unreadable: delete it only if flax-bert wrote everything in {out}, "
                             "or choose another --output_dir") from None


def _record_written(out, names: list[str]) -> None:
    storage.write_atomic(storage.join(out, WRITTEN_RECORD), json.dumps({"written": names}, indent=1) + "\n")


def claim_written(out, *names: str) -> None:
    """Adds top-level `names` of a run's output_dir to its WRITTEN_RECORD as they are written (never before:
    --overwrite_output_dir deletes only what the record lists, so a file of the user's that merely has a name
    a run might write is never taken for ours). Nothing happens where there is no record (not a run's
    output_dir, e.g. an exported folder being evaluated). Call it on the process that writes."""
    out = storage.absolute(out) if storage.is_url(out) else pathlib.Path(out)
    if not storage.isfile(storage.join(out, WRITTEN_RECORD)):
        return
    recorded = _read_record(out)
    new = [name for name in names if name not in recorded]
    if new:
        _record_written(out, sorted(set(recorded) | set(new)))


INPUT_OPTIONS = ("model_name_or_path", "config_name", "tokenizer_name", "train_file", "validation_file",
                 "resume_from_checkpoint")


# A Hugging Face model or tokenizer folder's files: what an input that is the output_dir itself is read from
MODEL_FOLDER_FILES = frozenset({"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt"})


def _inputs_inside(out, entries: list[str], run_config: dict) -> dict[str, str]:
    """{top-level name of `out`: the option reading it} for the run's inputs inside the output_dir, which
    --overwrite_output_dir keeps: one inside it keeps its top-level entry; the output_dir itself (the old
    README saved its config and tokenizer there) keeps the model and tokenizer files."""
    root = _comparable(out)
    separator = "/" if storage.is_url(str(root)) else os.sep
    inputs: dict[str, str] = {}
    for option in INPUT_OPTIONS:
        value = run_config.get(option)
        if not (isinstance(value, str) and value and (storage.is_url(value) or os.path.exists(value))):
            continue
        path = _comparable(value)
        if path == root:
            inputs.update({name: option for name in entries if name in MODEL_FOLDER_FILES})
        elif path.startswith(root + separator):
            inputs[path[len(root) + 1:].split(separator)[0]] = option
    return inputs


def _comparable(path) -> str:
    """A path spelled one way: the real local path (also for file:// URLs), or the URL itself."""
    local = storage.local_path(path)
    return os.path.realpath(local) if local is not None else str(storage.absolute(path))


def _foreign(out, entries: list[str], run_config: dict, resuming: bool) -> str | None:
    """Why `out` is not this run's directory, or None."""
    if not entries:
        return None
    if RUN_CONFIG_FILE in entries:
        try:
            theirs = json.loads(storage.read_text(storage.join(out, RUN_CONFIG_FILE)))
        except (OSError, ValueError):
            theirs = None
        if not isinstance(theirs, dict):
            return f"holds a {RUN_CONFIG_FILE} that flax-bert did not write"
        differences = [f"{key} {theirs[key]!r} there, {run_config[key]!r} now"
                       for key in fixed_options(bool(run_config.get("reset_optimizer")))
                       if key in theirs and key in run_config and not same_setting(theirs[key], run_config[key])]
        return f"holds a different run ({'; '.join(differences)})" if differences else None
    unknown = [name for name in entries if name not in OWNED_ENTRIES]
    if unknown:
        return f"holds files flax-bert did not write ({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''})"
    if resuming and complete_steps(storage.checkpoint_path(storage.join(out, CHECKPOINTS))):
        return None
    if CHECKPOINTS not in entries and set(entries) <= _written_here(out, entries):
        return None  # a start that stopped before it recorded its options (e.g. a misspelt --train_file)
    return f"holds another run's files without its {RUN_CONFIG_FILE} ({', '.join(entries[:5])})"

