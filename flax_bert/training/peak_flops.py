"""The denominator of MFU: a device's peak FLOP/s in the run's compute dtype, and the FLOPs per
token the step is credited with (the numerator's other half, the same for training and the bench).

Accelerators: vendor figures, looked up by exact device name. CPU: measured with a jitted matmul,
kept per machine in a small JSON file (the best measurement so far), so a start does not re-measure
and one noisy measurement cannot lower the peak; a run that goes faster than the peak raises it, so
an MFU above 100% cannot be reported.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp

log = logging.getLogger("flax_bert")

# Dense peak FLOP/s per chip from the vendors' sheets: (bfloat16/float16, float32). The float32
# figure is what a float32 matmul runs at under JAX's default precision: TF32 tensor cores on NVIDIA
# Ampere and newer (half the bf16 rate), one bf16 pass on a TPU's MXU (the bf16 rate).
PEAK_FLOPS_BY_DEVICE = {
    "TPU v2": (45e12, 45e12), "TPU v3": (123e12, 123e12), "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12), "TPU v5e": (197e12, 197e12), "TPU v5": (459e12, 459e12),
    "TPU v5p": (459e12, 459e12), "TPU v6 lite": (918e12, 918e12), "TPU v6e": (918e12, 918e12),
    "A100": (312e12, 156e12), "H100": (989e12, 494.5e12), "H100 PCIe": (756e12, 378e12), "H200": (989e12, 494.5e12),
    "L4": (121e12, 60.5e12), "L40S": (362e12, 181e12), "A10G": (125e12, 62.5e12), "V100": (125e12, 15.7e12),
}
_VENDOR_PREFIXES = ("NVIDIA ", "Tesla ")


def table_peak(device_kind: str, dtype: str) -> float | None:
    """The table's peak for `device_kind` (as JAX reports it) in `dtype`, None when it has no entry.

    A name matches the whole kind, or its start followed by a space or dash ("A100-SXM4-40GB",
    "H100 80GB HBM3"), never a longer model name ("L4" is not "L40S"); the longest match wins
    ("TPU v5 lite" before "TPU v5")."""
    kind = device_kind.strip()
    for prefix in _VENDOR_PREFIXES:
        kind = kind.removeprefix(prefix)
    matches = [name for name in PEAK_FLOPS_BY_DEVICE
               if kind.lower() == name.lower() or (kind.lower().startswith(name.lower()) and kind[len(name)] in " -_")]
    if not matches:
        return None
    half, single = PEAK_FLOPS_BY_DEVICE[max(matches, key=len)]
    return single if dtype == "float32" else half


# ----------------------------------------------------------------------------- measured on CPU
def measure_matmul_peak(dtype: str, repeats: int = 5) -> float:
    """Best FLOP/s of a jitted square matmul in `dtype` over a few sizes.

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


def peak_cache_path() -> pathlib.Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache_home) / "flax-bert" / "matmul_peak.json"


def machine_key(dtype: str) -> str:
    """What the measured peak depends on: CPU model, usable cores, dtype, JAX version."""
    model = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} | {cores} cores | {dtype} | jax {jax.__version__}"


def _read_cache() -> dict:
    try:
        return json.loads(peak_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def cached_peak(dtype: str) -> float | None:
    value = _read_cache().get(machine_key(dtype))
    return float(value) if value else None


def record_peak(dtype: str, flops: float) -> float:
    """Keep the best peak seen on this machine; returns it. An unwritable cache only costs a re-measure."""
    cache = _read_cache()
    key = machine_key(dtype)
    best = max(flops, float(cache.get(key) or 0.0))
    if best > float(cache.get(key) or 0.0):
        cache[key] = best
        path = peak_cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
        except OSError as err:
            log.warning("cannot keep the measured matmul peak in %s (%s)", path, err)
    return best


def cpu_peak_flops(dtype: str, remeasure: bool = False) -> tuple[float, str]:
    """(host peak FLOP/s, where it comes from): the cached best, measured (and cached) when absent."""
    cached = cached_peak(dtype)
    if cached and not remeasure:
        return cached, f"best matmul measured on this machine, cached in {peak_cache_path()}"
    measured = measure_matmul_peak(dtype)
    best = record_peak(dtype, measured)
    source = f"matmul measured now: {measured / 1e9:.1f} GFLOP/s"
    if best > measured:
        source += f"; best so far on this machine {best / 1e9:.1f} GFLOP/s ({peak_cache_path()})"
    return best, source


def device_peak_flops(dtype: str = "float32", remeasure: bool = False) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number comes from): the table for accelerators, measured on CPU
    (and on an accelerator the table does not know)."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        kind = getattr(device, "device_kind", "")
        peak = table_peak(kind, dtype)
        if peak:
            return peak, f"{kind} spec sheet, {dtype}"
        return measure_matmul_peak(dtype), f"matmul measured now ({kind!r} is not in the table)"
    return cpu_peak_flops(dtype, remeasure)


def total_peak_flops(peak_per_device: float) -> float:
    """All devices' peak. Simulated CPU devices share one host's cores, so on CPU it is a host's peak
    times the number of processes (one host each), not times the number of devices."""
    if jax.devices()[0].platform == "cpu":
        return peak_per_device * jax.process_count()
    return peak_per_device * jax.device_count()


def peak_at_least(peak_per_device: float, achieved_total_flops: float, dtype: str) -> float:
    """The per-device peak, raised to what a run achieved when that is more: the matmul measurement ran
    while the host was busy. On CPU the better figure is kept for the next runs. Keeps MFU <= 100%."""
    achieved = achieved_total_flops * peak_per_device / total_peak_flops(peak_per_device)
    if achieved <= peak_per_device:
        return peak_per_device
    log.warning("the run reached %.1f GFLOP/s per device, above the peak of %.1f GFLOP/s measured when the host "
                "was busier: the peak is raised to it", achieved / 1e9, peak_per_device / 1e9)
    if jax.devices()[0].platform == "cpu":
        record_peak(dtype, achieved)
    return achieved


def step_flops_per_token(model_config, masking, dense_head: bool = False) -> float:
    """FLOPs per token credited to one train step, for training and the bench alike: the vocabulary head
    counts for the positions the step sends through it (the prediction slots, or every position with a
    dense head)."""
    from flax_bert.models.config import flops_per_token

    length = masking.max_seq_length
    return flops_per_token(model_config, length, 1.0 if dense_head else masking.num_slots / length)
