"""Pieces every model family shares: outputs, dropout with explicit keys, initialized layers with
logical axis names, packed-row positions, the tied vocabulary projection, remat policies, the stacked
layers (each layer's input and output pinned to the batch axes), and the conversion-table entry."""
from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from flax_bert.models.partitioning import constrain

Array = jax.Array


@flax.struct.dataclass
class MaskedLMOutput:
    logits: Array                      # [batch, length or slots, vocab], float32
    last_hidden_state: Array           # [batch, length, hidden]
    seq_relationship_logits: Array | None = None  # [batch, 2], BertForPreTraining only


@flax.struct.dataclass
class SequenceClassifierOutput:
    logits: Array                      # [batch, num_labels], float32 (one column for regression)
    last_hidden_state: Array           # [batch, length, hidden]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a family's name table: a Hugging Face tensor and where it lives in our state."""

    hf_name: str             # e.g. roberta.encoder.layer.3.attention.self.query.weight
    path: tuple[str, ...]    # our state path, e.g. (roberta, encoder, layer, attention, self, query, kernel)
    transform: str           # "linear" (transpose) | "copy"
    layer: int | None = None  # index into our stacked layer axis
    head: bool = False       # part of a task head (may be freshly initialized when absent)


def dtype(name: str):
    return jnp.dtype(name)


def activation(name: str):
    return {
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "tanh": jnp.tanh,
    }[name]


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout; the identity when `key` is None (evaluation) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_key(key: Array | None, n: int):
    return [None] * n if key is None else list(jax.random.split(key, n))


def position_ids_from_segments(segment_ids: Array, first_position: int) -> Array:
    """Positions restart at `first_position` in each packed document; padding (segment 0) gets
    first_position - 1, which for RoBERTa is padding_idx, as transformers assigns it."""
    length = segment_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    start = jax.lax.cummax(jnp.where(segment_ids != previous, index, 0), axis=1)
    return jnp.where(segment_ids > 0, first_position + index - start, max(first_position - 1, 0))


def vocab_bias(vocab_size: int, param_dtype: str) -> nnx.Param:
    return nnx.Param(jnp.zeros((vocab_size,), dtype(param_dtype)), logical_axes=("vocab",))


def tied_logits(hidden: Array, word_embeddings: nnx.Embed, bias: nnx.Param | None) -> Array:
    """Project onto the tied word embeddings; logits and everything after them are fp32."""
    table = word_embeddings.embedding[...].astype(hidden.dtype)
    logits = jnp.einsum("...d,vd->...v", constrain(hidden, "batch", None, "embed"), table,
                        preferred_element_type=jnp.float32)
    logits = constrain(logits, "batch", None, "vocab")
    return logits if bias is None else logits + bias[...].astype(jnp.float32)


def gather_positions(hidden_BxLxD: Array, positions_BxP: Array) -> Array:
    return jnp.take_along_axis(hidden_BxLxD, positions_BxP[:, :, None], axis=1)


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def stacked_layers(make_layer, cfg, rngs: nnx.Rngs):
    """`cfg.num_hidden_layers` layers `make_layer(cfg, rngs)` as one module whose every parameter has a
    leading [num_hidden_layers] axis (what run_stacked scans over)."""

    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={})
    def build(rngs):
        return make_layer(cfg, rngs)

    return build(rngs)


def run_stacked(cfg, layers, x, dropout_key, call, per_layer=None):
    """`x` through the stacked `layers`: `call(layer, h, per_layer[i], key)` for layer i (`per_layer`: arrays
    with a leading layer axis, or None), rematerialized by `cfg.remat_policy`, scanned when `cfg.scan_layers`
    (one compiled layer) or unrolled in a Python loop."""
    graphdef, stacked = nnx.split(layers)

    def one_layer(h, layer_params_extra_and_key):
        layer_params, extra, key = layer_params_extra_and_key
        h = call(nnx.merge(graphdef, layer_params), constrain(h, "batch", "length", "embed"),
                 extra, key)
        return constrain(h, "batch", "length", "embed"), None

    if cfg.remat_policy != "none":
        one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_hidden_layers)
    if cfg.scan_layers:
        return jax.lax.scan(one_layer, x, (stacked, per_layer, keys))[0]
    for i in range(cfg.num_hidden_layers):
        layer_i, extra_i = jax.tree.map(lambda p: p[i], (stacked, per_layer))
        x = one_layer(x, (layer_i, extra_i, None if keys is None else keys[i]))[0]
    return x
