"""flax-bert: pretrain BERT, RoBERTa and ModernBERT masked-language models in JAX/Flax NNX."""
from flax_bert.config import ModelConfig
from flax_bert.convert import load_hf, save_hf
from flax_bert.models import create_model
from flax_bert.models.bert import BertForMaskedLM, BertForPreTraining, RobertaForMaskedLM
from flax_bert.models.modernbert import ModernBertForMaskedLM

__all__ = ["ModelConfig", "load_hf", "save_hf", "RobertaForMaskedLM", "BertForMaskedLM", "BertForPreTraining",
           "ModernBertForMaskedLM", "create_model"]
__version__ = "0.1.0"
