"""BERT and RoBERTa in Flax NNX, with the Hugging Face module tree and parameter names.

The encoder layers are stored stacked (a leading `layers` axis), so the same parameters run
under `lax.scan` (one layer to compile) or a plain Python loop; conversion unstacks them into
`encoder.layer.N`. Every parameter carries `logical_axes` metadata that `sharding.py` maps onto
the mesh. Dropout takes an explicit key, so a train step is a pure function of its inputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_bert.models.attention import Segments, attend
from flax_bert.models.config import ModelConfig
from flax_bert.models.layers import Entry, MaskedLMOutput, SequenceClassifierOutput, dropout, gather_positions
from flax_bert.models.layers import activation as _activation
from flax_bert.models.layers import dtype as _dtype
from flax_bert.models.layers import position_ids_from_segments, run_stacked, split_key as _split_key, stacked_layers
from flax_bert.models.layers import tied_logits, vocab_bias
from flax_bert.models.partitioning import constrain

Array = jax.Array


def _linear(cfg: ModelConfig, d_in: int, d_out: int, axes: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
        kernel_init=nnx.initializers.normal(cfg.initializer_range),
        kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": axes[1:]}, rngs=rngs)


def _layer_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=_dtype(cfg.dtype),
        param_dtype=_dtype(cfg.param_dtype), use_fast_variance=False,
        scale_metadata={"logical_axes": ("norm",)}, bias_metadata={"logical_axes": ("norm",)}, rngs=rngs)


def _embedding(cfg: ModelConfig, rows: int, axes: tuple[str | None, str], rngs: nnx.Rngs,
               pad_row: int | None = None) -> nnx.Embed:
    normal = nnx.initializers.normal(cfg.initializer_range)

    def init(key, shape, dtype):
        table = normal(key, shape, dtype)
        return table if pad_row is None else table.at[pad_row].set(0)  # as Hugging Face initializes it

    return nnx.Embed(rows, cfg.hidden_size, param_dtype=_dtype(cfg.param_dtype), embedding_init=init,
                     embedding_metadata={"logical_axes": axes}, rngs=rngs)


def roberta_position_ids(input_ids: Array, pad_token_id: int) -> Array:
    """transformers' `create_position_ids_from_input_ids`: count non-pad tokens from padding_idx + 1."""
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + pad_token_id


class Embeddings(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.word_embeddings = _embedding(cfg, cfg.vocab_size, ("vocab", "embed"), rngs, cfg.pad_token_id)
        self.position_embeddings = _embedding(cfg, cfg.max_position_embeddings, (None, "embed"), rngs,
                                              cfg.pad_token_id if cfg.model_type == "roberta" else None)
        self.token_type_embeddings = _embedding(cfg, cfg.type_vocab_size, (None, "embed"), rngs)
        self.LayerNorm = _layer_norm(cfg, rngs)

    def __call__(self, input_ids, token_type_ids, position_ids, dropout_key):
        # the tables whole along `embed` (gathered as FSDP gathers any weight): the lookups stay on each device's rows
        x = (jnp.take(constrain(self.word_embeddings.embedding[...], "vocab", None), input_ids, axis=0)
             + jnp.take(constrain(self.position_embeddings.embedding[...], None, None), position_ids, axis=0)
             + jnp.take(constrain(self.token_type_embeddings.embedding[...], None, None), token_type_ids, axis=0))
        x = self.LayerNorm(constrain(x.astype(_dtype(self.cfg.dtype)), "batch", "length", "embed"))
        return dropout(x, self.cfg.hidden_dropout_prob, dropout_key)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.query = _linear(cfg, d, d, ("embed", "heads"), rngs)
        self.key = _linear(cfg, d, d, ("embed", "heads"), rngs)
        self.value = _linear(cfg, d, d, ("embed", "heads"), rngs)

    def __call__(self, x_BxLxD, segments: Segments, dropout_key):
        cfg = self.cfg
        batch, length, _ = x_BxLxD.shape

        def split(t):
            return constrain(t.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim),
                             "batch", "length", "heads", None)

        q, k, v = split(self.query(x_BxLxD)), split(self.key(x_BxLxD)), split(self.value(x_BxLxD))
        out = attend(q, k, v, segments, cfg.attention, dropout_rate=cfg.attention_probs_dropout_prob,
                     dropout_key=dropout_key)
        return constrain(out, "batch", "length", "heads", None).reshape(batch, length, cfg.hidden_size)


class DenseLayerNorm(nnx.Module):
    """`attention.output` and `output` in Hugging Face: dense -> dropout -> LayerNorm(x + residual)."""

    def __init__(self, cfg: ModelConfig, d_in: int, axes: tuple[str, str], rngs: nnx.Rngs):
        self.cfg = cfg
        self.dense = _linear(cfg, d_in, cfg.hidden_size, axes, rngs)
        self.LayerNorm = _layer_norm(cfg, rngs)

    def __call__(self, x, residual, dropout_key):
        return self.LayerNorm(dropout(self.dense(x), self.cfg.hidden_dropout_prob, dropout_key) + residual)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        setattr(self, "self", SelfAttention(cfg, rngs))  # Hugging Face calls it `attention.self`
        self.output = DenseLayerNorm(cfg, cfg.hidden_size, ("heads", "embed"), rngs)

    def __call__(self, x, segments, dropout_key):
        key_probs, key_out = _split_key(dropout_key, 2)
        return self.output(getattr(self, "self")(x, segments, key_probs), x, key_out)


class Intermediate(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs)
        self.activation = _activation(cfg.hidden_act)

    def __call__(self, x):
        return constrain(self.activation(self.dense(x)), "batch", "length", "mlp")


class Layer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attention = Attention(cfg, rngs)
        self.intermediate = Intermediate(cfg, rngs)
        self.output = DenseLayerNorm(cfg, cfg.intermediate_size, ("mlp", "embed"), rngs)

    def __call__(self, x, segments, dropout_key):
        key_attention, key_output = _split_key(dropout_key, 2)
        x = self.attention(x, segments, key_attention)
        return self.output(self.intermediate(x), x, key_output)




class Encoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer = stacked_layers(Layer, cfg, rngs)  # every parameter has a leading [num_hidden_layers] axis

    def __call__(self, x, segments, dropout_key):
        return run_stacked(self.cfg, self.layer, x, dropout_key, lambda layer, h, _, key: layer(h, segments, key))


class Pooler(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), rngs)

    def __call__(self, hidden_BxLxD):
        return jnp.tanh(self.dense(hidden_BxLxD[:, 0]))


class EncoderModel(nnx.Module):
    """`BertModel` / `RobertaModel`: embeddings -> encoder (-> pooler)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, add_pooling_layer: bool = False):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.pooler = Pooler(cfg, rngs) if add_pooling_layer else None

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, segment_ids=None,
                 position_ids=None, dropout_key=None):
        cfg = self.cfg
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        segments = Segments.of(input_ids, attention_mask, segment_ids)  # packed rows: attention stays in each document
        if segment_ids is not None and position_ids is None:
            position_ids = position_ids_from_segments(segment_ids, cfg.first_position_id)
        if position_ids is None:
            if cfg.model_type == "roberta":
                position_ids = roberta_position_ids(input_ids, cfg.pad_token_id)
            else:
                position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        key_embed, key_encoder = _split_key(dropout_key, 2)
        x = self.embeddings(input_ids, token_type_ids, position_ids, key_embed)
        return self.encoder(x, segments, key_encoder)


def _vocab_bias(cfg: ModelConfig) -> nnx.Param:
    return vocab_bias(cfg.vocab_size, cfg.param_dtype)


class RobertaLMHead(nnx.Module):
    """`lm_head`: dense -> gelu -> layer_norm -> decoder (tied to the word embeddings) + bias."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), rngs)
        self.layer_norm = _layer_norm(cfg, rngs)
        self.bias = _vocab_bias(cfg)

    def __call__(self, hidden, word_embeddings):
        x = self.layer_norm(_activation("gelu")(self.dense(hidden)))
        return tied_logits(x, word_embeddings, self.bias)


class BertPredictionHeadTransform(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), rngs)
        self.activation = _activation(cfg.hidden_act)
        self.LayerNorm = _layer_norm(cfg, rngs)

    def __call__(self, x):
        return self.LayerNorm(self.activation(self.dense(x)))


class BertLMPredictionHead(nnx.Module):
    """`cls.predictions`: transform -> decoder (tied to the word embeddings) + bias."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.transform = BertPredictionHeadTransform(cfg, rngs)
        self.bias = _vocab_bias(cfg)

    def __call__(self, hidden, word_embeddings):
        return tied_logits(self.transform(hidden), word_embeddings, self.bias)


class BertPreTrainingHeads(nnx.Module):
    """`cls`: the MLM predictions, and (BertForPreTraining) the next-sentence classifier."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, with_nsp: bool):
        self.predictions = BertLMPredictionHead(cfg, rngs)
        self.seq_relationship = _linear(cfg, cfg.hidden_size, 2, ("embed", None), rngs) if with_nsp else None


class _MaskedLMBase(nnx.Module):
    """Shared call: encode, optionally gather the prediction slots, project onto the vocabulary."""

    config: ModelConfig

    @property
    def backbone(self) -> EncoderModel:
        raise NotImplementedError

    def mlm_logits(self, hidden: Array) -> Array:
        raise NotImplementedError

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, segment_ids=None,
                 position_ids=None, masked_positions=None, dropout_key=None) -> MaskedLMOutput:
        """`masked_positions` [batch, slots]: run the vocabulary head only there (the sparse head)."""
        hidden = self.backbone(input_ids, attention_mask, token_type_ids, segment_ids, position_ids, dropout_key)
        head_input = hidden if masked_positions is None else gather_positions(hidden, masked_positions)
        return MaskedLMOutput(logits=self.mlm_logits(head_input), last_hidden_state=hidden)


class RobertaForMaskedLM(_MaskedLMBase):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.roberta = EncoderModel(cfg, rngs)
        self.lm_head = RobertaLMHead(cfg, rngs)

    @property
    def backbone(self):
        return self.roberta

    def mlm_logits(self, hidden):
        return self.lm_head(hidden, self.roberta.embeddings.word_embeddings)


class BertForMaskedLM(_MaskedLMBase):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, with_nsp: bool = False):
        self.config = cfg
        self.bert = EncoderModel(cfg, rngs, add_pooling_layer=with_nsp)
        self.cls = BertPreTrainingHeads(cfg, rngs, with_nsp)

    @property
    def backbone(self):
        return self.bert

    def mlm_logits(self, hidden):
        return self.cls.predictions(hidden, self.bert.embeddings.word_embeddings)


class BertForPreTraining(BertForMaskedLM):
    """BERT's pre-training model: the MLM head plus next-sentence prediction on the pooled [CLS]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, with_nsp=True)

    def __call__(self, *args, **kwargs) -> MaskedLMOutput:
        out = super().__call__(*args, **kwargs)
        pooled = self.bert.pooler(out.last_hidden_state)
        return out.replace(seq_relationship_logits=self.cls.seq_relationship(pooled).astype(jnp.float32))


# ----------------------------------------------------------------------------- sequence classification
def _classifier_dropout(cfg: ModelConfig) -> float:
    """transformers' rule: `classifier_dropout`, or the hidden dropout when it is unset."""
    return cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout


class BertForSequenceClassification(nnx.Module):
    """transformers' BertForSequenceClassification: the pooler (dense + tanh on [CLS]) -> dropout -> `classifier`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.bert = EncoderModel(cfg, rngs, add_pooling_layer=True)
        self.classifier = _linear(cfg, cfg.hidden_size, cfg.num_labels, ("embed", None), rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 dropout_key=None) -> SequenceClassifierOutput:
        key_encoder, key_head = _split_key(dropout_key, 2)
        hidden = self.bert(input_ids, attention_mask, token_type_ids, None, position_ids, key_encoder)
        pooled = dropout(self.bert.pooler(hidden), _classifier_dropout(self.config), key_head)
        return SequenceClassifierOutput(logits=self.classifier(pooled).astype(jnp.float32), last_hidden_state=hidden)


class RobertaClassificationHead(nnx.Module):
    """`classifier`: [CLS] -> dropout -> dense -> tanh -> dropout -> out_proj (no pooler in RoBERTa)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), rngs)
        self.out_proj = _linear(cfg, cfg.hidden_size, cfg.num_labels, ("embed", None), rngs)

    def __call__(self, hidden_BxLxD, dropout_key):
        rate = _classifier_dropout(self.cfg)
        key_in, key_out = _split_key(dropout_key, 2)
        x = jnp.tanh(self.dense(dropout(hidden_BxLxD[:, 0], rate, key_in)))
        return self.out_proj(dropout(x, rate, key_out))


class RobertaForSequenceClassification(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.roberta = EncoderModel(cfg, rngs)
        self.classifier = RobertaClassificationHead(cfg, rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 dropout_key=None) -> SequenceClassifierOutput:
        key_encoder, key_head = _split_key(dropout_key, 2)
        hidden = self.roberta(input_ids, attention_mask, token_type_ids, None, position_ids, key_encoder)
        return SequenceClassifierOutput(logits=self.classifier(hidden, key_head).astype(jnp.float32),
                                        last_hidden_state=hidden)


# ----------------------------------------------------------------------------- Hugging Face names
_LAYER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense", "intermediate.dense", "output.dense")
_LAYER_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")


def name_table(cfg: ModelConfig, architecture: str) -> list[Entry]:
    """Every tensor of `architecture` (Roberta/Bert ForMaskedLM, ForSequenceClassification, BertForPreTraining)
    as Hugging Face names it."""
    p = cfg.model_type  # backbone prefix: "bert" or "roberta"
    entries: list[Entry] = []

    def linear(hf: str, ours: str, layer=None, head=False):
        entries.append(Entry(f"{hf}.weight", (*ours.split("."), "kernel"), "linear", layer, head))
        entries.append(Entry(f"{hf}.bias", (*ours.split("."), "bias"), "copy", layer, head))

    def norm(hf: str, ours: str, layer=None, head=False):
        entries.append(Entry(f"{hf}.weight", (*ours.split("."), "scale"), "copy", layer, head))
        entries.append(Entry(f"{hf}.bias", (*ours.split("."), "bias"), "copy", layer, head))

    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        entries.append(Entry(f"{p}.embeddings.{table}.weight", (p, "embeddings", table, "embedding"), "copy"))
    norm(f"{p}.embeddings.LayerNorm", f"{p}.embeddings.LayerNorm")
    for i in range(cfg.num_hidden_layers):
        for name in _LAYER_LINEARS:
            linear(f"{p}.encoder.layer.{i}.{name}", f"{p}.encoder.layer.{name}", layer=i)
        for name in _LAYER_NORMS:
            norm(f"{p}.encoder.layer.{i}.{name}", f"{p}.encoder.layer.{name}", layer=i)
    if architecture == "RobertaForMaskedLM":
        linear("lm_head.dense", "lm_head.dense", head=True)
        norm("lm_head.layer_norm", "lm_head.layer_norm", head=True)
        entries.append(Entry("lm_head.bias", ("lm_head", "bias"), "copy", head=True))
    elif architecture in ("BertForMaskedLM", "BertForPreTraining"):
        linear("cls.predictions.transform.dense", "cls.predictions.transform.dense", head=True)
        norm("cls.predictions.transform.LayerNorm", "cls.predictions.transform.LayerNorm", head=True)
        entries.append(Entry("cls.predictions.bias", ("cls", "predictions", "bias"), "copy", head=True))
    if architecture in ("BertForPreTraining", "BertForSequenceClassification"):
        linear(f"{p}.pooler.dense", f"{p}.pooler.dense", head=True)  # fresh when the checkpoint has no pooler
    if architecture == "BertForPreTraining":
        linear("cls.seq_relationship", "cls.seq_relationship", head=True)
    elif architecture == "BertForSequenceClassification":
        linear("classifier", "classifier", head=True)
    elif architecture == "RobertaForSequenceClassification":
        linear("classifier.dense", "classifier.dense", head=True)
        linear("classifier.out_proj", "classifier.out_proj", head=True)
    return entries


def normalize_names(tensors: dict, cfg: ModelConfig) -> dict:
    """Old and headless checkpoints: TF-era gamma/beta, a bare BertModel without its prefix."""
    prefix = cfg.model_type + "."
    backbone_roots = ("embeddings.", "encoder.", "pooler.")
    out = {}
    for name, value in tensors.items():
        if name.endswith((".position_ids", ".token_type_ids")):  # buffers, not weights
            continue
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if name.startswith(backbone_roots):
            name = prefix + name
        out[name] = value
    return out
