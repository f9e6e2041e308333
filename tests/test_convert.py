"""Conversion both ways: file formats, round trips, a transformers-4 Flax checkpoint, bad input."""
import json
import logging
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flax_bert.models.config import ConfigError
from flax_bert.models.convert import WeightsError, load_hf, save_hf
from tests.test_model import TINY, make_torch_model

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("architecture", ["RobertaForMaskedLM", "BertForMaskedLM", "BertForPreTraining"])
def test_pytorch_to_ours_to_pytorch_is_bit_identical(architecture, tmp_path):
    torch_model = make_torch_model(architecture)
    torch_model.save_pretrained(tmp_path / "in")
    save_hf(load_hf(tmp_path / "in"), tmp_path / "out")
    again = type(torch_model).from_pretrained(tmp_path / "out")
    before, after = torch_model.state_dict(), again.state_dict()
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_export_loads_with_auto_class_without_missing_weights_and_runs_fill_mask(tmp_path):
    torch_model = make_torch_model("BertForMaskedLM")
    torch_model.save_pretrained(tmp_path / "in")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(995)])}
    tokenizer = transformers.BertTokenizerFast(vocab=vocab)
    assert len(tokenizer) == TINY["vocab_size"]
    save_hf(load_hf(tmp_path / "in"), tmp_path / "out", tokenizer=tokenizer)
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(model).__name__ == "BertForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    fill = transformers.pipeline("fill-mask", model=str(tmp_path / "out"), top_k=3)
    predictions = fill("w1 w2 [MASK] w4")
    assert len(predictions) == 3 and all(p["token_str"] for p in predictions)


def test_export_refuses_to_overwrite_an_existing_model(tmp_path):
    make_torch_model("RobertaForMaskedLM").save_pretrained(tmp_path / "in")
    model = load_hf(tmp_path / "in")
    save_hf(model, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf(model, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


def test_pytorch_bin_checkpoint_loads_like_safetensors(tmp_path):
    torch_model = make_torch_model("RobertaForMaskedLM")
    torch_model.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin")
    torch.save(torch_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ids = jnp.arange(5, 25)[None]
    np.testing.assert_array_equal(load_hf(tmp_path / "bin")(ids).logits, load_hf(tmp_path / "st")(ids).logits)


def test_bfloat16_safetensors_load_without_torch(tmp_path, monkeypatch):
    """Many hub checkpoints are bfloat16, which safetensors.numpy cannot read: ours reads them with torch
    unimportable, and every tensor equals what torch stored."""
    from flax_bert.models.convert import to_hf_tensors

    torch_model = make_torch_model("RobertaForMaskedLM").to(torch.bfloat16)
    torch_model.save_pretrained(tmp_path / "bf16")
    header = (tmp_path / "bf16" / "model.safetensors").read_bytes()[:4096]
    assert b'"BF16"' in header
    stored = {name: value.float().numpy() for name, value in torch_model.state_dict().items()}
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError):
        import torch as _  # noqa: F401
    loaded = to_hf_tensors(load_hf(tmp_path / "bf16"))
    for name, value in loaded.items():
        np.testing.assert_array_equal(value, stored[name], err_msg=name)
    assert len(loaded) > 10


@pytest.mark.parametrize("name", ["flax_roberta_tiny", "flax_bert_tiny"])
def test_transformers4_flax_msgpack_matches_the_logits_that_library_produced(name):
    folder = FIXTURES / name
    expected = np.load(folder / "expected.npz")
    model = load_hf(folder)
    out = model(jnp.asarray(expected["input_ids"]), attention_mask=jnp.asarray(expected["attention_mask"]),
                token_type_ids=jnp.asarray(expected["token_type_ids"]))
    np.testing.assert_allclose(np.asarray(out.logits), expected["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), expected["last_hidden_state"], atol=1e-4, rtol=0)


def test_headless_bert_model_loads_encoder_and_says_the_head_is_fresh(tmp_path, caplog):
    torch.manual_seed(0)
    encoder_only = transformers.BertModel(transformers.BertConfig(**TINY))
    encoder_only.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = load_hf(tmp_path, architecture="BertForMaskedLM")
    assert "cls.predictions" in caplog.text and "freshly initialized" in caplog.text
    np.testing.assert_array_equal(model.bert.embeddings.word_embeddings.embedding[...],
                                  encoder_only.embeddings.word_embeddings.weight.detach().numpy())


def test_bad_checkpoints_fail_with_one_clear_error(tmp_path):
    make_torch_model("RobertaForMaskedLM").save_pretrained(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "config.json").read_text())

    (tmp_path / "no_weights").mkdir()
    shutil.copy(tmp_path / "good" / "config.json", tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        load_hf(tmp_path / "no_weights")

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="gpt2"):
        load_hf(tmp_path / "gpt2")

    (tmp_path / "wrong_shape").mkdir()
    shutil.copy(tmp_path / "good" / "model.safetensors", tmp_path / "wrong_shape")
    (tmp_path / "wrong_shape" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(WeightsError, match=r"intermediate\.dense\.weight .*shape \(128, 64\).*\(96, 64\)"):
        load_hf(tmp_path / "wrong_shape")

    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "good" / "model.safetensors")
    del tensors["roberta.encoder.layer.1.attention.self.key.weight"]
    (tmp_path / "missing").mkdir()
    shutil.copy(tmp_path / "good" / "config.json", tmp_path / "missing")
    save_file(tensors, tmp_path / "missing" / "model.safetensors")
    with pytest.raises(WeightsError, match=r"missing the tensor roberta\.encoder\.layer\.1\.attention\.self\.key\.weight"):
        load_hf(tmp_path / "missing")

    with pytest.raises(FileNotFoundError, match="no model folder"):
        load_hf(tmp_path / "does" / "not" / "exist")
