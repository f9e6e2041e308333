"""The ModernBERT recipe's options, usable with any model: WSD schedule, StableAdamW, the evaluation
mask rate; and a fresh model's special-token ids taken from its tokenizer (not its family)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_bert.training import optim
from flax_bert.run.config import RunConfig, parse_run_config


def test_wsd_schedule_warms_up_holds_then_decays_as_one_minus_sqrt():
    fn = optim.make_schedule(learning_rate=1.0, warmup_steps=10, total_steps=110, schedule="wsd", decay_fraction=0.2)
    lr = [float(fn(s)) for s in range(111)]
    assert lr[0] == 0.0 and lr[5] == pytest.approx(0.5) and lr[10] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in lr[10:88])  # stable until the last 22 steps
    assert lr[99] == pytest.approx(1 - np.sqrt(11 / 22)) and lr[110] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def _stable_step(grads, params, state_tx):
    tx, state = state_tx
    updates, state = tx.update(grads, state, params)
    return updates, (tx, state)


def test_stableadamw_is_adamw_until_a_gradient_spike_then_clips_per_layer():
    params = {"model": {"layers": {"w": {"kernel": jnp.ones((2, 3, 4))}}, "emb": {"embedding": jnp.ones((5, 4))}}}
    kwargs = dict(learning_rate=1e-2, warmup_steps=0, total_steps=10, schedule="constant", weight_decay=0.1,
                  max_grad_norm=None)
    stable, _ = optim.make_optimizer(optimizer="stableadamw", **kwargs)
    adamw, _ = optim.make_optimizer(optimizer="adamw", **kwargs)
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    s_state, a_state = stable.init(params), adamw.init(params)
    s_up, s_state = stable.update(grads, s_state, params)
    a_up, a_state = adamw.update(grads, a_state, params)
    for s, a in zip(jax.tree.leaves(s_up), jax.tree.leaves(a_up)):  # first step: g²/v̂ = 1, no clipping
        np.testing.assert_allclose(np.asarray(s), np.asarray(a), rtol=1e-5)
    spike = jax.tree.map(jnp.copy, grads)
    spike["model"]["layers"]["w"]["kernel"] = spike["model"]["layers"]["w"]["kernel"].at[1].multiply(100.0)
    s_up, _ = stable.update(spike, s_state, params)
    a_up, _ = adamw.update(spike, a_state, params)
    s_w, a_w = s_up["model"]["layers"]["w"]["kernel"], a_up["model"]["layers"]["w"]["kernel"]
    np.testing.assert_allclose(np.asarray(s_w[0]), np.asarray(a_w[0]), rtol=1e-5)  # the calm layer: untouched
    g0, b2 = 0.01, 0.98  # the spiking layer: the whole step divided by RMS(g²/v̂) = |g| / sqrt(v̂)
    v_hat = (b2 * (1 - b2) * g0 ** 2 + (1 - b2) * (100 * g0) ** 2) / (1 - b2 ** 2)
    rms = 100 * g0 / np.sqrt(v_hat)
    assert rms > 1.3
    np.testing.assert_allclose(np.asarray(s_w[1]), np.asarray(a_w[1]) / rms, rtol=1e-4)


def test_stableadamw_keeps_its_schedule_where_reset_optimizer_carries_it_on():
    """--reset_optimizer (Trainer.fresh_opt_state) sets the count of the state's ScaleByScheduleState to the
    restored step: StableAdamW's learning rate must come from there, or a reset warms up again from 0."""
    import optax

    params = {"w": {"kernel": jnp.ones((3, 4))}}
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    tx, schedule = optim.make_optimizer(optimizer="stableadamw", learning_rate=1e-2, warmup_steps=5, total_steps=20,
                                        schedule="linear", weight_decay=0.0, max_grad_norm=None)
    is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)  # noqa: E731

    def at_step(step):
        state = jax.tree.map(lambda node: node._replace(count=jnp.asarray(step, node.count.dtype))
                             if is_schedule(node) else node, tx.init(params), is_leaf=is_schedule)
        return tx.update(grads, state, params)[0]["w"]["kernel"]

    assert any(is_schedule(n) for n in jax.tree.leaves(tx.init(params), is_leaf=is_schedule))
    np.testing.assert_allclose(np.asarray(at_step(12)), np.asarray(at_step(1)) * float(schedule(12) / schedule(1)),
                               rtol=1e-5)


def test_eval_mask_rate_defaults_to_the_training_rate_and_can_differ():
    old = parse_run_config(["--output_dir", "runs/x", "--mlm_probability", "0.2"])
    assert old.eval_mlm_probability is None  # an old command evaluates at its training rate, as the old script did
    recipe = parse_run_config(["--output_dir", "runs/x", "--mlm_probability", "0.3", "--eval_mlm_probability", "0.15"])
    assert (recipe.mlm_probability, recipe.eval_mlm_probability) == (0.3, 0.15)
    from flax_bert.run.build import eval_masking
    from flax_bert.training.step import MaskingConfig

    train = MaskingConfig(special_ids=(0, 1, 2), mask_token_id=3, random_vocab_size=50, mlm_probability=0.3,
                          max_seq_length=128)
    assert eval_masking(train, old.__class__(mlm_probability=0.3)) is None
    evaluation = eval_masking(train, recipe)
    assert evaluation.mlm_probability == 0.15 and evaluation.num_slots < train.num_slots
    with pytest.raises(SystemExit):
        parse_run_config(["--output_dir", "runs/x", "--eval_mlm_probability", "1.5"])
    with pytest.raises(SystemExit):
        parse_run_config(["--output_dir", "runs/x", "--model_type", "roberta", "--local_attention", "64"])


@pytest.fixture(scope="module")
def wordpiece_tokenizer(tmp_path_factory):
    from flax_bert.data.tokenizer_training import train_tokenizer

    texts = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(200)]
    return train_tokenizer(texts, kind="wordpiece", vocab_size=120, output_dir=tmp_path_factory.mktemp("wp"))


def test_fresh_roberta_takes_special_ids_from_a_wordpiece_tokenizer(wordpiece_tokenizer, tmp_path):
    """RoBERTa's family pads with 1; a WordPiece tokenizer pads with 0: the tokenizer wins."""
    from flax_bert.models.convert import save_hf
    from flax_bert.models import create_model
    from flax_bert.run.build import resolve_model_config

    tok = wordpiece_tokenizer
    assert tok.pad_token_id == 0
    run = RunConfig(model_type="roberta", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    cfg = resolve_model_config(run, tok)
    assert cfg.pad_token_id == tok.pad_token_id and cfg.first_position_id == tok.pad_token_id + 1
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    model = create_model(cfg)
    assert float(jnp.abs(model.roberta.embeddings.word_embeddings.embedding[...][tok.pad_token_id]).max()) == 0.0
    folder = save_hf(model, tmp_path / "export", tokenizer=tok)
    exported = json.loads((folder / "config.json").read_text())
    assert exported["pad_token_id"] == tok.pad_token_id
    import transformers

    loaded = transformers.AutoModelForMaskedLM.from_pretrained(folder)
    assert loaded.roberta.embeddings.padding_idx == tok.pad_token_id == loaded.config.pad_token_id


def test_fresh_bert_and_modernbert_take_special_ids_from_a_bpe_tokenizer():
    class Bpe:  # the ids our byte-level BPE tokenizer assigns (<s>=0, <pad>=1, </s>=2)
        pad_token_id, bos_token_id, eos_token_id, cls_token_id, sep_token_id = 1, 0, 2, 0, 2

        def __len__(self):
            return 300

    from flax_bert.run.build import resolve_model_config

    bert = resolve_model_config(RunConfig(model_type="bert"), Bpe())
    assert (bert.pad_token_id, bert.bos_token_id, bert.eos_token_id) == (1, 0, 2)
    modern = resolve_model_config(RunConfig(model_type="modernbert", num_hidden_layers=4, intermediate_size=1152), Bpe())
    hf = modern.to_hf_dict()
    assert (hf["pad_token_id"], hf["cls_token_id"], hf["sep_token_id"], hf["bos_token_id"]) == (1, 0, 2, 0)
    assert modern.hidden_dropout_prob == 0.0 and modern.attention_probs_dropout_prob == 0.0  # recipe: no dropout
    assert bert.hidden_dropout_prob == 0.1  # old default unchanged
