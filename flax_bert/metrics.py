"""Training metrics: the peak FLOP/s that MFU divides by (FLOPs per token: `config.flops_per_token`),
and where metrics are written."""
from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp

from flax_bert.bad_input import InputFileNotFoundError


# Dense bf16 peak FLOP/s per chip (vendor figures) for devices we cannot time here.
PEAK_FLOPS_BY_DEVICE = {
    "TPU v2": 45e12, "TPU v3": 123e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "A100": 312e12, "H100": 989e12, "H200": 989e12, "L4": 121e12, "A10G": 125e12, "V100": 125e12,
}


def measure_matmul_peak(dtype: str, repeats: int = 5) -> float:
    """Best FLOP/s of a jitted square matmul in `dtype` over a few sizes (the denominator of MFU).

    The best, not the median: a peak is what the hardware can do, and on a shared host the median
    would credit us with other processes' interference."""
    # Accelerators need much larger matrices than CPU cores to reach their peak.
    sizes = (1024, 2048) if jax.default_backend() == "cpu" else (4096, 8192, 16384)
    best = 0.0
    matmul = jax.jit(jnp.matmul)
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        matmul(a, b).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def device_peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s per device, where the number comes from): a table for accelerators, measured on CPU."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        kind = getattr(device, "device_kind", "")
        for name, peak in PEAK_FLOPS_BY_DEVICE.items():
            if name.lower() in kind.lower():
                return peak, f"{kind} spec sheet"
    return measure_matmul_peak(dtype), "measured matmul"


class MetricsWriter:
    """One JSON object per line in OUTPUT_DIR/metrics.jsonl, and TensorBoard event files (process 0 only)."""

    def __init__(self, output_dir: str | pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(output_dir) / "metrics.jsonl"
        self._tensorboard = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self._tensorboard = SummaryWriter(str(pathlib.Path(output_dir) / "tensorboard"))
            except ImportError:  # metrics.jsonl still has everything
                pass

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _plain(value):
    try:
        return float(value) if not isinstance(value, (str, bool, int)) else value
    except (TypeError, ValueError):
        return str(value)


def read_metrics(output_dir: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise InputFileNotFoundError(f"no metrics.jsonl in {output_dir}: is it a flax-bert run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
