"""Our NNX models against transformers' PyTorch models, plus the model's own invariants."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flax_bert.models.config import ConfigError, ModelConfig
from flax_bert.models.convert import load_hf
from flax_bert.models import create_model
from flax_bert.models.layers import position_ids_from_segments

TINY = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64)
HF_CLASSES = {
    "RobertaForMaskedLM": (transformers.RobertaForMaskedLM, transformers.RobertaConfig),
    "BertForMaskedLM": (transformers.BertForMaskedLM, transformers.BertConfig),
    "BertForPreTraining": (transformers.BertForPreTraining, transformers.BertConfig),
}


def make_torch_model(architecture, seed=0):
    """A tiny random PyTorch model whose every tensor (LayerNorms and biases included) is non-trivial."""
    torch.manual_seed(seed)
    model_class, config_class = HF_CLASSES[architecture]
    model = model_class(config_class(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(HF_CLASSES))
def torch_and_ours(request, tmp_path_factory):
    torch_model = make_torch_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(folder)
    return request.param, torch_model, load_hf(folder)


def padded_batch(config, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (3, 20), generator=g)
    ids[1, 13:] = config.pad_token_id
    ids[2, 5:] = config.pad_token_id
    attention_mask = (ids != config.pad_token_id).long()
    token_type_ids = torch.zeros_like(ids)
    if config.type_vocab_size > 1:  # two segments
        token_type_ids[:, 9:] = 1
    return ids, attention_mask, token_type_ids


def test_logits_and_hidden_states_match_pytorch(torch_and_ours):
    architecture, torch_model, ours = torch_and_ours
    ids, attention_mask, token_type_ids = padded_batch(torch_model.config)
    with torch.no_grad():
        ref = torch_model(input_ids=ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                          output_hidden_states=True)
    out = ours(jnp.asarray(ids.numpy()), attention_mask=jnp.asarray(attention_mask.numpy()),
               token_type_ids=jnp.asarray(token_type_ids.numpy()))
    ref_logits = ref.prediction_logits if architecture == "BertForPreTraining" else ref.logits
    assert out.logits.shape == (3, 20, TINY["vocab_size"])
    assert out.last_hidden_state.shape == (3, 20, TINY["hidden_size"])
    np.testing.assert_allclose(np.asarray(out.logits), ref_logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref.hidden_states[-1].numpy(), atol=1e-4, rtol=0)
    if architecture == "BertForPreTraining":
        np.testing.assert_allclose(np.asarray(out.seq_relationship_logits), ref.seq_relationship_logits.numpy(),
                                   atol=1e-4, rtol=0)


def test_sparse_head_equals_dense_head_at_the_same_positions(torch_and_ours):
    _, torch_model, ours = torch_and_ours
    ids, attention_mask, _ = padded_batch(torch_model.config)
    ids, attention_mask = jnp.asarray(ids.numpy()), jnp.asarray(attention_mask.numpy())
    positions = jnp.array([[0, 3, 7], [1, 2, 12], [4, 4, 0]])
    dense = ours(ids, attention_mask=attention_mask).logits
    sparse = ours(ids, attention_mask=attention_mask, masked_positions=positions).logits
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(jnp.take_along_axis(dense, positions[:, :, None], 1)),
                               atol=1e-5)


@pytest.fixture(scope="module")
def roberta_cfg():
    return ModelConfig.for_family("roberta", **TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _jitted_logits(cfg, ids, **kwargs):
    from flax import nnx

    graphdef, state = nnx.split(create_model(cfg, seed=3))
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, **kwargs).logits)(state, ids)


def test_scan_loop_and_remat_give_identical_logits(roberta_cfg):
    ids = jax.random.randint(jax.random.key(0), (2, 24), 5, 1000)
    reference = _jitted_logits(roberta_cfg.replace(scan_layers=False), ids)
    for variant in (dict(scan_layers=True), dict(scan_layers=True, remat_policy="full"),
                    dict(scan_layers=False, remat_policy="dots")):
        np.testing.assert_allclose(_jitted_logits(roberta_cfg.replace(**variant), ids), reference, atol=1e-6, rtol=0,
                                   err_msg=str(variant))


def test_remat_gives_identical_gradients(roberta_cfg):
    from flax import nnx

    ids = jax.random.randint(jax.random.key(1), (2, 16), 5, 1000)

    def grads(cfg):
        graphdef, state = nnx.split(create_model(cfg, seed=3))
        loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(ids).logits ** 2)
        return jax.jit(jax.grad(loss))(state)

    plain, remat = grads(roberta_cfg), grads(roberta_cfg.replace(remat_policy="full"))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_compute_stays_close_to_fp32(roberta_cfg):
    ids = jax.random.randint(jax.random.key(2), (2, 24), 5, 1000)
    fp32 = _jitted_logits(roberta_cfg, ids)
    bf16 = _jitted_logits(roberta_cfg.replace(dtype="bfloat16"), ids)
    assert bf16.dtype == jnp.float32  # logits leave the model in fp32 for the loss
    assert bool(jnp.all(jnp.isfinite(bf16)))
    assert float(jnp.linalg.norm(bf16 - fp32) / jnp.linalg.norm(fp32)) <= 2e-2


def test_parameters_stay_fp32_under_bf16_compute(roberta_cfg):
    from flax import nnx

    model = create_model(roberta_cfg.replace(dtype="bfloat16"))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}


def test_every_parameter_has_logical_axes_matching_its_rank(roberta_cfg):
    from flax import nnx

    model = create_model(roberta_cfg)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None, path
        stacked = "layer" in path  # the layer axis is added by sharding.py
        assert len(axes) + stacked == var.get_value().ndim, path


def test_position_ids_restart_per_packed_document():
    segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(position_ids_from_segments(segments, 2), [[2, 3, 4, 2, 3, 2, 1, 1]])
    np.testing.assert_array_equal(position_ids_from_segments(segments, 0), [[0, 1, 2, 0, 1, 0, 0, 0]])


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
def test_packed_documents_do_not_see_each_other(model_type):
    """Changing one document of a packed row leaves the outputs of the others unchanged, and each
    document's outputs equal those of the document alone in its own row."""
    cfg = ModelConfig.for_family(model_type, **TINY)
    model = create_model(cfg)
    segments = jnp.array([[1] * 6 + [2] * 5 + [3] * 4 + [0] * 3])
    ids = jax.random.randint(jax.random.key(0), segments.shape, 5, 1000)
    ids = jnp.where(segments > 0, ids, cfg.pad_token_id)
    changed = ids.at[0, 7:10].set(jnp.array([11, 12, 13]))  # inside document 2
    a = model(ids, segment_ids=segments).logits
    b = model(changed, segment_ids=segments).logits
    keep = np.asarray(segments[0] != 2) & np.asarray(segments[0] > 0)
    np.testing.assert_allclose(a[0, keep], b[0, keep], atol=1e-5)
    assert not np.allclose(a[0, 6:11], b[0, 6:11], atol=1e-3)
    alone = model(ids[:, 11:15], segment_ids=jnp.ones((1, 4), jnp.int32)).logits
    np.testing.assert_allclose(a[0, 11:15], alone[0], atol=1e-5)


def test_hf_config_round_trip():
    for model_type in ("bert", "roberta"):
        cfg = ModelConfig.for_family(model_type, **TINY)
        again = ModelConfig.from_hf_dict(json.loads(cfg.to_hf_config().to_json_string()))
        assert again == cfg
    with pytest.raises(ConfigError, match="gpt2"):
        ModelConfig.from_hf_dict({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig.for_family("bert", hidden_size=30, num_attention_heads=4)
