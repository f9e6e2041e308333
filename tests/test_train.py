"""The train step: sharding invariance, PyTorch parity, sparse head, accumulation, FSDP memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flax_bert.models.config import ModelConfig
from flax_bert.models.convert import assign_hf_tensors, to_hf_tensors
from flax_bert.training.optim import make_optimizer
from flax_bert.training.sharding import batch_sharding, make_mesh, tree_bytes_per_device
from flax_bert.training.step import MaskingConfig, NonFiniteLossError, StepConfig, Trainer, check_finite

SEQ, ROWS, VOCAB = 32, 16, 1000
CFG = ModelConfig.for_family("roberta", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
MASKING = MaskingConfig(special_ids=(0, 1, 2, 3, 4), mask_token_id=4, random_vocab_size=VOCAB, max_seq_length=SEQ)
TX = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)


def make_batch(rows=ROWS, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (rows, SEQ)).astype(np.int32)
    segments = np.ones((rows, SEQ), np.int32)
    segments[:, SEQ // 2:] = 2  # two packed documents per row ...
    segments[1::3, -5:] = 0     # ... and padding in some rows
    ids[:, 0], ids[:, SEQ // 2] = 0, 0
    ids[segments == 0] = 1
    return {"input_ids": ids, "segment_ids": segments, "word_starts": np.ones_like(ids, bool)}


def make_trainer(mesh_spec="data=1", accumulation=1, tx=TX, cfg=CFG):
    devices = jax.devices()[:1] if mesh_spec == "data=1" else None
    mesh = make_mesh(mesh_spec, devices)
    step_config = StepConfig(masking=MASKING, gradient_accumulation_steps=accumulation)
    return Trainer(cfg, step_config, tx[0], mesh, tx[1])


def run_steps(trainer, steps=3, batch=None):
    batch = jax.device_put(make_batch() if batch is None else batch, batch_sharding(trainer.mesh))
    state = trainer.init_state(seed=0)
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params), metrics


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps(make_trainer())


@pytest.mark.parametrize("mesh_spec", ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2"])
def test_sharded_steps_equal_the_single_device_run(mesh_spec, single_device_run):
    losses, params, _ = run_steps(make_trainer(mesh_spec))
    np.testing.assert_allclose(losses, single_device_run[0], rtol=1e-5)
    for ours, ref in zip(jax.tree.leaves(params), jax.tree.leaves(single_device_run[1])):
        np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_metrics_are_reported(single_device_run):
    losses, _, metrics = single_device_run
    assert set(metrics) >= {"loss", "mlm_accuracy", "num_predictions", "grad_norm", "learning_rate"}
    assert 0 <= float(metrics["mlm_accuracy"]) <= 1 and float(metrics["grad_norm"]) > 0
    # round(0.15 * maskable) per row: 30 maskable tokens (2 specials) or 25 in the padded rows
    expected = sum(round(0.15 * (SEQ - 2 - (5 if r % 3 == 1 else 0))) for r in range(ROWS))
    assert float(metrics["num_predictions"]) == expected
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("mesh_spec", ["data=8", "data=4,fsdp=2"])
def test_masks_do_not_depend_on_the_mesh(mesh_spec):
    batch = make_batch()
    single = make_trainer()
    mask = lambda trainer: jax.jit(trainer._mask)(jax.random.key(7), jnp.int32(5),  # noqa: E731
                                                  jax.device_put(batch, batch_sharding(trainer.mesh)))
    for ours, ref in zip(mask(make_trainer(mesh_spec)), mask(single)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_fsdp_shards_parameters_and_optimizer_state_eight_ways():
    trainer = make_trainer("fsdp=8")
    state = trainer.init_state(seed=0)
    for tree in (state.params, state.opt_state):
        total = sum(x.nbytes for x in jax.tree.leaves(tree))
        per_device = tree_bytes_per_device(tree)
        assert len(per_device) == 8
        assert max(per_device.values()) <= total / 8 * 1.1, (max(per_device.values()), total)


def test_gradient_accumulation_equals_one_large_batch(single_device_run):
    losses, params, _ = run_steps(make_trainer(accumulation=4))
    np.testing.assert_allclose(losses, single_device_run[0], rtol=1e-5)
    for ours, ref in zip(jax.tree.leaves(params), jax.tree.leaves(single_device_run[1])):
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_sparse_head_loss_equals_dense_head_loss():
    trainer = make_trainer()
    state = trainer.init_state(seed=0)
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    masked = trainer._mask(jax.random.key(0), 0, batch)
    model = trainer.model(state.params)
    dense_logits = model(masked.input_ids, segment_ids=batch["segment_ids"]).logits
    gathered = jnp.take_along_axis(dense_logits, masked.positions[:, :, None], axis=1)
    sparse_logits = model(masked.input_ids, segment_ids=batch["segment_ids"], masked_positions=masked.positions).logits
    assert sparse_logits.shape[1] == MASKING.num_slots < SEQ
    ce = lambda logits: float(jnp.sum(-jax.nn.log_softmax(logits)[  # noqa: E731
        jnp.arange(ROWS)[:, None], jnp.arange(MASKING.num_slots)[None], masked.labels] * masked.weights)
        / jnp.sum(masked.weights))
    assert abs(ce(sparse_logits) - ce(gathered)) <= 1e-5


def test_one_step_matches_pytorch_roberta_with_adamw():
    """Identical weights and masked batch: one step of ours vs RobertaForMaskedLM + torch.optim.AdamW."""
    lr, wd = 1e-3, 0.01
    tx = make_optimizer(learning_rate=lr, warmup_steps=0, total_steps=10, schedule="constant", weight_decay=wd,
                        max_grad_norm=1.0)
    trainer = make_trainer(tx=tx)
    state = trainer.init_state(seed=0)
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    batch["segment_ids"] = jnp.where(batch["segment_ids"] > 0, 1, 0)  # torch has no packing: one document a row
    batch["input_ids"] = batch["input_ids"].at[:, SEQ // 2].set(7)
    masked = jax.jit(trainer._mask)(trainer.masking_key(), jnp.int32(0), batch)

    torch.manual_seed(0)
    torch_model = transformers.RobertaForMaskedLM(CFG.to_hf_config()).train()
    model = trainer.model(state.params)
    assign_hf_tensors(model, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    from flax import nnx

    state = trainer.init_state(params=nnx.state(model, nnx.Param).to_pure_dict())
    # masked.input_ids is what both models see; labels -100 except at the selected positions
    labels = np.full((ROWS, SEQ), -100, np.int64)
    pos, lab, w = (np.asarray(x) for x in (masked.positions, masked.labels, masked.weights))
    for r in range(ROWS):
        labels[r, pos[r][w[r] > 0]] = lab[r][w[r] > 0]
    no_decay = [p for n, p in torch_model.named_parameters() if "bias" in n or "LayerNorm.weight" in n or "layer_norm.weight" in n]
    decay = [p for n, p in torch_model.named_parameters() if all(p is not q for q in no_decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-6)
    ids = torch.tensor(np.asarray(masked.input_ids), dtype=torch.long)
    out = torch_model(input_ids=ids, attention_mask=(ids != 1).long(), labels=torch.from_numpy(labels))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
    optimizer.step()

    # our step re-derives the same masks from (seed, step 0, example index)
    state, metrics = trainer.train_step(state, jax.device_put(batch, batch_sharding(trainer.mesh)))
    assert abs(float(metrics["loss"]) - out.loss.item()) <= 1e-5
    updated = to_hf_tensors(trainer.model(state.params))
    reference = torch_model.state_dict()
    for name, value in updated.items():
        np.testing.assert_allclose(value, reference[name].numpy(), atol=1e-5, rtol=0, err_msg=name)


def test_non_finite_loss_names_the_step():
    with pytest.raises(NonFiniteLossError, match="at step 42"):
        check_finite({"loss": jnp.float32(jnp.nan)}, step=42)
    check_finite({"loss": jnp.float32(2.5)}, step=1)
