"""The encoder to fine-tune: a run directory (its exported model, else its latest checkpoint), an exported
folder or a Hugging Face folder, read as Hugging Face-named tensors with their config and tokenizer."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from flax_bert import storage
from flax_bert.errors import InputFileNotFoundError
from flax_bert.models.config import ModelConfig

log = logging.getLogger("flax_bert")


@dataclasses.dataclass
class SourceModel:
    config: ModelConfig
    tensors: dict[str, np.ndarray]   # Hugging Face names (normalized by the family)
    tokenizer: object
    description: str


def load_source(path: str) -> SourceModel:
    from flax_bert.models.convert import WEIGHT_FILES, read_hf_tensors

    if storage.isfile(storage.join(path, "config.json")) and any(
            storage.isfile(storage.join(path, name)) for name in WEIGHT_FILES):
        from transformers import AutoTokenizer

        folder = storage.fetch_folder(path)
        config = ModelConfig.from_pretrained(folder)
        return SourceModel(config, read_hf_tensors(folder, config), AutoTokenizer.from_pretrained(str(folder)),
                           f"the model folder {path}")
    if storage.isdir(storage.join(path, "checkpoints")):
        from flax_bert.models.convert import to_hf_tensors
        from flax_bert.run.directory import load_run_model

        model, tokenizer, _, step = load_run_model(path)
        return SourceModel(model.config, to_hf_tensors(model), tokenizer, f"step {step} of the run {path}")
    raise InputFileNotFoundError(f"{path} is neither a model folder (config.json and weights) nor a run directory "
                                 "(checkpoints/): pass what `flax-bert train` or `flax-bert export` wrote, or a "
                                 "Hugging Face folder")
