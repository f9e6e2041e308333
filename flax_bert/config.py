"""Model configuration, mapped one-to-one onto Hugging Face's `BertConfig` / `RobertaConfig`."""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from flax_bert.bad_input import InputFileNotFoundError

SUPPORTED_MODEL_TYPES = ("bert", "roberta")
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

# Fields that Hugging Face's config.json and ours share, with the same names and meanings.
_HF_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "bos_token_id",
    "eos_token_id",
)


class ConfigError(ValueError):
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
    # How the model runs; not part of the Hugging Face config.
    dtype: str = "float32"        # compute dtype: float32 | bfloat16 | float16
    param_dtype: str = "float32"  # parameters (and so optimizer state) stay fp32 by default
    scan_layers: bool = True      # lax.scan over the stacked layers: one layer to compile
    remat_policy: str = "none"    # rematerialize each layer in the backward pass

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}: flax-bert builds {' and '.join(SUPPORTED_MODEL_TYPES)} models")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; use one of {', '.join(SUPPORTED_ACTIVATIONS)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"unknown remat_policy {self.remat_policy!r}; use one of {', '.join(REMAT_POLICIES)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name} must be float32, bfloat16 or float16, not {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def first_position_id(self) -> int:
        """RoBERTa numbers positions from padding_idx + 1; BERT from 0."""
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

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
            raise ConfigError(
                f"config model_type {model_type!r} ({archs}) is not supported: flax-bert loads bert and roberta checkpoints")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(
                f"position_embedding_type {hf['position_embedding_type']!r} is not supported; only 'absolute' is")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ConfigError("decoder / cross-attention configs are not supported: flax-bert builds encoders")
        defaults = _family_defaults(model_type)
        values = {name: hf.get(name, defaults.get(name)) for name in _HF_FIELDS}
        values = {k: v for k, v in values.items() if v is not None or k in ("bos_token_id", "eos_token_id")}
        return cls(model_type=model_type, **values, **overrides)

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path, **overrides) -> "ModelConfig":
        file = pathlib.Path(path)
        if file.is_dir():
            file = file / "config.json"
        if not file.is_file():
            raise InputFileNotFoundError(f"no config.json at {file}: point to a Hugging Face model folder")
        return cls.from_hf_dict(json.loads(file.read_text()), **overrides)

    @classmethod
    def for_family(cls, model_type: str, **sizes) -> "ModelConfig":
        """The published base-size config of a family, with any field overridden."""
        return cls(**{**_family_defaults(model_type), "model_type": model_type, **sizes})

    def to_hf_dict(self, architecture: str | None = None) -> dict[str, Any]:
        if architecture is None:
            architecture = "RobertaForMaskedLM" if self.model_type == "roberta" else "BertForMaskedLM"
        hf = {name: getattr(self, name) for name in _HF_FIELDS}
        hf.update(model_type=self.model_type, architectures=[architecture],
                  position_embedding_type="absolute", tie_word_embeddings=True)
        return hf

    def to_hf_config(self, architecture: str | None = None):
        """A transformers `BertConfig` / `RobertaConfig`."""
        import transformers

        hf = self.to_hf_dict(architecture)
        config_class = transformers.RobertaConfig if self.model_type == "roberta" else transformers.BertConfig
        return config_class(**{k: v for k, v in hf.items() if k != "model_type"})


def _family_defaults(model_type: str) -> dict[str, Any]:
    common = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.1, initializer_range=0.02)
    if model_type == "roberta":
        return {**common, "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1,
                "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
    return {**common, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
            "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None}


def flops_per_token(cfg: "ModelConfig", seq_len: int, head_fraction: float) -> float:
    """Training FLOPs per token, the design notes' MFU formula (kept jax-free for the PyTorch benchmark):
    F = 6·N_enc + 12·L·s·d + ρ·(6·d·V + 6·d²), N_enc = L·(4d² + 2·d·f); ρ = `head_fraction`, the share of
    positions sent through the vocabulary head."""
    d, f, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    encoder_weights = layers * (4 * d * d + 2 * d * f)
    return 6 * encoder_weights + 12 * layers * seq_len * d + head_fraction * (6 * d * vocab + 6 * d * d)
