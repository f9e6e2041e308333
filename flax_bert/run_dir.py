"""A run directory as a model: its checkpoints' parameters with the run's tokenizer; and the reverse
(`flax-bert import`), a Hugging Face model turned into a run directory that training continues."""
from __future__ import annotations

import logging
import pathlib

from flax import nnx

log = logging.getLogger("flax_bert")


def load_run_tokenizer(run_dir: pathlib.Path, run: dict):
    from transformers import AutoTokenizer

    for source in (run_dir / "tokenizer", run.get("tokenizer_name"), run.get("model_name_or_path")):
        if source and (not isinstance(source, pathlib.Path) or (source / "tokenizer_config.json").is_file()):
            return AutoTokenizer.from_pretrained(str(source))
    raise FileNotFoundError(f"no tokenizer for the run {run_dir}: expected {run_dir}/tokenizer")


def load_run_model(run_dir, step: int | None = None):
    """(model, tokenizer, run config dict, step) from a run's checkpoint (the latest by default)."""
    from flax_bert.checkpoint import Checkpointer
    from flax_bert.config import ModelConfig
    from flax_bert.model import MODEL_CLASSES

    checkpointer = Checkpointer.for_path(run_dir)  # the run dir, its checkpoints/ or one checkpoints/STEP
    run_dir = pathlib.Path(str(checkpointer.output_dir))
    params, bundle, step = checkpointer.restore_params(step)
    hf_config = bundle["model"]
    cfg = ModelConfig.from_hf_dict(hf_config, scan_layers=True)
    model = MODEL_CLASSES[hf_config["architectures"][0]](cfg, rngs=nnx.Rngs(0))
    nnx.update(model, params)
    return model, load_run_tokenizer(run_dir, bundle["run"]), bundle["run"], step
