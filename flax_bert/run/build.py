"""Building a pretraining run, one function per concern, in the order Run calls them: the processes and the
mesh, the output directory (where the run starts and whether it is this run's own), the tokenizer, the model
config and the defaults decided from it, the data, the step count, and the trainer (optimizer, masking, steps)."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import numpy as np

from flax_bert.errors import InputError, InputFileNotFoundError
from flax_bert.run import checkpoint as ckpt_lib
from flax_bert import storage
from flax_bert.training import distributed
from flax_bert.models.config import ModelConfig
from flax_bert.data.pipeline import (DataArgs, StreamingRows, build_datasets, check_tokenizer_fits,
                            resolve_data_shards, validation_shards)
from flax_bert.data.mixture import MixtureRows, build_mixture, parse_sources
from flax_bert.data.tokenizer_loading import load_tokenizer
from flax_bert.models import family, model_class_for
from flax_bert.training.optim import make_optimizer
from flax_bert.training.phases import BatchWarmup, Phase, PhaseError, TrainingPlan, make_plan, parse_phases
from flax_bert.run.config import RunConfig, fresh_model_config, model_overrides
from flax_bert.training.sharding import make_mesh
from flax_bert.training.step import MaskingConfig, StepConfig, Trainer

log = logging.getLogger("flax_bert")


def hub_options(run: RunConfig) -> dict[str, Any]:
    """What every download from the Hub takes: --token, --cache_dir (as the old script: downloads are cached
    there), and for tokenizers --trust_remote_code and --use_fast_tokenizer."""
    cache_dir = str(storage.mirror(run.cache_dir)) if storage.is_url(run.cache_dir) else run.cache_dir  # local
    return {"token": run.token, "cache_dir": cache_dir}


def tokenizer_options(run: RunConfig) -> dict[str, Any]:
    return {**hub_options(run), "trust_remote_code": run.trust_remote_code, "use_fast": run.use_fast_tokenizer}


def data_args_from_run(run: RunConfig) -> DataArgs:
    names = {f.name for f in dataclasses.fields(DataArgs)}
    return DataArgs(**{k: v for k, v in dataclasses.asdict(run).items() if k in names})


# ----------------------------------------------------------------------------- tokenizer and model
def resolve_tokenizer(run: RunConfig, output_dir, start_dir=None):
    """--tokenizer_name, else the model's own, else the run's (trained on its data on first start; never
    when only evaluating). `start_dir`: the run directory of a --resume_from_checkpoint checkpoint. Either
    directory may be a URL (flax_bert.storage): the tokenizer is read from a downloaded copy."""
    source = run.tokenizer_name or run.model_name_or_path
    if source:
        try:
            return load_tokenizer(source, **tokenizer_options(run))
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load a tokenizer from {source!r} ({type(err).__name__}): "
                             "pass --tokenizer_name with a local tokenizer folder") from None
    run_tokenizer = storage.join(output_dir, "tokenizer")
    candidates = [run_tokenizer] + ([storage.join(start_dir, "tokenizer")] if start_dir else [])

    def published():  # tokenizer_config.json, which says "the tokenizer is here", is written last
        return next((c for c in candidates if storage.isfile(storage.join(c, "tokenizer_config.json"))), None)

    found = published()
    if found is None and not run.do_train:
        raise InputFileNotFoundError(f"no tokenizer to evaluate with: {run_tokenizer} does not exist; pass --tokenizer_name")
    if run.do_train:
        # Process 0 trains one when it finds none, and every process takes this barrier whatever it found:
        # one that skipped it (having seen process 0's tokenizer appear) would pair its next collective with it.
        if found is None and jax.process_index() == 0:
            _train_run_tokenizer(run, output_dir, run_tokenizer)
        distributed.barrier("tokenizer")
        found = found or published() or run_tokenizer  # none visible here: the load below says so
    return load_tokenizer(str(storage.fetch_folder(found)))


def _train_run_tokenizer(run: RunConfig, output_dir, run_tokenizer) -> None:
    from flax_bert.data.tokenizer_training import train_tokenizer_from_args

    kind = family(run.model_type or "roberta").tokenizer_kind
    log.info("no --tokenizer_name: training a %d-token %s tokenizer on the training data", run.tokenizer_vocab_size, kind)
    ckpt_lib.claim_written(output_dir, "tokenizer")
    stage = storage.local_stage(run_tokenizer)  # the folder itself, or a local one uploaded to the URL
    data_args = data_args_from_run(run)
    if run.train_sources:  # every source's training text, one after the other
        data_args = [spec.data_args(data_args) for spec in parse_sources(run.train_sources)]
    train_tokenizer_from_args(data_args, kind=kind, vocab_size=run.tokenizer_vocab_size,
                              output_dir=stage, model_max_length=run.max_seq_length or 512)
    storage.publish(stage, run_tokenizer, last=("tokenizer_config.json",))


def resolve_model_config(run: RunConfig, tokenizer, start: ckpt_lib.StartPoint | None = None) -> ModelConfig:
    """The checkpoint's own model when continuing one; else --model_name_or_path / --config_name; else fresh.
    A continued model takes the run's dtype, scan, remat and dropout rates (model_overrides)."""
    if start is not None and start.kind == "checkpoint":
        from flax_bert.run.options import bundle_config

        stored = (bundle_config(start.path) or {}).get("model")
        if stored:
            return _log_continued(ModelConfig.from_hf_dict(stored, **model_overrides(run)), "the checkpoint's")
    if run.model_name_or_path or run.config_name:
        from flax_bert.models.convert import resolve_model_folder

        folder = resolve_model_folder(run.model_name_or_path or run.config_name, **hub_options(run))
        return _log_continued(ModelConfig.from_pretrained(folder, **model_overrides(run)), f"{folder}'s")
    ids = tokenizer_special_ids(tokenizer)
    cfg = fresh_model_config(run, len(tokenizer), ids)
    log.info("fresh %s model: %d layers, hidden %d, intermediate %d, dropout %g / attention dropout %g; special "
             "token ids from the tokenizer (%s)", cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size,
             cfg.intermediate_size, cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob,
             ", ".join(f"{k}={v}" for k, v in ids.items() if k in family(cfg.model_type).hf_fields))
    return cfg


def _log_continued(cfg: ModelConfig, whose: str) -> ModelConfig:
    log.info("%s %s model: dropout %g / attention dropout %g", whose, cfg.model_type, cfg.hidden_dropout_prob,
             cfg.attention_probs_dropout_prob)
    return cfg


def tokenizer_special_ids(tokenizer) -> dict[str, int | None]:
    """pad/bos/eos/cls/sep ids of the tokenizer, for a fresh model's config (not the family's defaults)."""
    return {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "bos", "eos", "cls", "sep")}


def eval_masking(train_masking: MaskingConfig, run: RunConfig) -> MaskingConfig | None:
    """The evaluation's masking when its rate differs from training's; logs the rate either way."""
    rate = run.eval_mlm_probability if run.eval_mlm_probability is not None else run.mlm_probability
    source = "--eval_mlm_probability" if run.eval_mlm_probability is not None else "the training rate, --mlm_probability"
    log.info("masking %.0f%% of tokens in training, %.0f%% in evaluation (%s)", 100 * run.mlm_probability, 100 * rate, source)
    if abs(rate - 0.15) > 1e-9 and run.do_eval:
        log.info("evaluation losses at %.0f%% masking are not comparable with published 15%% numbers "
                 "(pass --eval_mlm_probability 0.15 for those)", 100 * rate)
    return None if rate == train_masking.mlm_probability else dataclasses.replace(train_masking, mlm_probability=rate)


def default_max_seq_length(tokenizer, model_config: ModelConfig) -> int:
    """The old script's default: the tokenizer's model_max_length, here at most what the positions hold."""
    limit = getattr(tokenizer, "model_max_length", None) or model_config.max_sequence_length
    chosen = min(int(limit) if limit < 10**6 else model_config.max_sequence_length, model_config.max_sequence_length)
    log.info("--max_seq_length unset: %d (the tokenizer's model_max_length %s, the model's %d positions)",
             chosen, limit if limit < 10**6 else "unset", model_config.max_sequence_length)
    return chosen


# ----------------------------------------------------------------------------- building a run
def start_processes(run: RunConfig):
    """Join the other processes (several hosts) and build the mesh: a mesh that does not fit the devices fails
    before any work. Logs come from process 0; the others speak only of problems."""
    distributed.initialize(run)
    if run.downstream_eval and run.do_train and jax.process_count() > 1:  # finetune's loop reads its task whole
        raise InputError(f"--downstream_eval runs on one host, this run has {jax.process_count()} processes: drop "
                         "it, and score the exported model with `flax-bert finetune` on one host (docs/finetune.md)")
    mesh = make_mesh(run.mesh)
    if jax.process_index() != 0:
        log.setLevel(logging.WARNING)
    return mesh


def claim_output_dir(run: RunConfig, output_dir) -> ckpt_lib.StartPoint:
    """Where the run starts (resolve_start's order), and the output directory checked to be this run's own. The
    run's options are recorded later (record_options), once its inputs have opened: a start that fails on a
    misspelt file leaves nothing that would refuse the corrected command."""
    start = ckpt_lib.resolve_start(run.output_dir, run.resume_from_checkpoint, run.model_name_or_path,
                                   overwrite_output_dir=run.overwrite_output_dir)
    if not run.do_train and start.kind == "fresh":
        raise InputFileNotFoundError(f"nothing to evaluate: {run.output_dir} holds no checkpoint; pass a run's "
                                     "--output_dir, --resume_from_checkpoint or --model_name_or_path")
    if jax.process_index() == 0 and run.do_train:  # evaluating alone writes nothing but eval_results.json
        ckpt_lib.check_output_dir(run.output_dir, run.overwrite_output_dir, run.to_dict(),
                                  resuming=start.kind == "checkpoint", record=False)
    distributed.barrier("output_dir")
    storage.makedirs(output_dir)
    for name in ("train_ref_file", "validation_ref_file"):
        if getattr(run, name):
            log.warning("--%s is ignored: the old run_mlm_flax.py accepted it without reading it either", name)
    return start


def decide_model(run: RunConfig, tokenizer, start: ckpt_lib.StartPoint) -> tuple[RunConfig, ModelConfig]:
    """The model config, and the run's defaults that needed the tokenizer or the model (recorded as decided)."""
    model_config = resolve_model_config(run, tokenizer, start)
    unset = {}
    if run.max_seq_length is None:
        unset["max_seq_length"] = default_max_seq_length(tokenizer, model_config)
    if run.model_type is None:
        unset["model_type"] = model_config.model_type
        log.info("--model_type unset: %s (%s)", model_config.model_type,
                 "the model's" if start.kind != "fresh" or run.config_name else "a fresh model's default")
    if unset:
        run = dataclasses.replace(run, **unset)
    check_tokenizer_fits(tokenizer, model_config.vocab_size, model_config.max_position_embeddings,
                         run.max_seq_length, model_config.model_type, model_config.pad_token_id)
    return run, model_config


def decide_data_shards(run: RunConfig, global_batch: int) -> RunConfig:
    """The run with its logical shards of training data decided (recorded, so that a continuing run keeps them).
    Evaluating alone reads no training data: the training batch it inherits does not constrain anything."""
    if not run.do_train or run.streaming:
        return run
    return dataclasses.replace(run, data_shards=resolve_data_shards(run.data_shards, jax.process_count(), global_batch))


def record_options(run: RunConfig, output_dir) -> None:
    """OUTPUT_DIR/run_config.json with the defaults decided, once the inputs have opened (process 0, training)."""
    if jax.process_index() == 0 and run.do_train:
        ckpt_lib.record_run_config(output_dir, run.to_dict())


def build_data(run: RunConfig, tokenizer, global_batch: int):
    """(training rows or None, validation rows or None): tokenized, packed and split into logical shards."""
    data_args = data_args_from_run(run)
    requested = run.data_shards if run.do_train else None
    data_args.data_shards = resolve_data_shards(requested, jax.process_count(), global_batch)
    if not run.streaming and run.do_train:
        log.info("training data in %d logical shards, %d per process (pass --data_shards %d to keep the same "
                 "batches with another number of processes)", data_args.data_shards,
                 data_args.data_shards // jax.process_count(), data_args.data_shards)
    if not run.streaming:
        log.info("validation data in %d logical shards (for any batch size and --data_shards)",
                 validation_shards(jax.process_count()))
    splits = ("train", "validation") if run.do_train else ("validation",)
    if run.train_sources:
        return build_mixture(parse_sources(run.train_sources), data_args, tokenizer, seed=run.seed, splits=splits)
    return build_datasets(data_args, tokenizer, seed=run.seed, splits=splits)


def mixture_iterator(run: RunConfig, train_rows: MixtureRows, global_batch, seed: int):
    """The training batches of a mixture, its weights decided (given, or each source's size in tokens over all
    processes) and its sampling probabilities logged."""
    specs = parse_sources(run.train_sources)
    if specs[0].weight is None:
        local = train_rows.local_tokens()  # int64: a source may hold more than 2**31 tokens on one process
        totals = distributed.process_sum_array(np.array(list(local.values()), np.int64))
        weights = {name: float(total) for name, total in zip(local, totals)}
        how = "by size in tokens"
    else:
        weights, how = {spec.name: spec.weight for spec in specs}, "as given"
    iterator = train_rows.iterator(global_batch, seed=seed, weights=weights, temperature=run.mixture_temperature)
    probabilities = dict(zip(iterator.names, iterator.probabilities.tolist()))
    log.info("mixture of %d sources, weighted %s, temperature %g: %s", len(specs), how, run.mixture_temperature,
             ", ".join(f"{name} p={probabilities[name]:.4f} (weight {weights[name]:.6g})" for name in iterator.names))
    return iterator


def train_iterator(run: RunConfig, train_rows, global_batch, seed: int):
    """Endless training batches of the run's rows: one source's, or a mixture's (mixture_iterator). `global_batch`:
    rows per batch, or batch index -> rows (a batch-size warmup)."""
    if isinstance(train_rows, MixtureRows):
        return mixture_iterator(run, train_rows, global_batch, seed)
    return train_rows.iterator(global_batch, seed=seed)


def phase_iterator(run: RunConfig, plan: TrainingPlan, train_rows, step: int, data_state: dict | None):
    """The batches of the phase that trains `step`, from `step` on: its rows' iterator, begun where those rows were
    first read (batch b trains step start + b), positioned by `data_state` when it was saved on these rows. A stream
    re-packed for a new length reads on after the documents of the previous phase's position instead."""
    start = plan.rows_start(step)
    phase = plan.phase_at(step)
    seed = run.seed + (plan.phase_at(start).index if start else 0)  # rows re-packed for a new length: a new order
    sizes = plan.global_batch_at(step) if isinstance(train_rows, StreamingRows) else plan.batch_sizes(start)
    iterator = train_iterator(run, train_rows, sizes, seed)  # one source or a mixture
    if data_state and "trained" in data_state:  # saved before phases existed: one phase, one batch
        plan.check_continues(data_state["trained"], step)
    position = {k: v for k, v in (data_state or {}).items() if k not in ("phase", "trained")}
    if data_state and step > start:
        iterator.load_state_dict(position)
    elif data_state and step == start > 0 and isinstance(train_rows, StreamingRows):  # a stream at a new length
        iterator.continue_after(position)  # reads on after the documents the previous phase read
    if phase.mixture:  # before the prefetch thread makes any batch: the same in every run and resume
        probabilities = iterator.set_weights(phase.mixture)
        log.info("%s: mixture %s", phase.name, ", ".join(f"{k} p={v:.4f}" for k, v in probabilities.items()))
    return iterator


def count_total_steps(run: RunConfig, train_rows, global_batch: int) -> int:
    if run.max_steps > 0:
        return run.max_steps
    if isinstance(train_rows, StreamingRows):
        raise InputError("--streaming has no epoch length: set --max_steps")
    steps_per_epoch = math.ceil(distributed.process_sum(train_rows.local_rows) / global_batch)
    return max(1, math.ceil(run.num_train_epochs * steps_per_epoch))


# ----------------------------------------------------------------------------- phases and the batch-size warmup
def decide_phases(run: RunConfig, model_config: ModelConfig) -> list[Phase] | None:
    """The run's phases, checked against the model: a RoPE theta needs ModernBERT, a length the positions."""
    if not run.phases:
        return None
    phases = parse_phases(run.phases, max_seq_length=run.max_seq_length, mlm_probability=run.mlm_probability)
    for phase in phases:
        if phase.global_rope_theta is not None and model_config.model_type != "modernbert":
            raise PhaseError(f"phases[{phase.index}] sets global_rope_theta, which only ModernBERT has (this is a "
                             f"{model_config.model_type} model): drop it")
        if model_config.model_type != "modernbert" and phase.max_seq_length > model_config.max_sequence_length:
            raise PhaseError(f"phases[{phase.index}]: max_seq_length {phase.max_seq_length} exceeds the "
                             f"{model_config.max_sequence_length} positions of this {model_config.model_type} model "
                             "(a learned table): lower it, or start from a model with more max_position_embeddings")
    return phases


def phase_options(run: RunConfig, phase: Phase) -> RunConfig:
    """The run's options as a phase trains them: its row length, mask rate, per-device rows and accumulation steps
    (each the run's where the phase sets none). Evaluation keeps the run's one rate through every phase."""
    options = dict(max_seq_length=phase.max_seq_length, mlm_probability=phase.mlm_probability,
                   per_device_train_batch_size=phase.per_device_train_batch_size or run.per_device_train_batch_size,
                   gradient_accumulation_steps=phase.gradient_accumulation_steps or run.gradient_accumulation_steps)
    if run.eval_mlm_probability is None and phase.mlm_probability != run.mlm_probability:
        options["eval_mlm_probability"] = run.mlm_probability
    return dataclasses.replace(run, **options)


def phase_global_batch(run: RunConfig, phase: Phase) -> int:
    """Rows per step in a phase: its per-device rows and accumulation steps, else the run's."""
    options = phase_options(run, phase)
    return options.per_device_train_batch_size * jax.device_count() * options.gradient_accumulation_steps


def decide_batch_warmup(run: RunConfig, global_batch: int, phases: list[Phase] | None) -> BatchWarmup | None:
    """The batch-size warmup, in multiples of the data-parallel width (devices x gradient_accumulation_steps, of
    every phase): towards the first phase's global batch."""
    if not run.batch_size_warmup_tokens:
        return None
    steps = [run.gradient_accumulation_steps] + [p.gradient_accumulation_steps or 1 for p in phases or []]
    unit = jax.device_count() * math.lcm(*steps)
    full = phase_global_batch(run, phases[0]) if phases else global_batch
    return BatchWarmup.checked(run.batch_size_warmup_start, full, run.batch_size_warmup_tokens, unit)


def smallest_global_batch(run: RunConfig, phases: list[Phase] | None, warmup: BatchWarmup | None,
                          global_batch: int) -> int:
    """The fewest rows any step reads: every logical data shard must fill a row of each batch (--data_shards)."""
    if warmup is not None:
        return warmup.start_rows
    return min([global_batch] + [phase_global_batch(run, phase) for phase in phases or []])


def phase_model_config(model_config: ModelConfig, phase: Phase) -> ModelConfig:
    """The model a phase trains: its RoPE theta, and (ModernBERT, whose positions have no table) positions for
    its rows, which the exported config.json then states."""
    changes = {}
    if phase.global_rope_theta is not None:
        changes["global_rope_theta"] = phase.global_rope_theta
    if model_config.model_type == "modernbert" and phase.max_seq_length > model_config.max_position_embeddings:
        changes["max_position_embeddings"] = phase.max_seq_length
    return model_config.replace(**changes) if changes else model_config


def plan_training(run: RunConfig, phases: list[Phase] | None, warmup: BatchWarmup | None, global_batch: int,
                  train_rows=None) -> TrainingPlan:
    """Every step's phase and global batch. Without phases the run ends at --max_steps, else after
    --num_train_epochs of the training rows (counted in rows, so a batch-size warmup takes more steps)."""
    common = dict(max_seq_length=run.max_seq_length, mlm_probability=run.mlm_probability)
    if phases:  # they end the run themselves: no training rows needed
        return make_plan(phases, lambda phase: phase_global_batch(run, phase), warmup, **common)
    if not run.do_train:
        return make_plan(None, global_batch, None, total_steps=1, **common)
    if warmup is None or run.max_steps > 0:
        return make_plan(None, global_batch, warmup, total_steps=count_total_steps(run, train_rows, global_batch), **common)
    rows = math.ceil(run.num_train_epochs * distributed.process_sum(train_rows.local_rows))
    return make_plan(None, global_batch, warmup, total_tokens=rows * run.max_seq_length, **common)


def build_optimizer(run: RunConfig, plan: TrainingPlan):
    """(optax transformation, learning-rate schedule): the phases' schedule where they name one."""
    total_steps = plan.total_steps
    return make_optimizer(
        learning_rate=run.learning_rate, warmup_steps=min(run.warmup_steps, max(total_steps - 1, 0)),
        total_steps=total_steps, schedule=run.lr_scheduler_type, optimizer=run.optimizer,
        b1=run.adam_beta1, b2=run.adam_beta2, eps=run.adam_epsilon, weight_decay=run.weight_decay,
        max_grad_norm=run.max_grad_norm or None, decay_fraction=run.wsd_decay_fraction,
        schedule_fn=plan.learning_rate_schedule(run.learning_rate))


def build_trainer(run: RunConfig, model_config: ModelConfig, tokenizer, mesh, total_steps: int | None = None, *,
                  optimizer=None) -> Trainer:
    """The masking of training and evaluation and the jitted steps, with `optimizer` (tx, schedule) or one
    built for `total_steps`. `run` holds the phase's max_seq_length and mlm_probability."""
    if optimizer is None:
        optimizer = build_optimizer(run, make_plan(None, 1, None, total_steps=total_steps,
                                                   max_seq_length=run.max_seq_length, mlm_probability=run.mlm_probability))
    tx, schedule = optimizer
    masking = MaskingConfig.from_tokenizer(tokenizer, mlm_probability=run.mlm_probability,
                                           max_seq_length=run.max_seq_length, whole_word_masking=run.whole_word_masking)
    step_config = StepConfig(masking=masking, seed=run.seed, objective=run.objective,
                             gradient_accumulation_steps=run.gradient_accumulation_steps,
                             eval_masking=eval_masking(masking, run))
    return Trainer(model_config, step_config, tx, mesh, schedule)


def bundle_config(run: RunConfig, model_config: ModelConfig) -> dict:
    """What a checkpoint stores beside its arrays: the run's options and the model's Hugging Face config."""
    architecture = model_class_for(model_config, run.objective).__name__
    return {"run": {**run.to_dict(), "device_count": jax.device_count()},
            "model": model_config.to_hf_dict(architecture)}
