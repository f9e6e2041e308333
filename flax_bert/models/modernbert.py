"""ModernBERT in Flax NNX, with transformers' `ModernBertForMaskedLM` module tree and parameter names.

Pre-norm layers without biases: `attn_norm` (the identity in layer 0) -> fused `Wqkv` with rotary
positions -> `Wo`, then `mlp_norm` -> GeGLU `Wi` (input and gate halves) -> `Wo`. Layers alternate
global attention and a sliding window (`local_attention` tokens wide, half on each side), each kind
with its own rotary base. As in `bert.py` the layers are stacked on a leading axis: the per-layer
differences (is the layer global, does it have an attention norm) are flags scanned with the
parameters, so `lax.scan` and the Python loop run the same function and give the same numbers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_bert.models.attention import Segments, attend
from flax_bert.models.config import ModelConfig
from flax_bert.models.layers import (Entry, MaskedLMOutput, SequenceClassifierOutput, activation, dropout, dtype,
                                     gather_positions, position_ids_from_segments, run_stacked, split_key,
                                     stacked_layers, tied_logits, vocab_bias)
from flax_bert.models.partitioning import constrain

Array = jax.Array


def _truncated_normal(cfg: ModelConfig, std: float):
    cutoff = cfg.initializer_cutoff_factor  # in standard deviations, as transformers' trunc_normal_ bounds
    return nnx.initializers.truncated_normal(std, lower=-cutoff, upper=cutoff)


def _linear(cfg: ModelConfig, d_in: int, d_out: int, axes: tuple, bias: bool, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype(cfg.dtype), param_dtype=dtype(cfg.param_dtype),
                      kernel_init=_truncated_normal(cfg, std), kernel_metadata={"logical_axes": axes},
                      bias_metadata={"logical_axes": axes[1:]}, rngs=rngs)


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_bias=cfg.norm_bias, dtype=dtype(cfg.dtype),
                         param_dtype=dtype(cfg.param_dtype), use_fast_variance=False,
                         scale_metadata={"logical_axes": ("norm",)}, bias_metadata={"logical_axes": ("norm",)}, rngs=rngs)


def _out_std(cfg: ModelConfig) -> float:
    """transformers scales the init of the layers' output projections by 1/sqrt(2·layers)."""
    return cfg.initializer_range / float(np.sqrt(2.0 * cfg.num_hidden_layers))


# ----------------------------------------------------------------------------- rotary positions
def rotary_tables(position_ids_BxL: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin [batch, length, head_dim] in float32, as transformers' default RoPE builds them."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids_BxL[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x_BxLxNxH: Array, cos_BxLxH: Array, sin_BxLxH: Array) -> Array:
    x = x_BxLxNxH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BxLxH[:, :, None] + rotated * sin_BxLxH[:, :, None]
    return out.astype(x_BxLxNxH.dtype)


# ----------------------------------------------------------------------------- modules
class Embeddings(nnx.Module):
    """`model.embeddings`: tok_embeddings -> norm -> dropout (no position table: positions are rotary)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        init = _truncated_normal(cfg, cfg.initializer_range)

        def embedding_init(key, shape, dtype_):
            table = init(key, shape, dtype_)
            return table if cfg.pad_token_id is None else table.at[cfg.pad_token_id].set(0)

        self.tok_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=dtype(cfg.param_dtype),
                                        embedding_init=embedding_init,
                                        embedding_metadata={"logical_axes": ("vocab", "embed")}, rngs=rngs)
        self.norm = _norm(cfg, rngs)

    def __call__(self, input_ids, dropout_key):
        table = constrain(self.tok_embeddings.embedding[...], "vocab", None)  # whole along embed: lookups stay local
        x = constrain(jnp.take(table, input_ids, axis=0), "batch", "length", "embed")
        return dropout(self.norm(x.astype(dtype(self.cfg.dtype))), self.cfg.embedding_dropout, dropout_key)


class Attention(nnx.Module):
    """`attn`: fused Wqkv [d, 3·d] laid out (q|k|v) x heads x head_dim, rotary q and k, then Wo."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.Wqkv = _linear(cfg, d, 3 * d, ("embed", "heads"), cfg.attention_bias, cfg.initializer_range, rngs)
        self.Wo = _linear(cfg, d, d, ("heads", "embed"), cfg.attention_bias, _out_std(cfg), rngs)

    def __call__(self, x_BxLxD, segments: Segments, local, cos, sin, dropout_key):
        """`local`: this layer attends within the sliding window (a flag scanned with the layers)."""
        cfg = self.cfg
        batch, length, _ = x_BxLxD.shape
        qkv = self.Wqkv(x_BxLxD).reshape(batch, length, 3, cfg.num_attention_heads, cfg.head_dim)
        q, k, v = (constrain(qkv[:, :, i], "batch", "length", "heads", None) for i in range(3))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        key_probs, key_out = split_key(dropout_key, 2)
        out = attend(q, k, v, segments, cfg.attention, window=cfg.local_attention, use_window=local,
                     dropout_rate=cfg.attention_probs_dropout_prob, dropout_key=key_probs)
        out = constrain(out, "batch", "length", "heads", None)
        out = self.Wo(out.reshape(batch, length, cfg.hidden_size))
        return dropout(out, cfg.attention_probs_dropout_prob, key_out)  # transformers' out_drop uses this rate


class MLP(nnx.Module):
    """`mlp`: Wi [d, 2·f] -> act(input half) * gate half -> dropout -> Wo [f, d]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.Wi = _linear(cfg, cfg.hidden_size, 2 * cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias,
                          cfg.initializer_range, rngs)
        self.Wo = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, _out_std(cfg), rngs)

    def __call__(self, x, dropout_key):
        inputs, gate = (constrain(half, "batch", "length", "mlp") for half in jnp.split(self.Wi(x), 2, axis=-1))
        return self.Wo(dropout(activation(self.cfg.hidden_act)(inputs) * gate, self.cfg.hidden_dropout_prob, dropout_key))


class Layer(nnx.Module):
    """One encoder layer. Every stacked layer owns an `attn_norm`; layer 0's is never applied (transformers
    has none there) and is not exported."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = _norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, has_attn_norm, segments, local, cos, sin, dropout_key):
        key_attention, key_mlp = split_key(dropout_key, 2)
        normed = jnp.where(has_attn_norm, self.attn_norm(x), x)
        x = x + self.attn(normed, segments, local, cos, sin, key_attention)
        return x + self.mlp(self.mlp_norm(x), key_mlp)


class ModernBertModel(nnx.Module):
    """`model`: embeddings -> layers (global and sliding-window) -> final_norm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.layers = stacked_layers(Layer, cfg, rngs)  # every parameter has a leading [num_hidden_layers] axis
        self.final_norm = _norm(cfg, rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, segment_ids=None, position_ids=None,
                 dropout_key=None):
        """`token_type_ids` is accepted for the shared call signature; ModernBERT has no segment embeddings."""
        cfg = self.cfg
        length = input_ids.shape[1]
        segments = Segments.of(input_ids, attention_mask, segment_ids)  # packed rows: own document only
        if position_ids is None:  # positions restart at 0 in each packed document
            position_ids = (position_ids_from_segments(segment_ids, 0) if segment_ids is not None
                            else jnp.broadcast_to(jnp.arange(length), input_ids.shape))
        global_rope = rotary_tables(position_ids, cfg.head_dim, cfg.global_rope_theta)
        local_rope = rotary_tables(position_ids, cfg.head_dim, cfg.local_rope_theta)
        is_global = jnp.array([kind == "full_attention" for kind in cfg.layer_types])
        has_attn_norm = jnp.arange(cfg.num_hidden_layers) > 0

        key_embed, key_layers = split_key(dropout_key, 2)
        x = self.embeddings(input_ids, key_embed)

        def one_layer(layer, h, flags, key):
            global_layer, norm_flag = flags
            cos = jnp.where(global_layer, global_rope[0], local_rope[0])
            sin = jnp.where(global_layer, global_rope[1], local_rope[1])
            return layer(h, norm_flag, segments, ~global_layer, cos, sin, key)  # own document, AND window if local

        x = run_stacked(cfg, self.layers, x, key_layers, one_layer, per_layer=(is_global, has_attn_norm))
        return self.final_norm(x)


class PredictionHead(nnx.Module):
    """`head`: dense -> classifier_activation -> norm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), cfg.classifier_bias,
                             _out_std(cfg), rngs)
        self.act = activation(cfg.classifier_activation)
        self.norm = _norm(cfg, rngs)

    def __call__(self, x):
        return self.norm(self.act(self.dense(x)))


class Decoder(nnx.Module):
    """`decoder`: its weight is the word-embedding table (tied); only its bias is a parameter."""

    def __init__(self, cfg: ModelConfig):
        self.bias = vocab_bias(cfg.vocab_size, cfg.param_dtype) if cfg.decoder_bias else None


class ModernBertForMaskedLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = ModernBertModel(cfg, rngs)
        self.head = PredictionHead(cfg, rngs)
        self.decoder = Decoder(cfg)

    def mlm_logits(self, hidden: Array) -> Array:
        return tied_logits(self.head(hidden), self.model.embeddings.tok_embeddings, self.decoder.bias)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, segment_ids=None,
                 position_ids=None, masked_positions=None, dropout_key=None) -> MaskedLMOutput:
        """`masked_positions` [batch, slots]: run the head and the vocabulary projection only there."""
        hidden = self.model(input_ids, attention_mask, token_type_ids, segment_ids, position_ids, dropout_key)
        head_input = hidden if masked_positions is None else gather_positions(hidden, masked_positions)
        return MaskedLMOutput(logits=self.mlm_logits(head_input), last_hidden_state=hidden)


class ModernBertForSequenceClassification(nnx.Module):
    """transformers' ModernBertForSequenceClassification: pool (`classifier_pooling`: the [CLS] row, or the mean
    over the attention mask) -> `head` (as the masked LM's) -> dropout -> `classifier` (with a bias)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = ModernBertModel(cfg, rngs)
        self.head = PredictionHead(cfg, rngs)
        self.classifier = _linear(cfg, cfg.hidden_size, cfg.num_labels, ("embed", None), True, cfg.initializer_range,
                                  rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 dropout_key=None) -> SequenceClassifierOutput:
        key_encoder, key_head = split_key(dropout_key, 2)
        hidden = self.model(input_ids, attention_mask, token_type_ids, None, position_ids, key_encoder)
        if self.config.classifier_pooling == "mean":
            weights = (jnp.ones(input_ids.shape) if attention_mask is None else attention_mask).astype(hidden.dtype)
            pooled = jnp.sum(hidden * weights[..., None], axis=1) / jnp.sum(weights, axis=1, keepdims=True)
        else:
            pooled = hidden[:, 0]
        pooled = dropout(self.head(pooled), self.config.classifier_dropout or 0.0, key_head)
        return SequenceClassifierOutput(logits=self.classifier(pooled).astype(jnp.float32), last_hidden_state=hidden)


# ----------------------------------------------------------------------------- Hugging Face names
def name_table(cfg: ModelConfig, architecture: str = "ModernBertForMaskedLM") -> list[Entry]:
    """Every tensor of transformers' ModernBertForMaskedLM (the tied `decoder.weight` is not stored) or
    ModernBertForSequenceClassification (whose `head` is the masked LM's: a pretrained one carries over)."""
    entries: list[Entry] = []

    def linear(hf: str, ours: str, bias: bool, layer=None, head=False):
        entries.append(Entry(f"{hf}.weight", (*ours.split("."), "kernel"), "linear", layer, head))
        if bias:
            entries.append(Entry(f"{hf}.bias", (*ours.split("."), "bias"), "copy", layer, head))

    def norm(hf: str, ours: str, layer=None, head=False):
        entries.append(Entry(f"{hf}.weight", (*ours.split("."), "scale"), "copy", layer, head))
        if cfg.norm_bias:
            entries.append(Entry(f"{hf}.bias", (*ours.split("."), "bias"), "copy", layer, head))

    entries.append(Entry("model.embeddings.tok_embeddings.weight", ("model", "embeddings", "tok_embeddings", "embedding"), "copy"))
    norm("model.embeddings.norm", "model.embeddings.norm")
    for i in range(cfg.num_hidden_layers):
        if i > 0:  # layer 0 has no attention norm in transformers
            norm(f"model.layers.{i}.attn_norm", "model.layers.attn_norm", layer=i)
        linear(f"model.layers.{i}.attn.Wqkv", "model.layers.attn.Wqkv", cfg.attention_bias, layer=i)
        linear(f"model.layers.{i}.attn.Wo", "model.layers.attn.Wo", cfg.attention_bias, layer=i)
        norm(f"model.layers.{i}.mlp_norm", "model.layers.mlp_norm", layer=i)
        linear(f"model.layers.{i}.mlp.Wi", "model.layers.mlp.Wi", cfg.mlp_bias, layer=i)
        linear(f"model.layers.{i}.mlp.Wo", "model.layers.mlp.Wo", cfg.mlp_bias, layer=i)
    norm("model.final_norm", "model.final_norm")
    linear("head.dense", "head.dense", cfg.classifier_bias, head=True)
    norm("head.norm", "head.norm", head=True)
    if architecture == "ModernBertForSequenceClassification":
        linear("classifier", "classifier", True, head=True)
    elif cfg.decoder_bias:
        entries.append(Entry("decoder.bias", ("decoder", "bias"), "copy", head=True))
    return entries


def normalize_names(tensors: dict, cfg: ModelConfig) -> dict:
    """Drop the tied decoder weight (it is the embedding table) and prefix a bare ModernBertModel's names."""
    out = {}
    for name, value in tensors.items():
        if name == "decoder.weight":
            continue
        if name.startswith(("embeddings.", "layers.", "final_norm.")):
            name = "model." + name
        out[name] = value
    return out
