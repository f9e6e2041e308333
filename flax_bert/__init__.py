"""flax-bert: pretrain BERT, RoBERTa and ModernBERT masked-language models in JAX/Flax NNX."""
import importlib

# Imported on first use, so that the command-line entry points start without loading JAX (the train
# command may re-execute itself first: see host_allocator).
_EXPORTS = {"ModelConfig": "flax_bert.models.config", "load_hf": "flax_bert.models.convert", "save_hf": "flax_bert.models.convert",
            "RobertaForMaskedLM": "flax_bert.models.bert", "BertForMaskedLM": "flax_bert.models.bert",
            "BertForPreTraining": "flax_bert.models.bert", "ModernBertForMaskedLM": "flax_bert.models.modernbert",
            "create_model": "flax_bert.models"}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flax_bert' has no attribute {name!r}")
