"""A tiny ModernBERT trained from the command line on WikiText with the recipe's options; its export
answers transformers' pipeline("fill-mask"), and it comes back through import and --config_name."""
import json

import numpy as np
import pytest

from tests.test_cli import ROOT, cli_env, run_cli

MODERNBERT_FLAGS = [
    "--model_type", "modernbert", "--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
    "--intermediate_size", "96", "--local_attention", "16", "--global_attn_every_n_layers", "2",
    "--max_seq_length", "64", "--tokenizer_vocab_size", "2000", "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "32", "--learning_rate", "3e-3", "--warmup_steps", "5", "--logging_steps", "5",
    "--save_steps", "0", "--max_eval_samples", "100", "--progress_bar", "false", "--max_steps", "30",
    "--mlm_probability", "0.3", "--eval_mlm_probability", "0.15", "--optimizer", "stableadamw",
    "--lr_scheduler_type", "wsd", "--wsd_decay_fraction", "0.2", "--weight_decay", "0.0125"]


@pytest.fixture(scope="module")
def modernbert_run(shared_dir, tmp_path_factory):
    wikitext = shared_dir / "data" / "wikitext-2-raw"
    out = tmp_path_factory.mktemp("modernbert") / "run"
    cache = out.parent / "cache"
    result = run_cli([str(ROOT / "run_mlm_flax.py"), *MODERNBERT_FLAGS, "--do_train", "--do_eval",
                      "--train_file", str(wikitext / "wiki.valid.raw"),
                      "--validation_file", str(wikitext / "wiki.test.raw"), "--output_dir", str(out),
                      "--cache_dir", str(cache)], env=cli_env(FLAX_BERT_CACHE=str(cache)))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stderr


def test_trains_evaluates_at_15_percent_and_exports_a_transformers_modernbert(modernbert_run, tmp_path):
    out, log = modernbert_run
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in train if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.5
    lr = [r["learning_rate"] for r in train if "learning_rate" in r]
    assert lr[2] == pytest.approx(3e-3) and lr[-1] < 1e-3  # wsd: the peak, then the decay in the last 20%
    assert "masking 30% of tokens in training, 15% in evaluation" in log
    assert "special token ids from the tokenizer (pad_token_id=1" in log
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] < losses[0]

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "modernbert" and config["layer_types"] == ["full_attention", "sliding_attention"]
    assert config["local_attention"] == 16 and config["mlp_dropout"] == 0.0
    import transformers

    model, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "ModernBertForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    fill = transformers.pipeline("fill-mask", model=str(out))
    text = f"The city is in the {fill.tokenizer.mask_token} of the country ."
    answers = fill(text, top_k=3)
    assert len(answers) == 3 and all(0 < a["score"] < 1 for a in answers)

    # our JAX fill-mask on the same folder ranks the same tokens first
    from flax_bert.fill_mask import fill_mask, load_for_inference

    (ours,) = fill_mask(*load_for_inference(str(out)), text, top_k=3)  # one list: one mask
    assert [t for t, _ in ours] == [a["token_str"].strip() or a["token_str"] for a in answers]
    np.testing.assert_allclose([p for _, p in ours], [a["score"] for a in answers], atol=1e-4)


def test_the_export_comes_back_through_import_and_config_name(modernbert_run, tmp_path):
    out, _ = modernbert_run
    from transformers import AutoTokenizer

    from flax_bert.models.convert import load_hf, to_hf_tensors
    from flax_bert.run.build import resolve_model_config
    from flax_bert.run.config import RunConfig
    from flax_bert.run.directory import import_hf_model, load_run_model

    exported = load_hf(out)
    import_hf_model(out, tmp_path / "imported")
    restored, _, run, step = load_run_model(tmp_path / "imported")
    assert step == 0 and run["model_type"] == "modernbert"
    expected = to_hf_tensors(exported)
    for name, value in to_hf_tensors(restored).items():
        assert np.array_equal(value, expected[name]), name
    cfg = resolve_model_config(RunConfig(config_name=str(out)), AutoTokenizer.from_pretrained(str(out)))
    assert cfg.model_type == "modernbert" and cfg.layer_types == exported.config.layer_types
    assert cfg.local_attention == 16 and cfg.pad_token_id == 1
