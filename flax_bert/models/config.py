"""Model configuration, mapped onto each family's Hugging Face config (`BertConfig`, `RobertaConfig`,
`ModernBertConfig`) through the field table of its registry entry (`flax_bert.models`)."""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from flax_bert.errors import InputError, InputFileNotFoundError
from flax_bert.models import FAMILIES, family, global_every

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
PROBLEM_TYPES = (None, "single_label_classification", "regression")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")  # models.attention.IMPLEMENTATIONS, without JAX


class ConfigError(InputError):
    """A model configuration that this project cannot build."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (Hugging Face names) plus how we run it (dtype, scan, remat).

    Defaults are RoBERTa-base's, except the vocabulary, which follows the tokenizer.
    """

    model_type: str = "roberta"
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    # ModernBERT (transformers' ModernBertConfig names, where they differ see the registry's field table)
    layer_types: tuple[str, ...] | None = None  # "full_attention" | "sliding_attention" per layer
    local_attention: int = 128            # the whole sliding window: a token sees local_attention // 2 each side
    global_rope_theta: float = 160000.0   # rotary base of the global (full) attention layers
    local_rope_theta: float = 10000.0     # rotary base of the sliding-window layers
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    decoder_bias: bool = True
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    embedding_dropout: float = 0.0
    initializer_cutoff_factor: float = 2.0
    classifier_pooling: str = "cls"       # ModernBERT's sequence classifier: "cls" | "mean" over the attention mask
    # Sequence classification (any family): transformers' id2label (one name per output), problem_type, dropout
    id2label: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    problem_type: str | None = None       # None | "single_label_classification" | "regression"
    classifier_dropout: float | None = None  # BERT/RoBERTa: None = hidden_dropout_prob; ModernBERT: 0.0
    # How the model runs; not part of the Hugging Face config.
    dtype: str = "float32"        # compute dtype: float32 | bfloat16 | float16
    param_dtype: str = "float32"  # parameters (and so optimizer state) stay fp32 by default
    scan_layers: bool = True      # lax.scan over the stacked layers: one layer to compile
    remat_policy: str = "none"    # rematerialize each layer in the backward pass
    attention: str = "auto"       # auto | xla | splash | cudnn (flax_bert.models.attention)

    def __post_init__(self):
        _check_and_complete(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def first_position_id(self) -> int:
        """RoBERTa numbers positions from padding_idx + 1; BERT and ModernBERT from 0."""
        return self.pad_token_id + 1 if family(self.model_type).positions_after_padding else 0

    @property
    def max_sequence_length(self) -> int:
        """The longest row the position table can hold."""
        return self.max_position_embeddings - self.first_position_id

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----- Hugging Face config.json, both ways -----
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(hf.get("architectures") or []) or "unknown architecture"
            raise ConfigError(f"config model_type {model_type!r} ({archs}) is not supported: flax-bert loads "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(
                f"position_embedding_type {hf['position_embedding_type']!r} is not supported; only 'absolute' is")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ConfigError("decoder / cross-attention configs are not supported: flax-bert builds encoders")
        fam = family(model_type)
        values = {ours: hf.get(theirs, fam.defaults.get(ours)) for ours, theirs in fam.hf_fields.items()}
        values = {k: v for k, v in values.items() if v is not None or k.endswith("_token_id") and k != "pad_token_id"}
        if fam.hf_extra_read is not None:
            try:
                values.update(fam.hf_extra_read(hf))
            except ValueError as err:
                raise ConfigError(str(err)) from None
        fixed = {k: v for k, v in fam.defaults.items() if k not in fam.hf_fields}  # not in this family's config.json
        values.update(_classifier_fields(hf))
        return cls(model_type=model_type, **{**fixed, **values, **overrides})

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path, **overrides) -> "ModelConfig":
        file = pathlib.Path(path)
        if file.is_dir():
            file = file / "config.json"
        if not file.is_file():
            raise InputFileNotFoundError(f"no config.json at {file}: point to a Hugging Face model folder")
        return cls.from_hf_dict(read_config_json(file), **overrides)

    @classmethod
    def for_family(cls, model_type: str, **sizes) -> "ModelConfig":
        """The published base-size config of a family, with any field overridden."""
        return cls(**{**family(model_type).defaults, "model_type": model_type, **sizes})

    def to_hf_dict(self, architecture: str | None = None) -> dict[str, Any]:
        fam = family(self.model_type)
        hf = {theirs: getattr(self, ours) for ours, theirs in fam.hf_fields.items()}
        hf.update(fam.hf_static)
        if fam.hf_extra_write is not None:
            hf.update(fam.hf_extra_write(self))
        hf.update(model_type=self.model_type, architectures=[architecture or fam.architectures[0]],
                  tie_word_embeddings=True)
        if architecture is not None and architecture == fam.classifier_architecture:
            hf.update(id2label={str(i): name for i, name in enumerate(self.id2label)},
                      label2id={name: i for i, name in enumerate(self.id2label)}, problem_type=self.problem_type)
        return hf

    def to_hf_config(self, architecture: str | None = None):
        """The family's transformers config object (`BertConfig`, `RobertaConfig`, `ModernBertConfig`)."""
        import transformers

        hf = self.to_hf_dict(architecture)
        return transformers.AutoConfig.for_model(**hf)


def _check_and_complete(cfg: ModelConfig) -> None:
    """Refuses a configuration that cannot be built, in one line; fills in what follows from the rest (the
    fields are frozen, hence object.__setattr__)."""
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unsupported model_type {cfg.model_type!r}: flax-bert builds {', '.join(SUPPORTED_MODEL_TYPES)} models")
    if cfg.model_type == "modernbert":
        _check_modernbert(cfg)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(
            f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}")
    if cfg.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"unsupported hidden_act {cfg.hidden_act!r}; use one of {', '.join(SUPPORTED_ACTIVATIONS)}")
    if cfg.remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"unknown remat_policy {cfg.remat_policy!r}; use one of {', '.join(REMAT_POLICIES)}")
    if cfg.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"unknown attention {cfg.attention!r}; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    for name in ("dtype", "param_dtype"):
        if getattr(cfg, name) not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{name} must be float32, bfloat16 or float16, not {getattr(cfg, name)!r}")
    object.__setattr__(cfg, "id2label", tuple(cfg.id2label))
    if not cfg.id2label:
        raise ConfigError("id2label is empty: a classifier needs at least one output")
    if cfg.problem_type not in PROBLEM_TYPES:
        raise ConfigError(f"problem_type {cfg.problem_type!r} is not supported; use one of "
                          f"{', '.join(str(p) for p in PROBLEM_TYPES)}")
    if cfg.classifier_pooling not in ("cls", "mean"):
        raise ConfigError(f"classifier_pooling must be 'cls' or 'mean', not {cfg.classifier_pooling!r}")


def _check_modernbert(cfg: ModelConfig) -> None:
    if cfg.layer_types is None:  # transformers' default: every third layer global, from layer 0
        object.__setattr__(cfg, "layer_types", global_every(cfg.num_hidden_layers))
    object.__setattr__(cfg, "layer_types", tuple(cfg.layer_types))
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        raise ConfigError(f"layer_types has {len(cfg.layer_types)} entries for {cfg.num_hidden_layers} layers")
    unknown = set(cfg.layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ConfigError(f"layer_types {sorted(unknown)} unknown; use full_attention or sliding_attention")
    if cfg.local_attention < 2 or cfg.local_attention % 2:
        raise ConfigError(f"local_attention must be an even window of at least 2 tokens, not {cfg.local_attention}")
    if cfg.head_dim % 2:
        raise ConfigError(f"rotary positions need an even head size; hidden_size/num_attention_heads = {cfg.head_dim}")
    if cfg.classifier_activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"unsupported classifier_activation {cfg.classifier_activation!r}")
    if cfg.classifier_dropout is None:  # ModernBertConfig's default; it has no fallback to another rate
        object.__setattr__(cfg, "classifier_dropout", 0.0)


def _classifier_fields(hf: dict) -> dict:
    """transformers' id2label (string keys in config.json) and problem_type, common to every family."""
    values = {}
    if hf.get("id2label"):
        values["id2label"] = tuple(hf["id2label"][key] for key in sorted(hf["id2label"], key=int))
    elif hf.get("num_labels"):
        values["id2label"] = tuple(f"LABEL_{i}" for i in range(int(hf["num_labels"])))
    if hf.get("problem_type") is not None:
        values["problem_type"] = hf["problem_type"]
    return values


def flops_per_token(cfg: "ModelConfig", seq_len: int, head_fraction: float) -> float:
    """Training FLOPs per token, the design notes' MFU formula (kept jax-free for the PyTorch benchmark):
    F = 6·N_enc + 12·s·d·L + ρ·(6·d·V + 6·d²), N_enc = L·(4d² + 2·d·f); ρ = `head_fraction`, the share of
    positions sent through the vocabulary head. ModernBERT's GLU has three d·f matrices (N_enc = L·(4d² + 3·d·f)),
    and a sliding-window layer's scores and values cost 12·min(s, w + 1)·d: a token sees only w + 1 keys."""
    d, f, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    ffn_matrices = 3 if cfg.model_type == "modernbert" else 2
    encoder_weights = layers * (4 * d * d + ffn_matrices * d * f)
    if cfg.model_type == "modernbert":
        local = sum(kind == "sliding_attention" for kind in cfg.layer_types)
        attended = (layers - local) * seq_len + local * min(seq_len, cfg.local_attention + 1)
    else:
        attended = layers * seq_len
    return 6 * encoder_weights + 12 * attended * d + head_fraction * (6 * d * vocab + 6 * d * d)


def read_config_json(file: pathlib.Path) -> dict[str, Any]:
    """A model folder's config.json; a file that is not a JSON object is one line naming the file, line and problem."""
    try:
        values = json.loads(pathlib.Path(file).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}); fix the file or "
                          "export the model again") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not a UTF-8 text file; a model folder's config.json is JSON text") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{file}: holds {type(values).__name__}, not a JSON object of config fields")
    return values
