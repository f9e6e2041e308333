"""flax-bert: pretrain BERT and RoBERTa masked-language models in JAX/Flax NNX."""
from flax_bert.config import ModelConfig
from flax_bert.convert import load_hf, save_hf
from flax_bert.model import BertForMaskedLM, BertForPreTraining, RobertaForMaskedLM, create_model

__all__ = ["ModelConfig", "load_hf", "save_hf", "RobertaForMaskedLM", "BertForMaskedLM", "BertForPreTraining",
           "create_model"]
__version__ = "0.1.0"
