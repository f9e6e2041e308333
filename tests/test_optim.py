"""Optimizer chain: no-decay mask, schedules, parity with torch.optim.AdamW, clipping, LAMB."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_bert.training import optim
class TinyEncoder(nnx.Module):
    """The parameter kinds a BERT has: embeddings, dense layers, LayerNorms, a list of layers."""

    def __init__(self, rngs):
        self.word_embeddings = nnx.Embed(11, 4, rngs=rngs)
        self.dense = nnx.Linear(4, 4, rngs=rngs)
        self.LayerNorm = nnx.LayerNorm(4, rngs=rngs)
        self.layer = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])


@pytest.fixture(scope="module")
def params():
    _, state = nnx.split(TinyEncoder(nnx.Rngs(0)), nnx.Param)
    return state


def test_decay_mask_on_nnx_state(params):
    flat = {
        tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(optim.decay_mask(params))
    }
    assert flat[("word_embeddings", "embedding", "value")] is True
    assert flat[("dense", "kernel", "value")] is True
    assert flat[("dense", "bias", "value")] is False
    assert flat[("LayerNorm", "scale", "value")] is False
    assert flat[("LayerNorm", "bias", "value")] is False
    assert flat[("layer", "1", "kernel", "value")] is True
    assert flat[("layer", "1", "bias", "value")] is False
    assert len(flat) == 9


def test_decay_mask_on_plain_dicts_and_stacked_layers():
    tree = {"encoder": {"layer": {"attention": {"kernel": jnp.zeros((2, 4, 4)), "bias": jnp.zeros((2, 4))},
                                   "LayerNorm": {"scale": jnp.zeros((2, 4))}}},  # scanned: stacked
            "lm_head": {"bias": jnp.zeros(11)}, "tied": [jnp.zeros(3)]}
    mask = optim.decay_mask(tree)
    assert mask["encoder"]["layer"]["attention"] == {"kernel": True, "bias": False}
    assert mask["encoder"]["layer"]["LayerNorm"]["scale"] is False  # by name, not by rank
    assert mask["lm_head"]["bias"] is False
    assert mask["tied"] == [False]
    assert optim.decay_mask({"emb": {"embedding": jnp.zeros((3, 2))}}) == {"emb": {"embedding": True}}


def test_schedules():
    peak, warmup, total = 1e-3, 100, 1000
    linear = optim.make_schedule(learning_rate=peak, warmup_steps=warmup, total_steps=total, schedule="linear")
    np.testing.assert_allclose([linear(s) for s in (0, 50, 100, 550, 1000, 1200)],
                               [0, peak / 2, peak, peak / 2, 0, 0], atol=1e-12)
    cosine = optim.make_schedule(learning_rate=peak, warmup_steps=warmup, total_steps=total, schedule="cosine")
    np.testing.assert_allclose([cosine(s) for s in (0, 100, 550, 1000)], [0, peak, peak / 2, 0], atol=1e-10)
    constant = optim.make_schedule(learning_rate=peak, warmup_steps=warmup, total_steps=total, schedule="constant")
    np.testing.assert_allclose([constant(s) for s in (0, 50, 100, 5000)], [0, peak / 2, peak, peak], atol=1e-12)
    no_warmup = optim.make_schedule(learning_rate=peak, warmup_steps=0, total_steps=total)
    np.testing.assert_allclose([no_warmup(0), no_warmup(500)], [peak, peak / 2], atol=1e-12)
    _, schedule_fn = optim.make_optimizer(learning_rate=peak, warmup_steps=warmup, total_steps=total)
    assert float(schedule_fn(warmup)) == pytest.approx(peak)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="total_steps"):
        optim.make_schedule(learning_rate=1e-3, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="schedule"):
        optim.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10, schedule="step")
    with pytest.raises(ValueError, match="optimizer"):
        optim.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10, optimizer="sgd")


def _torch_adamw_run(init, grads_per_step, lr, b2, weight_decay, max_grad_norm):
    torch = pytest.importorskip("torch")
    tensors = {name: torch.tensor(np.asarray(value), requires_grad=True) for name, value in init.items()}
    decay = [tensors["kernel"], tensors["embedding"]]
    no_decay = [tensors["bias"], tensors["scale"]]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, b2), eps=1e-6)
    for grads in grads_per_step:
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(np.asarray(grads[name]))
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_grad_norm)
        opt.step()
    return {name: tensor.detach().numpy() for name, tensor in tensors.items()}


def _optax_run(tx, init, grads_per_step):
    params = dict(init)
    state = tx.init(params)
    for grads in grads_per_step:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _random_tree(rng, scale=1.0):
    shapes = {"kernel": (5, 3), "embedding": (7, 3), "bias": (3,), "scale": (3,)}
    return {name: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32) for name, shape in shapes.items()}


@pytest.mark.parametrize("b2", [0.98, 0.999])
def test_single_adamw_update_matches_torch(b2):
    rng = np.random.default_rng(0)
    init, grads = _random_tree(rng), _random_tree(rng, scale=0.1)
    tx, _ = optim.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10, schedule="constant",
                                 b2=b2, weight_decay=0.1, max_grad_norm=None)
    ours = _optax_run(tx, init, [grads])
    theirs = _torch_adamw_run(init, [grads], 1e-2, b2, 0.1, None)
    for name in init:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-6, rtol=0, err_msg=name)
    # The no-decay parameters really were not decayed: with zero gradient they stay put.
    zero_grads = {name: jnp.zeros_like(value) for name, value in init.items()}
    still = _optax_run(tx, init, [zero_grads])
    np.testing.assert_array_equal(still["bias"], init["bias"])
    assert not np.allclose(still["kernel"], init["kernel"])


def test_clipping_matches_torch_and_bounds_the_norm():
    rng = np.random.default_rng(1)
    init = _random_tree(rng)
    # Norms of about 50, 0.2 and 20: clipping changes the relative size of the steps, so Adam's
    # moments (and the parameters) differ from an unclipped run.
    grads = [_random_tree(rng, scale) for scale in (10.0, 0.05, 4.0)]
    tx, _ = optim.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10, schedule="constant",
                                 weight_decay=0.01, max_grad_norm=1.0)
    ours = _optax_run(tx, init, grads)
    theirs = _torch_adamw_run(init, grads, 1e-2, 0.98, 0.01, 1.0)
    for name in init:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-6, rtol=0, err_msg=name)
    unclipped_tx, _ = optim.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10,
                                           schedule="constant", weight_decay=0.01, max_grad_norm=None)
    unclipped = _optax_run(unclipped_tx, init, grads)
    assert max(np.abs(unclipped[n] - ours[n]).max() for n in init) > 1e-4
    # The clipping stage alone: a norm-50 gradient comes out with norm max_grad_norm, as optax's does; a
    # norm-0.2 one unchanged. The state is optax's, so checkpoints keep their layout.
    clip, theirs = optim.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    assert clip.init(init) == theirs.init(init)
    clipped, _ = clip.update(grads[0], clip.init(init))
    assert float(optax.tree.norm(grads[0])) > 10
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)
    for grad in grads[:2]:
        for name, value in clip.update(grad, clip.init(init))[0].items():
            np.testing.assert_allclose(value, theirs.update(grad, theirs.init(init))[0][name], rtol=1e-6, atol=0)
    unchanged, _ = clip.update(grads[1], clip.init(init))
    assert all(np.array_equal(unchanged[name], grads[1][name]) for name in init)


def test_optimizer_runs_on_nnx_state_under_jit(params):
    for name in ("adamw", "lamb"):
        tx, _ = optim.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10, optimizer=name)
        grads = jax.tree_util.tree_map(jnp.ones_like, params)
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))
    # The mask reaches through NNX Variables: with zero gradients only decayed params move.
    tx, _ = optim.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10, schedule="constant")
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert bool(jnp.any(updates["dense"]["kernel"][...] != 0))
    assert bool(jnp.any(updates["word_embeddings"]["embedding"][...] != 0))
    assert not bool(jnp.any(updates["dense"]["bias"][...] != 0))
    assert not bool(jnp.any(updates["LayerNorm"]["scale"][...] != 0))


def test_lamb_trust_ratio_only_on_decayed_params():
    rng = np.random.default_rng(2)
    init, grads = _random_tree(rng), _random_tree(rng)
    lr = 1e-3
    tx, _ = optim.make_optimizer(learning_rate=lr, warmup_steps=0, total_steps=10, schedule="constant",
                                 optimizer="lamb", weight_decay=0.0, max_grad_norm=None)
    updates, _ = tx.update(grads, tx.init(init), init)
    # Decayed (matrix) parameters: the layer-wise trust ratio makes |update| = lr * |param|.
    for name in ("kernel", "embedding"):
        assert float(jnp.linalg.norm(updates[name])) == pytest.approx(lr * float(jnp.linalg.norm(init[name])),
                                                                      rel=1e-4)
    # Biases and LayerNorm scales: plain Adam (first step: lr * g / (|g| + eps)).
    for name in ("bias", "scale"):
        expected = -lr * grads[name] / (jnp.abs(grads[name]) + 1e-6)
        np.testing.assert_allclose(updates[name], expected, rtol=1e-5)
