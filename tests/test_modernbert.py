"""ModernBERT: logits parity with transformers' PyTorch ModernBertForMaskedLM, conversion both ways,
packed rows, scan = loop, the sparse head."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax_bert.models.config import ModelConfig, flops_per_token
from flax_bert.models.convert import assign_hf_tensors, load_hf, save_hf, to_hf_tensors
from flax_bert.models import create_model, normalize_names

VOCAB = 96


def hf_model(layers=4, period=3, window=8, attn="eager", seed=0, **extra):
    torch.manual_seed(seed)
    config = transformers.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        local_attention=window, global_attn_every_n_layers=period, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2, attn_implementation=attn, **extra)
    model = transformers.ModernBertForMaskedLM(config).eval()
    with torch.no_grad():  # random, not initial, norms and biases, so a mix-up of them shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from(model, **overrides):
    cfg = ModelConfig.from_hf_dict(model.config.to_dict(), **overrides)
    ours = create_model(cfg)
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assign_hf_tensors(ours, normalize_names(tensors, cfg))
    return ours


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


CASES = [  # layers, global period, window, batch, length, padded tail of row 1, attention
    (4, 3, 8, 2, 20, 5, "eager"),     # the default period, sequence longer than the window, padding
    (5, 2, 4, 1, 17, 0, "sdpa"),      # period 2, window 4
    (2, 1, 8, 2, 24, 0, "eager"),     # every layer global
]


@pytest.mark.parametrize("layers,period,window,batch,length,pad,attn", CASES)
def test_logits_match_transformers(layers, period, window, batch, length, pad, attn):
    reference = hf_model(layers, period, window, attn)
    ours = ours_from(reference)
    kinds = set(ours.config.layer_types)
    assert kinds == ({"full_attention"} if period == 1 else {"full_attention", "sliding_attention"})
    rng = np.random.default_rng(layers)
    ids = rng.integers(3, VOCAB, (batch, length))
    mask = np.ones_like(ids)
    if pad and batch > 1:
        ids[1, length - pad:], mask[1, length - pad:] = 0, 0
    expected = torch_logits(reference, ids, mask)
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def reference():
    return hf_model(layers=4, period=3, window=8)


def test_scan_and_loop_and_remat_agree(reference):
    """The same numbers through the per-layer window choice; layer 0's attention norm gets no gradient."""
    from flax import nnx

    ids = jnp.asarray(np.random.default_rng(1).integers(3, VOCAB, (2, 20)))
    scanned, looped = ours_from(reference), ours_from(reference, scan_layers=False, remat_policy="full")
    np.testing.assert_allclose(np.asarray(looped(ids).logits), np.asarray(scanned(ids).logits), atol=1e-5, rtol=0)
    grads = nnx.state(nnx.grad(lambda model: jnp.mean(model(ids).logits ** 2))(looped), nnx.Param)
    norm_grads = jnp.abs(grads["model"]["layers"]["attn_norm"]["scale"][...]).max(axis=-1)
    assert float(norm_grads[0]) == 0.0 and bool(jnp.all(norm_grads[1:] > 0))  # layer 0 has no attention norm


def test_packed_documents_equal_documents_alone(reference):
    """Per-document attention combined with the window; positions restart in each document."""
    ours = ours_from(reference)
    rng = np.random.default_rng(2)
    lengths = [11, 3, 9]  # 11 > the window's reach (4 each side)
    docs = [rng.integers(3, VOCAB, n) for n in lengths]
    row = np.concatenate(docs + [np.zeros(2, int)])[None]
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(2, int)])[None]
    packed = np.asarray(ours(jnp.asarray(row), segment_ids=jnp.asarray(segments)).logits[0])
    start = 0
    for doc in docs:
        alone = np.asarray(ours(jnp.asarray(doc[None])).logits[0])
        np.testing.assert_allclose(packed[start:start + len(doc)], alone, atol=1e-5, rtol=0)
        np.testing.assert_allclose(alone, torch_logits(reference, doc[None], np.ones((1, len(doc)), int))[0], atol=1e-4)
        start += len(doc)


def test_sparse_head_equals_dense_head_at_the_slots(reference):
    ours = ours_from(reference)
    ids = jnp.asarray(np.random.default_rng(3).integers(3, VOCAB, (2, 16)))
    positions = jnp.array([[0, 5, 15], [2, 3, 9]])
    dense = ours(ids).logits
    sparse = ours(ids, masked_positions=positions).logits
    assert sparse.shape == (2, 3, VOCAB)
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(jnp.take_along_axis(dense, positions[:, :, None], 1)),
                               atol=1e-5)


def test_bf16_compute_keeps_fp32_params(reference):
    ours = ours_from(reference, dtype="bfloat16")
    out = ours(jnp.asarray(np.random.default_rng(4).integers(3, VOCAB, (1, 12)))).logits
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    assert ours.model.layers.attn.Wqkv.kernel[...].dtype == jnp.float32
    fp32 = ours_from(reference)(jnp.asarray(np.random.default_rng(4).integers(3, VOCAB, (1, 12)))).logits
    assert float(jnp.abs(out - fp32).max()) < 0.1


def test_import_from_transformers_folder_and_export_round_trip(reference, tmp_path):
    saved = tmp_path / "hf"
    reference.save_pretrained(saved)
    ours = load_hf(saved)
    assert type(ours).__name__ == "ModernBertForMaskedLM"
    ids = np.random.default_rng(5).integers(3, VOCAB, (2, 14))
    mask = np.ones_like(ids)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids)).logits), torch_logits(reference, ids, mask), atol=1e-4)

    exported = save_hf(ours, tmp_path / "ours")
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "modernbert" and config["layer_types"] == list(reference.config.layer_types)
    loaded, info = transformers.AutoModelForMaskedLM.from_pretrained(exported, output_loading_info=True)
    assert type(loaded).__name__ == "ModernBertForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = reference.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name  # bit-identical
    assert loaded.config.local_attention == reference.config.local_attention
    assert loaded.config.rope_parameters == reference.config.rope_parameters
    again = to_hf_tensors(load_hf(exported))
    for name, value in to_hf_tensors(ours).items():
        assert np.array_equal(again[name], value), name


def test_config_both_ways():
    cfg = ModelConfig.for_family("modernbert", num_hidden_layers=5, local_attention=16, vocab_size=VOCAB)
    assert cfg.layer_types == ("full_attention", "sliding_attention", "sliding_attention", "full_attention",
                               "sliding_attention")
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    hf = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    assert hf.layer_types == list(cfg.layer_types) and hf.sliding_window == 8
    assert hf.rope_parameters["full_attention"]["rope_theta"] == 160000.0
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    old_style = {"model_type": "modernbert", "num_hidden_layers": 4, "global_attn_every_n_layers": 2,
                 "global_rope_theta": 80000.0}
    read = ModelConfig.from_hf_dict(old_style)
    assert read.layer_types == ("full_attention", "sliding_attention") * 2 and read.global_rope_theta == 80000.0
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        ModelConfig.from_hf_dict({**cfg.to_hf_dict(), "tie_word_embeddings": False})


def test_flops_count_the_glu_and_the_window():
    cfg = ModelConfig.for_family("modernbert", num_hidden_layers=3, hidden_size=64, intermediate_size=96,
                                 num_attention_heads=4, vocab_size=100, local_attention=8)
    d, f, s = 64, 96, 128  # layer 0 global (128 keys), layers 1-2 sliding (9 keys)
    expected = 6 * 3 * (4 * d * d + 3 * d * f) + 12 * (128 + 2 * 9) * d + 0.25 * (6 * d * 100 + 6 * d * d)
    assert flops_per_token(cfg, s, 0.25) == pytest.approx(expected)


def test_train_step_shards_on_a_data_fsdp_tensor_mesh_and_checkpoints(tmp_path):
    """Logical axes put ModernBERT's weights and the StableAdamW state on the mesh, and the whole step
    (masking, window, scan, sparse head, update) lowers with those shardings. That a sharded step computes
    the one-device numbers is the same machinery test_train.py checks for RoBERTa."""
    from jax.sharding import PartitionSpec as P

    from tests.test_train import MASKING, SEQ

    from flax_bert.training.optim import make_optimizer
    from flax_bert.training.sharding import batch_sharding, make_mesh
    from flax_bert.training.step import StepConfig, Trainer

    cfg = ModelConfig.for_family("modernbert", vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96, local_attention=8, pad_token_id=1)
    tx, schedule = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10, optimizer="stableadamw",
                                  schedule="wsd")
    trainer = Trainer(cfg, StepConfig(masking=MASKING), tx, make_mesh("data=2,fsdp=2,tensor=2"), schedule)
    params = trainer.state_shardings.params
    assert params["model"]["layers"]["attn"]["Wqkv"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert params["model"]["layers"]["mlp"]["Wo"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert params["model"]["embeddings"]["tok_embeddings"]["embedding"].spec == P("tensor", "fsdp")
    moments = trainer.state_shardings.opt_state[-1][0]  # (StableAdamW's moments, the schedule's step)
    assert moments["nu"]["model"]["layers"]["mlp"]["Wi"]["kernel"].spec == \
        params["model"]["layers"]["mlp"]["Wi"]["kernel"].spec
    batch = {name: jax.ShapeDtypeStruct((8, SEQ), dtype, sharding=batch_sharding(trainer.mesh))
             for name, dtype in (("input_ids", jnp.int32), ("segment_ids", jnp.int32), ("word_starts", jnp.bool_))}
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         trainer.abstract_state, trainer.state_shardings)
    lowered = trainer.train_step.lower(state, batch)
    assert "sharding" in lowered.as_text()

    # an Orbax bundle of this state (StableAdamW moments included) restores bit for bit onto the mesh
    from tests.test_checkpoint import assert_identical, state_at, to_host

    from flax_bert.run.checkpoint import Checkpointer

    saved = state_at(trainer, 3)
    with Checkpointer(tmp_path.absolute(), save_steps=1) as checkpoints:
        checkpoints.save(3, saved, {"position": 3}, {"run": {"model_type": "modernbert"}}, force=True)
        checkpoints.wait()
    restored = Checkpointer(tmp_path.absolute(), save_steps=1).restore(state).state
    assert_identical(to_host(restored), to_host(saved))
    assert restored.params["model"]["layers"]["attn"]["Wqkv"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
