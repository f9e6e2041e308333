"""The model families flax-bert builds, and the one registry everything else looks them up in.

A family is one module under `flax_bert/models/` (its NNX classes and its Hugging Face name table)
plus one `Family` entry below (how its `config.json` fields map onto `ModelConfig`, its defaults,
its architectures). Training, conversion, export, fill-mask and the benchmark ask the registry by
`model_type`; none of them names a family. This file imports no JAX, so `config.py` (and the
PyTorch side of the benchmark) can use it.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from flax_bert.errors import InputError

_BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "bos_token_id",
                "eos_token_id", "classifier_dropout")


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str                 # Hugging Face's config.json `model_type`
    module: str                     # the NNX classes and `name_table` / `normalize_names`
    architectures: tuple[str, ...]  # Hugging Face class names it builds; the first is its masked LM
    hf_fields: dict[str, str]       # ModelConfig field -> config.json key
    defaults: dict[str, Any]        # ModelConfig fields of the family's published base model
    tokenizer_kind: str             # the tokenizer trained for a fresh model: "bpe" | "wordpiece"
    positions_after_padding: bool = False  # RoBERTa numbers positions from padding_idx + 1
    hf_extra_read: Callable[[dict], dict] | None = None   # config.json -> extra ModelConfig fields
    hf_extra_write: Callable[[Any], dict] | None = None   # ModelConfig -> extra config.json keys
    hf_static: dict[str, Any] = dataclasses.field(default_factory=dict)  # keys always written
    nsp_architecture: str | None = None  # the architecture with a next-sentence head, if any
    classifier_architecture: str | None = None  # its *ForSequenceClassification (fine-tuning, not pretraining)

    @property
    def all_architectures(self) -> tuple[str, ...]:
        """What it pretrains (`architectures`) and what it fine-tunes (the classifier)."""
        return self.architectures + ((self.classifier_architecture,) if self.classifier_architecture else ())

    def classes(self) -> dict[str, type]:
        module = importlib.import_module(self.module)
        return {name: getattr(module, name) for name in self.all_architectures}

    def module_ref(self):
        return importlib.import_module(self.module)


def global_every(num_layers: int, period: int | None = None) -> tuple[str, ...]:
    """transformers' `global_attn_every_n_layers` (default 3): layers 0, period, 2·period... attend globally."""
    period = period or 3
    return tuple("sliding_attention" if i % period else "full_attention" for i in range(num_layers))


def _modernbert_read(hf: dict) -> dict:
    """`layer_types` (or the older `global_attn_every_n_layers`) and the two rotary thetas."""
    layers = hf.get("num_hidden_layers", 22)
    layer_types = hf.get("layer_types")
    if layer_types is None:
        layer_types = list(global_every(layers, hf.get("global_attn_every_n_layers")))
    rope = hf.get("rope_parameters") or {}
    thetas = {kind: (rope.get(kind) or {}).get("rope_theta") for kind in ("full_attention", "sliding_attention")}
    for kind, (params, old_key) in {"full_attention": (rope.get("full_attention"), "global_rope_theta"),
                                    "sliding_attention": (rope.get("sliding_attention"), "local_rope_theta")}.items():
        if params and params.get("rope_type", "default") != "default":
            raise InputError(f"rope_type {params['rope_type']!r} ({kind}) is not supported; only 'default' rotary positions are")
        if thetas[kind] is None and old_key in hf:
            thetas[kind] = hf[old_key]
    extra = {"layer_types": tuple(layer_types)}
    if thetas["full_attention"] is not None:
        extra["global_rope_theta"] = float(thetas["full_attention"])
    if thetas["sliding_attention"] is not None:
        extra["local_rope_theta"] = float(thetas["sliding_attention"])
    if hf.get("tie_word_embeddings", True) is False:
        raise InputError("tie_word_embeddings=false is not supported: flax-bert's decoder is tied to the word embeddings")
    return extra


def _modernbert_write(cfg) -> dict:
    return {"layer_types": list(cfg.layer_types or ()), "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_theta},
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}}}


_BERT_COMMON = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1, initializer_range=0.02)

FAMILIES: dict[str, Family] = {
    "roberta": Family(
        "roberta", "flax_bert.models.bert", ("RobertaForMaskedLM",), {f: f for f in _BERT_FIELDS},
        {**_BERT_COMMON, "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1,
         "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
        tokenizer_kind="bpe", positions_after_padding=True, hf_static={"position_embedding_type": "absolute"},
        classifier_architecture="RobertaForSequenceClassification"),
    "bert": Family(
        "bert", "flax_bert.models.bert", ("BertForMaskedLM", "BertForPreTraining"), {f: f for f in _BERT_FIELDS},
        {**_BERT_COMMON, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
         "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None},
        tokenizer_kind="wordpiece", hf_static={"position_embedding_type": "absolute"},
        nsp_architecture="BertForPreTraining", classifier_architecture="BertForSequenceClassification"),
    # transformers' ModernBertConfig defaults (ModernBERT-base); dropout is off in the recipe.
    "modernbert": Family(
        "modernbert", "flax_bert.models.modernbert", ("ModernBertForMaskedLM",),
        {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
         "num_attention_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
         "hidden_act": "hidden_activation", "max_position_embeddings": "max_position_embeddings",
         "initializer_range": "initializer_range", "initializer_cutoff_factor": "initializer_cutoff_factor",
         "layer_norm_eps": "norm_eps", "norm_bias": "norm_bias", "attention_bias": "attention_bias",
         "mlp_bias": "mlp_bias", "decoder_bias": "decoder_bias", "classifier_bias": "classifier_bias",
         "classifier_activation": "classifier_activation", "local_attention": "local_attention",
         "hidden_dropout_prob": "mlp_dropout", "attention_probs_dropout_prob": "attention_dropout",
         "embedding_dropout": "embedding_dropout", "pad_token_id": "pad_token_id", "bos_token_id": "bos_token_id",
         "eos_token_id": "eos_token_id", "cls_token_id": "cls_token_id", "sep_token_id": "sep_token_id",
         "classifier_dropout": "classifier_dropout", "classifier_pooling": "classifier_pooling"},
        {"vocab_size": 50368, "hidden_size": 768, "num_hidden_layers": 22, "num_attention_heads": 12,
         "intermediate_size": 1152, "hidden_act": "gelu", "max_position_embeddings": 8192, "initializer_range": 0.02,
         "initializer_cutoff_factor": 2.0, "layer_norm_eps": 1e-5, "norm_bias": False, "attention_bias": False,
         "mlp_bias": False, "decoder_bias": True, "classifier_bias": False, "classifier_activation": "gelu",
         "local_attention": 128, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
         "embedding_dropout": 0.0, "type_vocab_size": 1, "pad_token_id": 50283, "bos_token_id": 50281,
         "eos_token_id": 50282, "cls_token_id": 50281, "sep_token_id": 50282, "global_rope_theta": 160000.0,
         "local_rope_theta": 10000.0, "classifier_dropout": 0.0, "classifier_pooling": "cls"},
        tokenizer_kind="bpe", hf_extra_read=_modernbert_read, hf_extra_write=_modernbert_write,
        classifier_architecture="ModernBertForSequenceClassification"),
}


class UnknownModelType(InputError):
    """A model_type no registered family builds."""


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise UnknownModelType(f"unsupported model_type {model_type!r}: flax-bert builds {', '.join(FAMILIES)} models")
    return FAMILIES[model_type]


def all_architectures() -> dict[str, type]:
    """Every NNX model class by its Hugging Face architecture name."""
    out: dict[str, type] = {}
    for fam in FAMILIES.values():
        out.update(fam.classes())
    return out


def model_class_for(cfg, objective: str = "mlm") -> type:
    """The NNX class a run with `objective` trains for this config."""
    fam = family(cfg.model_type)
    if objective == "mlm+nsp":
        if fam.nsp_architecture is None:
            raise InputError(f"objective 'mlm+nsp' needs a BERT model (--model_type bert); {cfg.model_type} has no NSP head")
        return fam.classes()[fam.nsp_architecture]
    return fam.classes()[fam.architectures[0]]


def classifier_class_for(cfg) -> type:
    """The family's *ForSequenceClassification NNX class."""
    fam = family(cfg.model_type)
    return fam.classes()[fam.classifier_architecture]


def architecture_of(model) -> str:
    return type(model).__name__


def create_model(cfg, seed: int = 0, objective: str = "mlm"):
    from flax import nnx

    return model_class_for(cfg, objective)(cfg, rngs=nnx.Rngs(seed))


def name_table(cfg, architecture: str) -> list:
    """Every Hugging Face tensor of `architecture` paired with our parameter path (see convert.Entry)."""
    return family(cfg.model_type).module_ref().name_table(cfg, architecture)


def normalize_names(tensors: dict, cfg) -> dict:
    """A family's old or headless checkpoint names, rewritten to the ones its table uses."""
    return family(cfg.model_type).module_ref().normalize_names(tensors, cfg)


def count_parameters(model) -> int:
    import jax
    from flax import nnx

    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
