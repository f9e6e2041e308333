"""A run directory as a model: its checkpoints' parameters with the run's tokenizer; and the reverse
(`flax-bert import`), a Hugging Face model turned into a run directory that training continues."""
from __future__ import annotations

import logging
import pathlib

from flax import nnx

from flax_bert import storage
from flax_bert.data.tokenizer_loading import load_tokenizer
from flax_bert.errors import InputFileNotFoundError

log = logging.getLogger("flax_bert")


def load_run_tokenizer(run_dir, run: dict):
    """The run's own tokenizer folder (run_dir may be a URL: read from a downloaded copy), else the one it named."""
    own = storage.join(run_dir, "tokenizer")
    if storage.isfile(storage.join(own, "tokenizer_config.json")):
        return load_tokenizer(str(storage.fetch_folder(own)))
    for source in (run.get("tokenizer_name"), run.get("model_name_or_path")):
        if source:
            return load_tokenizer(str(source))
    raise InputFileNotFoundError(f"no tokenizer for the run {run_dir}: expected {run_dir}/tokenizer")


def load_run_model(run_dir, step: int | None = None):
    """(model, tokenizer, run config dict, step) from a run's checkpoint (the latest by default)."""
    from flax_bert.run.checkpoint import Checkpointer
    from flax_bert.models.config import ModelConfig
    from flax_bert.models import all_architectures

    checkpointer = Checkpointer.for_path(storage.absolute(run_dir))  # the run dir, its checkpoints/ or one checkpoints/STEP
    found = str(checkpointer.output_dir)
    run_dir = found if storage.is_url(found) else pathlib.Path(found)
    params, bundle, step = checkpointer.restore_params(step)
    hf_config = bundle["model"]
    cfg = ModelConfig.from_hf_dict(hf_config, scan_layers=True)
    model = all_architectures()[hf_config["architectures"][0]](cfg, rngs=nnx.Rngs(0))
    nnx.update(model, params)
    return model, load_run_tokenizer(run_dir, bundle["run"]), bundle["run"], step


def import_hf_model(hf_folder, run_dir, optimizer: str = "adamw", max_grad_norm: float | None = None) -> pathlib.Path:
    """Write a run directory whose step-0 checkpoint holds `hf_folder`'s weights (and a fresh optimizer
    state), so `flax-bert train --output_dir RUN_DIR --model_name_or_path HF_FOLDER` continues pretraining it."""
    import jax
    from transformers import AutoTokenizer

    from flax_bert.run.checkpoint import Checkpointer, check_output_dir, claim_written
    from flax_bert.run.options import IMPORTED
    from flax_bert.models.convert import architecture_of, load_hf
    from flax_bert.training.optim import make_optimizer
    from flax_bert.run.config import RunConfig
    from flax_bert.training.sharding import make_mesh
    from flax_bert.training.step import MaskingConfig, StepConfig, Trainer

    model = load_hf(hf_folder)
    cfg, architecture = model.config, architecture_of(model)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder))
    objective = "mlm+nsp" if architecture == "BertForPreTraining" else "mlm"
    # the imported model's own sizes, so the run directory describes the model its checkpoint holds
    run = RunConfig(model_type=cfg.model_type, model_name_or_path=str(hf_folder), output_dir=str(run_dir),
                    objective=objective, optimizer=optimizer, max_grad_norm=max_grad_norm, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                    num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                    intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings)
    check_output_dir(run_dir, False, run.to_dict(), record=False)  # the train run records its own settings
    claim_written(run_dir, "tokenizer")
    stage = storage.local_stage(storage.join(run_dir, "tokenizer"))  # a URL: saved locally, then uploaded
    tokenizer.save_pretrained(str(stage))
    storage.publish(stage, storage.join(run_dir, "tokenizer"), last=("tokenizer_config.json",))
    # the optimizer state's structure (clipping or not) is the one the continuing run will build
    tx, schedule = make_optimizer(learning_rate=run.learning_rate, warmup_steps=0, total_steps=1, schedule="constant",
                                  max_grad_norm=max_grad_norm or None,
                                  optimizer=optimizer)
    trainer = Trainer(cfg, StepConfig(masking=MaskingConfig.from_tokenizer(tokenizer), objective=objective), tx,
                      make_mesh("data=1", jax.devices()[:1]), schedule)
    state = trainer.init_state(params=nnx.state(model, nnx.Param).to_pure_dict())
    with Checkpointer(storage.absolute(run_dir), save_steps=0) as checkpoints:
        # only what the import decides: its first training run decides the data, rows and masks
        decided = {name: value for name, value in run.to_dict().items() if name in IMPORTED}
        checkpoints.save(0, state, {}, {"run": decided, "model": cfg.to_hf_dict(architecture)}, force=True)
        checkpoints.wait()
    return storage.join(str(checkpoints.directory), "0")
