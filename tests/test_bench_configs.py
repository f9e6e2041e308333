"""The bench's JAX worker on a tiny version of every shipped run config (configs/*.yaml).

Each config keeps its own objective, model family, dtype and remat; only the sizes shrink, so a
config added to configs/ is covered without touching this file."""
import pathlib

import pytest

from flax_bert import bench
CONFIGS = sorted((pathlib.Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128,
            max_seq_length=16, per_device_train_batch_size=1)
# the same program, compiled with XLA's cheap backend settings: a third of the compile time
CHEAP_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(autouse=True)
def private_peak_cache(tmp_path_factory, monkeypatch):
    """One matmul-peak measurement for the whole module, in a cache of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "bench-configs-cache"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_bench_worker_runs_every_config(config):
    args = bench.build_parser().parse_args([str(config), "--steps", "1", "--warmup_steps", "0"])
    run, model_config = bench.load_setup(args, overrides=TINY)
    assert model_config.hidden_size == 32 and model_config.vocab_size == 128
    result = bench.run_jax(args, setup=(run, model_config), compiler_options=CHEAP_COMPILE)
    assert result["loss"] > 0 and result["tokens_per_second"] > 0
    assert result["global_batch_size"] * 16 == pytest.approx(result["tokens_per_second"] * result["step_seconds"])
    assert 0 < result["mfu"] <= 1.0


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_the_pytorch_side_builds_every_config_with_its_own_vocabulary(config):
    """--compare torch builds transformers' model from the config's own vocabulary and the special ids of the
    tokenizer a run would train (ModernBERT's default pad id 50283 lay outside modernbert-tiny's 8192)."""
    torch = pytest.importorskip("torch")
    args = bench.build_parser().parse_args([config.stem])  # a bare name, as `flax-bert bench roberta-base`
    run, model_config = bench.load_setup(args, overrides={k: v for k, v in TINY.items() if k != "vocab_size"})
    assert model_config.pad_token_id < model_config.vocab_size
    batch = bench.random_batch(2, 16, model_config, nsp=run.objective == "mlm+nsp")
    model = bench.torch_model(model_config, nsp=run.objective == "mlm+nsp")
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(batch["input_ids"]).long())
    assert out[0].shape[-1] == model_config.vocab_size or run.objective == "mlm+nsp"
