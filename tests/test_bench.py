"""The benchmark: FLOP accounting, input checks, and one quick end-to-end run beside PyTorch.

Only the functional side is tested (fields exist, are positive and consistent); timings are
machine-dependent and are not asserted.
"""
import json

import pytest

from flax_bert import bench
from flax_bert.models.config import ModelConfig, flops_per_token


def test_flops_per_token_matches_the_design_notes():
    roberta_base = ModelConfig.for_family("roberta")
    assert round(flops_per_token(roberta_base, 128, 0.15) / 1e6) == 559
    assert round(flops_per_token(roberta_base, 128, 1.0) / 1e6) == 759


def test_unknown_config_and_too_long_sequences_are_rejected():
    with pytest.raises(FileNotFoundError, match="configs/tiny.yaml"):
        bench.main(["no-such-config"])
    with pytest.raises(bench.BenchError, match="position table"):
        bench.main(["tiny", "--max_seq_length", "512"])


def test_bool_flags_read_as_train_reads_them_and_refuse_anything_else(capsys):
    parse = bench.build_parser().parse_args
    assert parse(["tiny", "--torch_hugepages", "on", "--hugepages", "off"]).torch_hugepages is True
    assert parse(["tiny", "--hugepages", "off"]).hugepages is False
    assert parse(["tiny", "--scan_layers", "False"]).scan_layers is False
    with pytest.raises(SystemExit) as stop:  # a misspelt value was read as false
        parse(["tiny", "--torch_hugepages", "ture"])
    assert stop.value.code == 2 and "expected true or false, got 'ture'" in capsys.readouterr().err


def test_a_step_too_large_for_memory_names_the_bench_flags_that_shrink_it():
    """The JAX child's out-of-memory becomes the parent's one line; each flag it names is one the bench takes."""
    args = bench.build_parser().parse_args(["tiny", "--per_device_train_batch_size", "64", "--max_seq_length", "64"])
    error = bench.too_large(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 34503644496 bytes."), args)
    message = str(error)
    assert message.startswith("the train step does not fit the cpu's memory (an allocation of 32.13 GiB failed; 64 rows "
                              "x 64 tokens per device, remat none, float32): lower --per_device_train_batch_size (64 "
                              "now), set --remat_policy full"), message
    flags = [word for word in message.split() if word.startswith("--")]
    assert flags == ["--per_device_train_batch_size", "--remat_policy", "--max_seq_length"]
    bench.build_parser().parse_args(["tiny", "--per_device_train_batch_size", "8", "--remat_policy", "full",
                                     "--max_seq_length", "32"])


def test_random_batch_has_no_special_tokens():
    config = ModelConfig.for_family("roberta", vocab_size=50)
    batch = bench.random_batch(4, 16, config)
    specials, mask_id = bench.special_token_ids(config)
    assert mask_id == 49 and set(specials) >= {0, 1, 2, 49}
    assert batch["input_ids"].shape == (4, 16) and not set(batch["input_ids"].ravel()) & set(specials)
    assert batch["segment_ids"].min() == 1  # no padding: every token counts towards tokens/s


def test_bench_tiny_against_torch_writes_the_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # conftest gives the children 8 simulated CPU devices (and the cheaper backend pass: speed is not tested
    # here): global batch 8 x 1 rows for both frameworks
    code = bench.main(["tiny", "--per_device_train_batch_size", "1", "--max_seq_length", "32", "--steps", "2",
                       "--warmup_steps", "0", "--compare", "torch", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    for key in ("tokens_per_second", "mfu", "compile_seconds", "peak_memory_bytes", "step_seconds",
                "matmul_peak_flops", "torch_tokens_per_second", "torch_peak_memory_bytes", "torch_mfu",
                "speedup_vs_torch"):
        assert result[key] > 0, key
    assert result["global_batch_size"] == 8 and result["timed_steps"] == result["torch_timed_steps"] == 2
    tokens_per_step = result["global_batch_size"] * 32
    assert result["tokens_per_second"] == pytest.approx(tokens_per_step / result["step_seconds"])
    assert result["torch_tokens_per_second"] == pytest.approx(tokens_per_step / result["torch_step_seconds"])
    assert result["speedup_vs_torch"] == pytest.approx(result["tokens_per_second"] / result["torch_tokens_per_second"])
    assert result["peak_memory_kind"] == "rss" and result["sparse_head"] is True
    # each child reports its own allocator: huge pages for JAX (as `flax-bert train`), PyTorch as it runs by default
    assert (result["malloc_hugepages"], result["torch_malloc_hugepages"]) == (True, False)
    printed = capsys.readouterr().out
    assert "jax" in printed and "torch" in printed and "tokens/s" in printed
