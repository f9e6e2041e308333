"""What the train loop reports: the window of metrics between two log lines, each logged row (metrics.jsonl,
TensorBoard and the log line, with the phase, batch and tokens of the step), the compile time, and the progress
bar (tqdm on a terminal, plain lines elsewhere)."""
from __future__ import annotations

import contextlib
import logging
import sys
import time

import jax

from flax_bert.training import host_allocator
from flax_bert.training.metrics import MetricsWriter
from flax_bert.training.peak_flops import device_peak_flops, peak_at_least, step_flops_per_token, total_peak_flops
from flax_bert.training.phases import Phase, TrainingPlan

log = logging.getLogger("flax_bert")


class TrainLog:
    """The loop's reporting, one phase at a time (`enter`): metrics of the steps since the last row are
    accumulated (`add`), written as one row (`row`), time spent elsewhere (evaluation) left out (`untimed`)."""

    def __init__(self, metrics: MetricsWriter, plan: TrainingPlan, progress):
        self.metrics, self.plan, self.progress = metrics, plan, progress
        self.window = Window()

    def started(self, model_config, mesh, step: int, phase: Phase) -> None:
        """What the loop will do: the device, the steps, the batch, the phases."""
        log.info("%s", host_allocator.describe())  # set (or not) when the process started
        peak, peak_source = device_peak_flops(model_config.dtype)
        log.info("training %s: %d steps, global batch %d x %d tokens on %d devices (mesh %s); peak %.3g FLOP/s/device "
                 "(%s)", model_config.model_type, self.plan.total_steps, self.plan.global_batch_at(step),
                 phase.max_seq_length, jax.device_count(), dict(mesh.shape), peak, peak_source)
        if self.plan.has_phases or len(self.plan.distinct_batches()) > 1:
            for line in self.plan.describe():
                log.info("%s", line)

    def enter(self, phase: Phase, model_config, masking) -> None:
        """A phase's FLOPs per token (its length and mask rate) and the device peak for its MFU."""
        self.phase, self.dtype = phase, model_config.dtype
        self.peak, self.flops = device_peak_flops(model_config.dtype)[0], step_flops_per_token(model_config, masking)
        self.window.reset()

    def compiled(self, metrics, step: int, started: float) -> None:
        """The first step of a phase (its compile included); the window starts after it."""
        jax.block_until_ready(metrics["loss"])
        log.info("first step (compile included) took %.1f s", time.perf_counter() - started)
        self.metrics.write(step, {"compile_seconds": time.perf_counter() - started})
        self.window.reset()

    def add(self, metrics, tokens: int, wait: float) -> None:
        self.window.add(metrics, tokens, wait)

    @contextlib.contextmanager
    def untimed(self):
        """Time the throughput must not count (an evaluation, a downstream fine-tuning, an upload)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.window.start += time.perf_counter() - started

    def row(self, step: int, data_state: dict) -> None:
        """The logged row of `step`: the window's means, the step's phase, batch and cumulative tokens, and a
        mixture's tokens per source."""
        self.peak = peak_at_least(self.peak, self.window.tokens_per_second() * self.flops, self.dtype)
        record = self.window.summary(self.flops, total_peak_flops(self.peak))
        record.update(global_batch_size=self.plan.global_batch_at(step - 1), max_seq_length=self.phase.max_seq_length,
                      mlm_probability=self.phase.mlm_probability, phase=self.phase.index,
                      tokens=self.plan.tokens_until(step))
        # a mixture's tokens drawn from each source so far (the data state after this step's batch)
        record.update({f"tokens_{name}": float(tokens) for name, tokens in data_state.get("tokens", {}).items()})
        self.metrics.write(step, record)
        self.progress.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
        log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in record.items()))
        self.window.reset()


class Window:
    """Metrics accumulated between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.values, self.tokens, self.wait, self.steps, self.start = {}, 0, 0.0, 0, time.perf_counter()
        self.last_learning_rate = float("nan")
        self.cpu_start = time.process_time()  # this process's CPU seconds, all threads: host work + XLA:CPU

    def add(self, metrics, tokens, wait):
        self.last_learning_rate = float(metrics.get("learning_rate", float("nan")))  # the rate at the logged step
        for name, value in metrics.items():
            self.values[name] = self.values.get(name, 0.0) + float(value)
        self.tokens += tokens
        self.wait += wait
        self.steps += 1

    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def summary(self, flops_per_token: float, peak_flops: float) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        mean = {name: value / steps for name, value in self.values.items()}
        tokens_per_second = self.tokens / elapsed
        record = {"train_loss": mean.get("loss", float("nan")), "mlm_accuracy": mean.get("mlm_accuracy", float("nan")),
                  "learning_rate": self.last_learning_rate, "grad_norm": mean.get("grad_norm", float("nan")),
                  "tokens_per_second": tokens_per_second, "mfu": tokens_per_second * flops_per_token / peak_flops,
                  "step_seconds": elapsed / steps, "input_wait_seconds": self.wait / steps,
                  "cpu_seconds_per_step": (time.process_time() - self.cpu_start) / steps}
        for name in ("nsp_loss", "nsp_accuracy", "mlm_loss"):
            if name in mean:
                record[name] = mean[name]
        return record


def progress_bar(enabled: bool, initial: int, total: int, stream=None):
    """tqdm's bar on a terminal; elsewhere (a log file, a pipe) plain lines, without the bar's \\r frames."""
    stream = stream or sys.stderr
    if enabled and not stream.isatty():
        return PlainProgress(initial, total, stream)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


class PlainProgress:
    """The progress bar's calls (update, set_postfix, close), written as one line every `interval` seconds."""

    def __init__(self, initial: int, total: int, stream, interval: float = 30.0):
        self.step, self.total, self.stream, self.interval = initial, total, stream, interval
        self.start_step, self.start = initial, time.monotonic()
        self.last_line, self.postfix = self.start, ""

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.step += n
        if time.monotonic() - self.last_line >= self.interval:
            self._line()

    def close(self) -> None:
        if self.step > self.start_step:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        rate = (self.step - self.start_step) / max(self.last_line - self.start, 1e-9)
        self.stream.write(f"train: step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%), "
                          f"{rate:.2f} steps/s" + (f", {self.postfix}" if self.postfix else "") + "\n")
        self.stream.flush()
