"""A step that does not fit the device's memory, as the one-line error a user acts on: which step, what the
allocator or compiler asked for, the rows and tokens per device, and the options that shrink it, named as the user
sets them (a flag, or a phase's own setting). XLA reports it as RESOURCE_EXHAUSTED, at the compile on a TPU and at
the first allocation on a CPU or GPU; without this the command would call it an internal failure."""
from __future__ import annotations

import re

from flax_bert.errors import InputError

GIB = 2 ** 30
_ALLOCATION = re.compile(r"allocat(?:e|ing) (\d+) bytes")  # CPU and GPU allocators
# libtpu's compiler: "... the total memory required for HLO temporaries (111.87G) exceeds available HBM (15.75G)."
TPU_REQUIRED = re.compile(r"(?:required for HLO temporaries|memory required[^(]*)\(([\d.]+)([KMGT])\)")
TPU_AVAILABLE = re.compile(r"available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def tpu_bytes(match: re.Match) -> int:
    """The bytes of a TPU_REQUIRED or TPU_AVAILABLE match."""
    return int(float(match.group(1)) * _UNITS[match.group(2)])


class OutOfMemoryError(InputError):
    """A train or eval step needs more device memory than there is with the options given."""


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text and "memory" in text.lower()


def what_was_asked(error: BaseException) -> str:
    """The size the failure names, in words ('' when it names none)."""
    text = str(error)
    required, available = TPU_REQUIRED.search(text), TPU_AVAILABLE.search(text)
    if required and available:
        return f"it needs {''.join(required.groups())} of the {''.join(available.groups())} HBM"
    if found := _ALLOCATION.search(text):
        return f"an allocation of {int(found.group(1)) / GIB:.2f} GiB failed"
    return ""


def train_step_error(error: BaseException, options, platform: str, phase=None,
                     accumulation_flag: bool = True, new_run_for_length: bool = True) -> OutOfMemoryError:
    """The error for a train step. `options`: the step's settings (a RunConfig as its phase trains it, or the
    bench's arguments); `phase`: the training phase when the run's --phases set it (its own batch is set there);
    `accumulation_flag`: the command has --gradient_accumulation_steps; `new_run_for_length`: a run directory
    fixes --max_seq_length, so a shorter one means another --output_dir (a phase's length may change until the
    phase has trained a step)."""
    rows, length = options.per_device_train_batch_size, options.max_seq_length
    in_phase = phase is not None and phase.per_device_train_batch_size
    shrink = []
    if rows > 1:
        batch = (f"lower phases[{phase.index}]'s per_device_train_batch_size ({rows} now)" if in_phase
                 else f"lower --per_device_train_batch_size ({rows} now)")
        if accumulation_flag:
            accumulation = (f"phases[{phase.index}]'s gradient_accumulation_steps" if in_phase
                            else "--gradient_accumulation_steps")
            batch += f" and raise {accumulation} ({options.gradient_accumulation_steps} now) to keep the global batch"
        shrink.append(batch)
    if options.remat_policy != "full":
        shrink.append(f"set --remat_policy full ({options.remat_policy} now: the backward pass keeps more activations)")
    if platform == "tpu" and getattr(options, "attention", "auto") == "xla":
        shrink.append("use --attention splash (xla materializes the attention scores)")
    if phase is not None:  # a phase not trained yet may change on resume (docs/phases.md)
        shrink.append(f"shorten phases[{phase.index}]'s max_seq_length ({length} now)")
    else:
        shrink.append(f"shorten --max_seq_length ({length} now" + (
            "; a run directory keeps its length: use another --output_dir)" if new_run_for_length else ")"))
    return OutOfMemoryError(_message("train", error, platform, f"{rows} rows x {length} tokens per device, remat "
                                     f"{options.remat_policy}, {options.dtype}", shrink))


def eval_step_error(error: BaseException, options, platform: str) -> OutOfMemoryError:
    rows, length = options.per_device_eval_batch_size, options.max_seq_length
    shrink = [f"lower --per_device_eval_batch_size ({rows} now)"] if rows > 1 else [
        f"shorten --max_seq_length ({length} now)"]
    return OutOfMemoryError(_message("eval", error, platform, f"{rows} rows x {length} tokens per device, "
                                     f"{options.dtype}", shrink))


def _message(step: str, error: BaseException, platform: str, shape: str, shrink: list[str]) -> str:
    asked = what_was_asked(error)
    remedy = shrink[0] if len(shrink) == 1 else ", ".join(shrink[:-1]) + ", or " + shrink[-1]
    return (f"the {step} step does not fit the {platform}'s memory ({asked + '; ' if asked else ''}{shape}): "
            f"{remedy}")
