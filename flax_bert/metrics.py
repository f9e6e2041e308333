"""Training metrics: FLOPs per token and MFU (the design-notes formula), and where metrics are written.

F = 6·N_enc + 12·L·s·d + ρ·(6·d·V + 6·d²), N_enc = L·(4d² + 2·d·f): encoder matmul weights,
attention scores, and the vocabulary head on the fraction ρ of positions sent through it.
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp

from flax_bert.config import ModelConfig

# Dense bf16 peak FLOP/s per chip (vendor figures) for devices we cannot time here.
PEAK_FLOPS_BY_DEVICE = {
    "TPU v2": 45e12, "TPU v3": 123e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "A100": 312e12, "H100": 989e12, "H200": 989e12, "L4": 121e12, "A10G": 125e12, "V100": 125e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int, head_fraction: float) -> float:
    d, f, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    encoder_weights = layers * (4 * d * d + 2 * d * f)
    return 6 * encoder_weights + 12 * layers * seq_len * d + head_fraction * (6 * d * vocab + 6 * d * d)


def measure_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large jitted matmul on the default device, in the compute dtype (best of repeats)."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


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
        raise FileNotFoundError(f"no metrics.jsonl in {output_dir}: is it a flax-bert run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
