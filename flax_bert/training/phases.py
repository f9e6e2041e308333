"""Training phases and batch-size warmup: which phase and which global batch every step trains with.

A run's phases (the `phases:` list of a YAML run config) and its batch-size warmup are laid out before the
first step as a `TrainingPlan`: for every step, its phase and its global batch. Both are functions of the
step alone, so every process, and every resume, agrees on them without talking.

Tokens here count row positions, rows x max_seq_length (padding included: packed rows are full but for
their last document), the same count `until_tokens`, `batch_size_warmup_tokens` and the logged `tokens` use.

A phase keeps what the phases before it set unless it sets it again (the recipe's context extension keeps
its longer rows and larger RoPE theta through the decay that follows). Its learning rate is one of
`warmup` (linear from 0 to the peak over the phase), `stable` (the peak) or `decay` (from the peak to 0 over
the phase, `linear` or `1-sqrt`); phases either all name theirs or none does (the run's schedule then spans
all of them).
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import re
from collections.abc import Callable, Sequence

from flax_bert.errors import InputError

PHASE_KEYS = ("name", "until_step", "until_tokens", "max_seq_length", "global_rope_theta", "mlm_probability",
              "learning_rate", "schedule", "decay_shape", "per_device_train_batch_size", "gradient_accumulation_steps",
              "mixture")
PHASE_SCHEDULES = ("warmup", "stable", "decay")
DECAY_SHAPES = ("linear", "1-sqrt")
MAX_WARMUP_SIZES = 8  # distinct global batches of a batch-size warmup (each one compiles the step once)


class PhaseError(InputError):
    """A `phases:` entry or a batch-size warmup that does not describe a run."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase, with what it inherited from the phases before it filled in."""
    index: int
    name: str
    until_step: int | None
    until_tokens: int | None
    max_seq_length: int
    mlm_probability: float
    global_rope_theta: float | None = None  # None: the model's own
    learning_rate: float | None = None      # the phase's peak; None: --learning_rate
    schedule: str | None = None             # warmup | stable | decay; None: the run's schedule
    decay_shape: str = "linear"
    per_device_train_batch_size: int | None = None  # None: the run's (longer rows often need fewer)
    gradient_accumulation_steps: int | None = None
    mixture: dict | None = None             # data-mixture weights by source name; None: the run's

    def describe(self) -> str:
        ends = (f"until step {self.until_step:,}" if self.until_step is not None
                else f"until {self.until_tokens:,} tokens")
        settings = [ends, f"max_seq_length {self.max_seq_length}", f"mlm_probability {self.mlm_probability:g}"]
        if self.global_rope_theta is not None:
            settings.append(f"global_rope_theta {self.global_rope_theta:g}")
        for option in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, option):
                settings.append(f"{option} {getattr(self, option)}")
        if self.schedule:
            peak = f" to {self.learning_rate:g}" if self.learning_rate is not None else ""
            settings.append(f"learning rate {self.schedule}{peak}" + (f" ({self.decay_shape})" if self.schedule == "decay" else ""))
        if self.mixture:
            settings.append("mixture " + ", ".join(f"{k}={v:g}" for k, v in self.mixture.items()))
        return f"phase {self.index} {self.name!r}: " + ", ".join(settings)


def _number(entry: dict, key: str, where: str, kind=int, positive=True):
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, str):  # YAML 1.1 reads 1.7e12 as text
        try:
            value = float(value)
        except ValueError:
            raise PhaseError(f"{where}: {key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PhaseError(f"{where}: {key} must be a number, got {value!r}")
    if kind is int:
        if not float(value).is_integer():
            raise PhaseError(f"{where}: {key} must be a whole number, got {value!r}")
        value = int(value)
    if positive and value <= 0:
        raise PhaseError(f"{where}: {key} must be positive, got {value!r}")
    return value if kind is int else float(value)


def parse_phases(entries: Sequence[dict], *, max_seq_length: int, mlm_probability: float) -> list[Phase]:
    """The run's phases, each checked and filled in from the ones before it (the run's options before the
    first). One line names the phase and the problem."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise PhaseError("phases must be a non-empty list of mappings, e.g. [{until_tokens: 1e9, max_seq_length: 1024}]")
    phases: list[Phase] = []
    inherited = dict(max_seq_length=max_seq_length, mlm_probability=mlm_probability, global_rope_theta=None,
                     learning_rate=None, decay_shape="linear", per_device_train_batch_size=None,
                     gradient_accumulation_steps=None, mixture=None)
    for index, entry in enumerate(entries):
        where = f"phases[{index}]"
        if not isinstance(entry, dict):
            raise PhaseError(f"{where} must be a mapping such as {{until_step: 1000, max_seq_length: 512}}, got {entry!r}")
        unknown = sorted(set(entry) - set(PHASE_KEYS))
        if unknown:
            raise PhaseError(f"{where}: unknown key(s) {', '.join(unknown)}; a phase takes {', '.join(PHASE_KEYS)}")
        until_step, until_tokens = _number(entry, "until_step", where), _number(entry, "until_tokens", where)
        if (until_step is None) == (until_tokens is None):
            raise PhaseError(f"{where}: give exactly one of until_step and until_tokens (where the phase ends)")
        length = _number(entry, "max_seq_length", where)
        if length is not None and length < 8:
            raise PhaseError(f"{where}: max_seq_length must be at least 8, got {length}")
        rate = _number(entry, "mlm_probability", where, kind=float)
        if rate is not None and not 0 < rate < 1:
            raise PhaseError(f"{where}: mlm_probability must be between 0 and 1, e.g. 0.15; got {rate}")
        theta = _number(entry, "global_rope_theta", where, kind=float)
        peak = _number(entry, "learning_rate", where, kind=float)
        rows = _number(entry, "per_device_train_batch_size", where)
        accumulation = _number(entry, "gradient_accumulation_steps", where)
        schedule = entry.get("schedule")
        if schedule is not None and schedule not in PHASE_SCHEDULES:
            raise PhaseError(f"{where}: schedule must be one of {', '.join(PHASE_SCHEDULES)}, got {schedule!r}")
        shape = entry.get("decay_shape")
        if shape is not None and shape not in DECAY_SHAPES:
            raise PhaseError(f"{where}: decay_shape must be linear or 1-sqrt, got {shape!r}")
        mixture = entry.get("mixture")
        if mixture is not None and (not isinstance(mixture, dict) or not mixture or any(
                isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in mixture.values())):
            raise PhaseError(f"{where}: mixture must map source names to weights >= 0, e.g. {{wiki: 2, code: 1}}")
        name = entry.get("name", f"phase{index}")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise PhaseError(f"{where}: name must be a word such as context-extension, got {name!r}")
        set_here = {"max_seq_length": length, "mlm_probability": rate, "global_rope_theta": theta,
                    "learning_rate": peak, "decay_shape": shape, "per_device_train_batch_size": rows,
                    "gradient_accumulation_steps": accumulation, "mixture": mixture}
        inherited.update({k: v for k, v in set_here.items() if v is not None})
        phases.append(Phase(index=index, name=name, until_step=until_step, until_tokens=until_tokens,
                            schedule=schedule, **inherited))
    named = [p.schedule is not None for p in phases]
    if any(named) and not all(named):
        raise PhaseError(f"phases[{named.index(False)}] has no schedule while other phases name theirs: give every "
                         "phase one of warmup, stable, decay, or none of them (the run's --lr_scheduler_type then "
                         "spans the phases)")
    return phases


@dataclasses.dataclass(frozen=True)
class BatchWarmup:
    """The global batch grows linearly in tokens seen from `start_rows` to `full_rows` over `tokens`, in steps of
    `increment` rows (a multiple of the data-parallel `unit`), at most MAX_WARMUP_SIZES sizes."""
    start_rows: int
    full_rows: int
    tokens: int
    unit: int

    @classmethod
    def checked(cls, start_rows: int, full_rows: int, tokens: int, unit: int) -> "BatchWarmup":
        if not 1 <= start_rows < full_rows:
            raise PhaseError(f"--batch_size_warmup_start must be between 1 and the global batch ({full_rows} rows) "
                             f"less one, got {start_rows}")
        if start_rows % unit:
            raise PhaseError(f"--batch_size_warmup_start {start_rows} is not a multiple of the data-parallel width "
                             f"{unit} (devices x gradient_accumulation_steps): use {max(unit, start_rows // unit * unit)} "
                             f"or {-(-start_rows // unit) * unit}")
        return cls(start_rows, full_rows, tokens, unit)

    @property
    def increment(self) -> int:
        span = self.full_rows - self.start_rows
        return self.unit * max(1, math.ceil(span / self.unit / (MAX_WARMUP_SIZES - 1)))

    def rows_at(self, tokens_seen: int) -> int:
        if tokens_seen >= self.tokens:
            return self.full_rows
        ramp = (self.full_rows - self.start_rows) * tokens_seen / self.tokens
        return min(self.full_rows, self.start_rows + int(ramp // self.increment) * self.increment)

    def sizes(self) -> list[int]:
        return sorted({*range(self.start_rows, self.full_rows, self.increment), self.full_rows})


@dataclasses.dataclass(frozen=True)
class Span:
    """Consecutive steps [start, end) of one phase with one global batch; `tokens_before`: tokens of the steps
    before `start`."""
    start: int
    end: int
    phase: int
    global_batch: int
    max_seq_length: int
    tokens_before: int

    def tokens_until(self, step: int) -> int:
        """Tokens of every step before `step` (start <= step <= end)."""
        return self.tokens_before + (step - self.start) * self.global_batch * self.max_seq_length


class TrainingPlan:
    """Every step's phase and global batch (see the module's docstring). Steps are numbered from 0: step s is
    the one that turns state.step s into s + 1."""

    def __init__(self, phases: list[Phase], spans: list[Span], has_phases: bool):
        self.phases, self.spans, self.has_phases = phases, spans, has_phases
        self._starts = [span.start for span in spans]

    @property
    def total_steps(self) -> int:
        return self.spans[-1].end

    def span_at(self, step: int) -> Span:
        return self.spans[min(bisect.bisect_right(self._starts, step) - 1, len(self.spans) - 1)]

    def phase_at(self, step: int) -> Phase:
        return self.phases[self.span_at(step).phase]

    def global_batch_at(self, step: int) -> int:
        return self.span_at(step).global_batch

    def tokens_until(self, step: int) -> int:
        """Tokens trained by the steps before `step` (all of them at total_steps)."""
        return self.span_at(step).tokens_until(min(step, self.total_steps))

    def phase_end(self, phase: int) -> int:
        return max(span.end for span in self.spans if span.phase == phase)

    def phase_start(self, phase: int) -> int:
        return min(span.start for span in self.spans if span.phase == phase)

    def rows_start(self, step: int) -> int:
        """The first step that reads the same packed rows as `step`: the start of the run of phases with its
        max_seq_length. A data iterator begins there, and its batch b trains step rows_start + b."""
        phase = self.span_at(step).phase
        while phase > 0 and self.phases[phase - 1].max_seq_length == self.phases[phase].max_seq_length:
            phase -= 1
        return self.phase_start(phase)

    def batch_sizes(self, start: int) -> Callable[[int], int]:
        """Batch b of an iterator that began at step `start` -> its global batch."""
        return lambda b: self.global_batch_at(start + b)

    def trained(self, step: int) -> list[list[int]]:
        """What the steps before `step` were: [start, end, phase, global batch, max_seq_length] for each span.
        A checkpoint keeps it, so that phases changed on resume may differ only in steps not yet trained."""
        return [[span.start, min(span.end, step), span.phase, span.global_batch, span.max_seq_length]
                for span in self.spans if span.start < step]

    def check_continues(self, trained: list[list[int]], step: int) -> None:
        """Refuses, in one line, phases (or a batch-size warmup) that would have trained the steps before `step`
        differently from how the checkpoint's were trained: only steps still to come may change."""
        now = self.trained(step)
        if trained != now:
            where = next((a for a, b in zip(trained, now) if a != b), (trained or now)[0])
            raise PhaseError(f"the phases or batch-size warmup given now change steps already trained (from step "
                             f"{where[0]}: the checkpoint trained them in phase {where[2]} with {where[3]} rows of "
                             f"{where[4]} tokens): keep them as they were up to step {step}; later ones may change")

    def distinct_batches(self) -> list[int]:
        return sorted({span.global_batch for span in self.spans})

    def learning_rate_schedule(self, peak: float) -> Callable | None:
        """The phases' own schedule (None when they name none): optimizer update count -> learning rate. A phase
        warms up from 0 to its peak (its learning_rate, else `peak`), holds it, or decays from it to 0."""
        if not self.has_phases or self.phases[0].schedule is None:
            return None
        import jax.numpy as jnp
        import numpy as np

        first = np.asarray([self.phase_start(p.index) for p in self.phases], np.float32)
        last = np.asarray([self.phase_end(p.index) for p in self.phases], np.float32)
        starts, ends = jnp.asarray(first), jnp.asarray(last)
        # A multiplication by each phase's reciprocal length, not a division: XLA turns a division by a constant
        # (one phase: a constant index) into that multiplication, and the rate must not depend on whether later
        # phases exist (a run resumed with phases added trains bit-identically to the run planned whole).
        reciprocal_lengths = jnp.asarray(np.float32(1) / np.maximum(last - first, np.float32(1)))
        kinds = jnp.asarray([("warmup", "stable", "linear", "1-sqrt").index(
            p.decay_shape if p.schedule == "decay" else p.schedule) for p in self.phases], jnp.int32)
        peaks = jnp.asarray([peak if p.learning_rate is None else p.learning_rate for p in self.phases], jnp.float32)

        def schedule(count):
            index = jnp.clip(jnp.searchsorted(ends, count, side="right"), 0, len(self.phases) - 1)
            progress = jnp.clip((count - starts[index]) * reciprocal_lengths[index], 0.0, 1.0)
            factor = jnp.select([kinds[index] == 0, kinds[index] == 1, kinds[index] == 2],
                                [progress, jnp.ones_like(progress), 1.0 - progress], 1.0 - jnp.sqrt(progress))
            return peaks[index] * factor

        return schedule

    def describe(self) -> list[str]:
        """Lines for the log: each phase's steps and tokens, and the batch sizes (each compiles the step)."""
        lines = []
        for phase in self.phases:
            start, end = self.phase_start(phase.index), self.phase_end(phase.index)
            prefix = phase.describe() + ": " if self.has_phases else ""
            lines.append(f"{prefix}steps {start:,} to {end:,}, tokens {self.tokens_until(start):,} to "
                         f"{self.tokens_until(end):,}")
        sizes = self.distinct_batches()
        if len(sizes) > 1:
            lines.append(f"batch-size warmup: global batch {' -> '.join(map(str, sizes))} rows ({len(sizes)} sizes: the "
                         "step compiles once for each, per max_seq_length)")
        return lines


def make_plan(phases: list[Phase] | None, global_batch: int | Callable[[Phase], int], warmup: BatchWarmup | None, *,
              max_seq_length: int, mlm_probability: float, total_steps: int | None = None,
              total_tokens: int | None = None) -> TrainingPlan:
    """Lays out every step. `global_batch`: rows per step, or a phase -> its rows. A batch-size warmup caps the
    rows while it lasts. Without phases the run is one phase ending at `total_steps` (or `total_tokens`)."""
    batch_of = global_batch if callable(global_batch) else lambda _: global_batch
    has_phases = bool(phases)
    if not phases:
        phases = [Phase(index=0, name="train", until_step=total_steps, until_tokens=None if total_steps else total_tokens,
                        max_seq_length=max_seq_length, mlm_probability=mlm_probability)]
    spans: list[Span] = []
    step = tokens = 0
    for phase in phases:
        first = step
        while (step < phase.until_step) if phase.until_step is not None else (tokens < phase.until_tokens):
            rows = min(warmup.rows_at(tokens), batch_of(phase)) if warmup else batch_of(phase)
            if spans and spans[-1].phase == phase.index and spans[-1].global_batch == rows:
                spans[-1] = dataclasses.replace(spans[-1], end=step + 1)
            else:
                spans.append(Span(step, step + 1, phase.index, rows, phase.max_seq_length, tokens))
            tokens += rows * phase.max_seq_length
            step += 1
        if step == first:
            ends = (f"until_step {phase.until_step:,}" if phase.until_step is not None
                    else f"until_tokens {phase.until_tokens:,}")
            raise PhaseError(f"phases[{phase.index}] ends ({ends}) before it starts (step {step:,}, {tokens:,} "
                             f"tokens): each phase must end after the one before it")
    return TrainingPlan(phases, spans, has_phases)
