"""The MFU denominator: exact device-name lookup per dtype, the per-machine cache of the CPU peak,
a peak that a run's own throughput can only raise, and one FLOP count for training and the bench."""
import json

import pytest

from flax_bert.training import peak_flops
from flax_bert.models.config import ModelConfig, flops_per_token
from flax_bert.training.step import MaskingConfig


def test_device_names_match_exactly_and_by_dtype():
    assert peak_flops.table_peak("NVIDIA L4", "bfloat16") == 121e12
    assert peak_flops.table_peak("NVIDIA L40S", "bfloat16") == 362e12  # not the L4's entry
    assert peak_flops.table_peak("NVIDIA L40", "bfloat16") is None  # unknown: measured, never a near name
    assert peak_flops.table_peak("NVIDIA A100-SXM4-40GB", "bfloat16") == 312e12
    assert peak_flops.table_peak("NVIDIA A100-SXM4-40GB", "float32") == 156e12  # TF32, not the bf16 figure
    assert peak_flops.table_peak("NVIDIA H100 80GB HBM3", "float16") == 989e12
    assert peak_flops.table_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert peak_flops.table_peak("TPU v5 lite", "bfloat16") == 197e12
    assert peak_flops.table_peak("TPU v5", "bfloat16") == 459e12
    assert peak_flops.table_peak("Tesla V100-SXM2-16GB", "float32") == 15.7e12


def test_cpu_peak_is_the_best_measurement_kept_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = []

    def fake_measure(dtype):  # stands in for the jitted matmul so the numbers are known
        measured.append(dtype)
        return [180e9, 100e9][len(measured) - 1]

    monkeypatch.setattr(peak_flops, "measure_matmul_peak", fake_measure)
    assert peak_flops.cpu_peak_flops("float32")[0] == 180e9
    peak, source = peak_flops.cpu_peak_flops("float32")  # a second start reads the cache
    assert peak == 180e9 and len(measured) == 1 and "cached" in source
    peak, source = peak_flops.cpu_peak_flops("float32", remeasure=True)  # a noisy 100 cannot lower it
    assert peak == 180e9 and len(measured) == 2 and "100.0" in source
    cache = json.loads((tmp_path / "flax-bert" / "matmul_peak.json").read_text())
    (key, value), = cache.items()
    assert value == 180e9 and "float32" in key and "jax" in key and "cores" in key


def test_a_run_faster_than_the_peak_raises_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    total = peak_flops.total_peak_flops(100e9)
    assert peak_flops.peak_at_least(100e9, 0.5 * total, "float32") == 100e9
    raised = peak_flops.peak_at_least(100e9, 1.5 * total, "float32")
    assert raised == pytest.approx(150e9)
    assert peak_flops.cached_peak("float32") == pytest.approx(150e9)  # the next run starts from it
    assert 1.5 * total / peak_flops.total_peak_flops(raised) == pytest.approx(1.0)


def test_training_and_bench_count_the_sparse_head_the_same_way():
    config = ModelConfig.for_family("roberta")
    masking = MaskingConfig(special_ids=(0, 1, 2), mask_token_id=3, random_vocab_size=50265, max_seq_length=128)
    assert masking.num_slots == 24
    assert peak_flops.step_flops_per_token(config, masking) == flops_per_token(config, 128, 24 / 128)
    assert peak_flops.step_flops_per_token(config, masking, dense_head=True) == flops_per_token(config, 128, 1.0)
