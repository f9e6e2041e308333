"""--attention: splash (Pallas interpret mode on the CPU) against the xla path, forward and gradients, with
packed documents, padding and ModernBERT's window, in fp32 and bf16; the choice `auto` makes; splash compiled
for a TPU topology (with libtpu)."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_bert.models import partitioning
from flax_bert.models.attention import AttentionError, Segments, attend, resolve
from flax_bert.models.config import ModelConfig
from flax_bert.training.sharding import make_mesh

BATCH, LENGTH, HEADS, HEAD_DIM = 2, 128, 2, 64  # LENGTH 256: two splash blocks of 128 along the sequence


def packed_segments(length):
    ids = np.zeros((BATCH, length), np.int32)
    ids[0, :length * 3 // 8], ids[0, length * 3 // 8:length * 7 // 8] = 1, 2  # two documents, then padding
    ids[1, :] = 1
    return Segments(jnp.asarray(ids), packed=True)


def loss_and_grads(implementation, dtype, window, mesh=None, length=LENGTH):
    q, k, v = (jax.random.normal(key, (BATCH, length, HEADS, HEAD_DIM), jnp.float32).astype(dtype)
               for key in jax.random.split(jax.random.key(0), 3))
    segments = packed_segments(length)
    real = (segments.ids > 0)[:, :, None, None]

    def loss(q, k, v):
        with partitioning.use_mesh(mesh):
            out = attend(q, k, v, segments, implementation, window=window, use_window=jnp.asarray(True))
        return jnp.sum(jnp.where(real, out.astype(jnp.float32), 0) ** 2), out  # padding queries: no one reads them

    (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return value, jnp.where(real, out, 0), grads


@pytest.mark.parametrize("dtype, window, length", [(jnp.float32, None, 128), (jnp.float32, 64, 256),
                                                   (jnp.bfloat16, 32, 128)])
def test_splash_matches_xla(dtype, window, length):
    tolerance = 2e-5 if dtype == jnp.float32 else 3e-2
    xla, splash = loss_and_grads("xla", dtype, window, length=length), loss_and_grads("splash", dtype, window, length=length)
    np.testing.assert_allclose(splash[0], xla[0], rtol=tolerance)
    for ours, reference in zip(jax.tree.leaves(splash[1:]), jax.tree.leaves(xla[1:])):
        ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
        np.testing.assert_allclose(ours, reference, atol=tolerance * np.abs(reference).max())


def test_splash_per_device_on_a_mesh_matches_one_device():
    """Under a mesh splash runs once per device (shard_map over the batch and the heads)."""
    sharded = loss_and_grads("splash", jnp.float32, 64, make_mesh("data=2,tensor=2", jax.devices()[:4]))
    single = loss_and_grads("splash", jnp.float32, 64)
    for ours, reference in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_auto_and_refusals():
    roberta = ModelConfig.for_family("roberta")  # attention dropout 0.1
    modernbert = ModelConfig.for_family("modernbert", dtype="bfloat16")  # no dropout
    assert resolve("auto", modernbert, "tpu")[0] == "splash"
    assert resolve("auto", roberta, "tpu")[0] == "xla"  # splash has no dropout on the probabilities
    assert resolve("auto", modernbert, "gpu")[0] == "cudnn"
    assert resolve("auto", modernbert.replace(dtype="float32"), "gpu")[0] == "xla"
    assert resolve("auto", modernbert, "cpu")[0] == "xla"
    with pytest.raises(AttentionError, match="--attention_probs_dropout_prob 0 or --attention xla"):
        resolve("splash", roberta, "tpu")
    with pytest.raises(AttentionError, match="NVIDIA GPUs, not on cpu"):
        resolve("cudnn", modernbert, "cpu")
    with pytest.raises(AttentionError, match="multiple of 128"):
        attend(*(jnp.zeros((1, 200, 2, 64)),) * 3, Segments(jnp.ones((1, 200), jnp.int32)), "splash")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='compiling for a TPU needs libtpu: pip install "flax-bert[tpu]"')
def test_splash_compiles_for_a_tpu_topology():
    from flax_bert.tpu_compile import array_shapes, topology_devices

    mesh = make_mesh("data=4", topology_devices("v5e:2x2"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    q = jax.ShapeDtypeStruct((4, 2 * LENGTH, HEADS, HEAD_DIM), jnp.bfloat16, sharding=sharding)
    ids = jax.ShapeDtypeStruct((4, 2 * LENGTH), jnp.int32, sharding=sharding)

    def compiled(implementation):
        def loss(q, k, v, ids, local):
            with partitioning.use_mesh(mesh):
                out = attend(q, k, v, Segments(ids), implementation, window=128, use_window=local)
            return jnp.sum(out.astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q, ids, local).compile()

    local = jax.ShapeDtypeStruct((), bool, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    hlo = compiled("splash").as_text()
    assert "tpu_custom_call" in hlo  # the Pallas kernels (forward, dq, dkv), not an XLA fallback
    assert not [shape for _, shape in array_shapes(hlo) if shape[-2:] == (2 * LENGTH, 2 * LENGTH)]  # no scores
