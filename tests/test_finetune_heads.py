"""Sequence-classification heads: logits equal transformers' PyTorch *ForSequenceClassification on converted
weights (padding included), conversion both ways, an encoder checkpoint loads with a fresh head."""
import inspect

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax_bert.models.convert import load_hf, save_hf  # noqa: E402

SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=64)
CASES = {  # name: (transformers classes, extra config)
    "bert": (transformers.BertForSequenceClassification, transformers.BertConfig, dict(num_labels=3)),
    "roberta": (transformers.RobertaForSequenceClassification, transformers.RobertaConfig, dict(num_labels=2)),
    "modernbert": (transformers.ModernBertForSequenceClassification, transformers.ModernBertConfig,
                   dict(num_labels=3, local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        cls_token_id=1, sep_token_id=2, attn_implementation="eager")),
    "modernbert-mean": (transformers.ModernBertForSequenceClassification, transformers.ModernBertConfig,
                        dict(num_labels=1, classifier_pooling="mean", local_attention=8, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                             attn_implementation="eager")),
}


def torch_classifier(case, seed=0):
    model_class, config_class, extra = CASES[case]
    torch.manual_seed(seed)
    model = model_class(config_class(**SIZES, **extra)).eval()
    with torch.no_grad():  # random, not initial, norms and biases, so a mix-up of them shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def padded_batch(config):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, config.vocab_size, (3, 20), generator=g)
    ids[1, 13:] = config.pad_token_id
    ids[2, 5:] = config.pad_token_id
    token_type_ids = torch.zeros_like(ids)
    if getattr(config, "type_vocab_size", 1) > 1:
        token_type_ids[:, 9:] = 1
    return ids, (ids != config.pad_token_id).long(), token_type_ids


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_and_convert_back_bit_identical(case, tmp_path):
    reference = torch_classifier(case)
    reference.save_pretrained(tmp_path / "in")
    ours = load_hf(tmp_path / "in")
    assert type(ours).__name__ == type(reference).__name__
    ids, mask, types = padded_batch(reference.config)
    with torch.no_grad():
        kwargs = {"token_type_ids": types} if "token_type_ids" in inspect.signature(reference.forward).parameters else {}
        expected = reference(input_ids=ids, attention_mask=mask, **kwargs).logits.numpy()
    got = ours(jnp.asarray(ids.numpy()), attention_mask=jnp.asarray(mask.numpy()),
               token_type_ids=jnp.asarray(types.numpy())).logits
    assert got.shape == expected.shape == (3, reference.config.num_labels)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)

    save_hf(ours, tmp_path / "out")
    again, info = type(reference).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    before, after = reference.state_dict(), again.state_dict()
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert again.config.num_labels == reference.config.num_labels
    assert again.config.to_dict().get("classifier_pooling", "cls") == reference.config.to_dict().get("classifier_pooling", "cls")


def test_masked_lm_checkpoint_loads_as_classifier_with_its_encoder_and_a_fresh_head(tmp_path, caplog):
    torch.manual_seed(0)
    mlm = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**SIZES)).eval()
    mlm.save_pretrained(tmp_path / "mlm")
    ours = load_hf(tmp_path / "mlm", architecture="RobertaForSequenceClassification", id2label=("a", "b", "c"))
    assert ours.config.num_labels == 3 and "freshly initialized" in caplog.text
    ids = jnp.arange(5, 25)[None]
    np.testing.assert_allclose(np.asarray(ours(ids).last_hidden_state),
                               np.asarray(load_hf(tmp_path / "mlm")(ids).last_hidden_state), atol=1e-6)


def test_another_tasks_classifier_is_refused_unless_asked_to_start_fresh(tmp_path):
    from flax_bert.models.convert import WeightsError

    torch_classifier("bert").save_pretrained(tmp_path / "three")  # 3 labels
    with pytest.raises(WeightsError, match="classifier.weight"):
        load_hf(tmp_path / "three", id2label=("no", "yes"))
    two = load_hf(tmp_path / "three", id2label=("no", "yes"), fresh_mismatched_heads=True)
    assert two.classifier.kernel.shape == (32, 2)
