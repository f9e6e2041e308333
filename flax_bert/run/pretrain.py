"""The pretraining run: tokenizer, data, model, the train loop, evaluation, checkpoints, export.

`run_pretraining(RunConfig)` is what `run_mlm_flax.py` and `flax-bert train` call.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any

import jax
import numpy as np

from flax_bert.errors import InputError, InputFileNotFoundError
from flax_bert.run import checkpoint as ckpt_lib
from flax_bert import storage
from flax_bert.training import distributed
from flax_bert.training import host_allocator
from flax_bert.models.config import ModelConfig
from flax_bert.models.convert import load_hf
from flax_bert.data.pipeline import (DataArgs, Prefetcher, StreamingRows, build_datasets, check_tokenizer_fits,
                            make_global_batch, resolve_data_shards, validation_shards)
from flax_bert.data.streaming import states_of_every_process
from flax_bert.models import family, model_class_for
from flax_bert.training.metrics import MetricsWriter
from flax_bert.training.optim import make_optimizer
from flax_bert.training.peak_flops import device_peak_flops, peak_at_least, step_flops_per_token, total_peak_flops
from flax_bert.run.config import RunConfig, fresh_model_config, runtime_overrides
from flax_bert.training.sharding import BATCH_AXES, make_mesh
from flax_bert.training.step import MaskingConfig, NonFiniteLossError, StepConfig, Trainer, check_finite, eval_summary

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
    from transformers import AutoTokenizer

    source = run.tokenizer_name or run.model_name_or_path
    if source:
        try:
            return AutoTokenizer.from_pretrained(source, **tokenizer_options(run))
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
            _train_run_tokenizer(run, run_tokenizer)
        distributed.barrier("tokenizer")
        found = found or published() or run_tokenizer  # none visible here: the load below says so
    return AutoTokenizer.from_pretrained(str(storage.fetch_folder(found)))


def _train_run_tokenizer(run: RunConfig, run_tokenizer) -> None:
    from flax_bert.data.tokenizer_training import train_tokenizer_from_args

    kind = family(run.model_type or "roberta").tokenizer_kind
    log.info("no --tokenizer_name: training a %d-token %s tokenizer on the training data", run.tokenizer_vocab_size, kind)
    stage = storage.local_stage(run_tokenizer)  # the folder itself, or a local one uploaded to the URL
    train_tokenizer_from_args(data_args_from_run(run), kind=kind, vocab_size=run.tokenizer_vocab_size,
                              output_dir=stage, model_max_length=run.max_seq_length or 512)
    storage.publish(stage, run_tokenizer, last=("tokenizer_config.json",))


def resolve_model_config(run: RunConfig, tokenizer, start: ckpt_lib.StartPoint | None = None) -> ModelConfig:
    """The checkpoint's own model when continuing one; else --model_name_or_path / --config_name; else fresh."""
    if start is not None and start.kind == "checkpoint":
        from flax_bert.run.options import bundle_config

        stored = (bundle_config(start.path) or {}).get("model")
        if stored:
            return ModelConfig.from_hf_dict(stored, **runtime_overrides(run))
    if run.model_name_or_path or run.config_name:
        from flax_bert.models.convert import resolve_model_folder

        folder = resolve_model_folder(run.model_name_or_path or run.config_name, **hub_options(run))
        return ModelConfig.from_pretrained(folder, **runtime_overrides(run))
    ids = tokenizer_special_ids(tokenizer)
    cfg = fresh_model_config(run, len(tokenizer), ids)
    log.info("fresh %s model: %d layers, hidden %d, intermediate %d, dropout %g / attention dropout %g; special "
             "token ids from the tokenizer (%s)", cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size,
             cfg.intermediate_size, cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob,
             ", ".join(f"{k}={v}" for k, v in ids.items() if k in family(cfg.model_type).hf_fields))
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


# ----------------------------------------------------------------------------- the run
class Run:
    """Everything one pretraining run holds; `train()` and `evaluate()` do the work."""

    def __init__(self, run: RunConfig):
        distributed.initialize(run)
        self.mesh = make_mesh(run.mesh)  # first: a mesh that does not fit the devices fails before any work
        self.run = run
        self.is_main = jax.process_index() == 0
        if not self.is_main:  # logs come from process 0; the others speak only of problems
            log.setLevel(logging.WARNING)
        # Orbax (TensorStore) needs absolute paths; a URL stays a URL (flax_bert.storage)
        self.output_dir = storage.absolute(run.output_dir)
        self.start = ckpt_lib.resolve_start(run.output_dir, run.resume_from_checkpoint, run.model_name_or_path,
                                             overwrite_output_dir=run.overwrite_output_dir)
        if not run.do_train and self.start.kind == "fresh":
            raise InputFileNotFoundError(f"nothing to evaluate: {run.output_dir} holds no checkpoint; pass a run's "
                                    "--output_dir, --resume_from_checkpoint or --model_name_or_path")
        if self.is_main and run.do_train:  # evaluating alone writes nothing but eval_results.json
            ckpt_lib.check_output_dir(run.output_dir, run.overwrite_output_dir, run.to_dict(),
                                      resuming=self.start.kind == "checkpoint")
        distributed.barrier("output_dir")
        storage.makedirs(self.output_dir)
        for name in ("train_ref_file", "validation_ref_file"):
            if getattr(run, name):
                log.warning("--%s is ignored: the old run_mlm_flax.py accepted it without reading it either", name)
        start_dir = (storage.parent(storage.parent(self.start.path))
                     if self.start.kind == "checkpoint" and self.start.source != "output_dir" else None)
        self.tokenizer = resolve_tokenizer(run, self.output_dir, start_dir)
        self.model_config = resolve_model_config(run, self.tokenizer, self.start)
        unset = {}  # defaults that needed the tokenizer or the model: recorded as decided
        if run.max_seq_length is None:
            unset["max_seq_length"] = default_max_seq_length(self.tokenizer, self.model_config)
        if run.model_type is None:
            unset["model_type"] = self.model_config.model_type
            log.info("--model_type unset: %s (%s)", self.model_config.model_type,
                     "the model's" if self.start.kind != "fresh" or run.config_name else "a fresh model's default")
        if unset:
            self.run = run = dataclasses.replace(run, **unset)
            if self.is_main and run.do_train:
                ckpt_lib.record_run_config(self.output_dir, run.to_dict())  # with the defaults now decided
        check_tokenizer_fits(self.tokenizer, self.model_config.vocab_size, self.model_config.max_position_embeddings,
                             run.max_seq_length, self.model_config.model_type, self.model_config.pad_token_id)
        self.micro_batch = run.per_device_train_batch_size * jax.device_count()
        self.global_batch = self.micro_batch * run.gradient_accumulation_steps
        data_args = data_args_from_run(run)
        data_args.data_shards = resolve_data_shards(run.data_shards, jax.process_count(), self.global_batch)
        if not run.streaming and run.do_train:
            log.info("training data in %d logical shards, %d per process (pass --data_shards %d to keep the same "
                     "batches with another number of processes)", data_args.data_shards,
                     data_args.data_shards // jax.process_count(), data_args.data_shards)
        if not run.streaming:
            log.info("validation data in %d logical shards (for any batch size and --data_shards)",
                     validation_shards(jax.process_count()))
        self.train_rows, self.eval_rows = build_datasets(data_args, self.tokenizer, seed=run.seed,
                                                         splits=("train", "validation") if run.do_train else ("validation",))
        self.total_steps = self._total_steps() if run.do_train else 1
        tx, self.schedule = make_optimizer(
            learning_rate=run.learning_rate, warmup_steps=min(run.warmup_steps, self.total_steps - 1),
            total_steps=self.total_steps, schedule=run.lr_scheduler_type, optimizer=run.optimizer,
            b1=run.adam_beta1, b2=run.adam_beta2, eps=run.adam_epsilon, weight_decay=run.weight_decay,
            max_grad_norm=run.max_grad_norm or None, decay_fraction=run.wsd_decay_fraction)
        masking = MaskingConfig.from_tokenizer(self.tokenizer, mlm_probability=run.mlm_probability,
                                               max_seq_length=run.max_seq_length,
                                               whole_word_masking=run.whole_word_masking)
        step_config = StepConfig(masking=masking, seed=run.seed, objective=run.objective,
                                 gradient_accumulation_steps=run.gradient_accumulation_steps,
                                 eval_masking=eval_masking(masking, run))
        self.trainer = Trainer(self.model_config, step_config, tx, self.mesh, self.schedule)
        self.checkpoints = ckpt_lib.Checkpointer(self.output_dir, save_steps=run.save_steps,
                                                 save_minutes=run.save_minutes, save_total_limit=run.save_total_limit,
                                                 keep_best=run.keep_best) if run.do_train else None
        self.metrics = MetricsWriter(self.output_dir, enabled=self.is_main and run.do_train)

    def _total_steps(self) -> int:
        if self.run.max_steps > 0:
            return self.run.max_steps
        if isinstance(self.train_rows, StreamingRows):
            raise InputError("--streaming has no epoch length: set --max_steps")
        steps_per_epoch = math.ceil(distributed.process_sum(self.train_rows.local_rows) / self.global_batch)
        return max(1, math.ceil(self.run.num_train_epochs * steps_per_epoch))

    # ------------------------------------------------------------------ state
    def initial_state(self):
        """(train state, data-iterator state or None) following the resume order; logs which it took."""
        log.info("%s", self.start.describe())
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                self.trainer.abstract_state, self.trainer.state_shardings)
        if self.start.kind == "checkpoint":
            own = self.start.source == "output_dir"  # the writer may move a damaged checkpoint aside
            source = self.checkpoints if own else ckpt_lib.Checkpointer.for_path(storage.absolute(self.start.path))
            restored = source.restore(abstract, step=self.start.step, reset_optimizer=self.trainer.fresh_opt_state
                                      if self.run.reset_optimizer else None)
            state, data_state, _, step = restored
            log.info("restored step %d", step)
            if restored.optimizer_reset:
                log.warning("--reset_optimizer: the optimizer state of %s does not fit this run's optimizer; kept its "
                            "parameters, step %d and data position, started a fresh optimizer state (moments at zero, "
                            "learning-rate schedule at step %d)", restored.path, step, step)
            elif self.run.reset_optimizer:
                log.info("--reset_optimizer: the checkpoint's optimizer state fits this run's optimizer: kept")
            return state, data_state
        if self.start.kind == "hf":
            architecture = type(self.trainer.model(self.trainer.abstract_state.params)).__name__
            from flax_bert.models.convert import resolve_model_folder

            folder = resolve_model_folder(self.start.path, **hub_options(self.run))
            model = load_hf(folder, architecture=architecture, **runtime_overrides(self.run))
            from flax import nnx

            return self.trainer.init_state(params=nnx.state(model, nnx.Param).to_pure_dict()), None
        return self.trainer.init_state(seed=self.run.seed), None

    def evaluated_params(self):
        """(parameters, step) to evaluate without training: the start checkpoint's or model's weights only,
        read without the optimizer state and without writing anything."""
        if self.start.kind == "checkpoint":
            params, _, step = ckpt_lib.Checkpointer.for_path(storage.absolute(self.start.path)).restore_params()
            shardings = self.trainer.state_shardings.params
            return jax.tree.map(lambda value, sharding: jax.device_put(value, sharding), params, shardings), step
        return self.initial_state()[0].params, 0

    def _global(self, local_batch: dict) -> dict:
        return make_global_batch(local_batch, self.mesh, (BATCH_AXES,))

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        run = self.run
        state, data_state = self.initial_state()
        iterator = self.train_rows.iterator(self.global_batch, seed=run.seed)
        if data_state:
            iterator.load_state_dict(data_state)
        step = int(state.step)
        self.final_state = state
        if step >= self.total_steps:
            log.info("already at step %d of %d: nothing to train", step, self.total_steps)
            return {"step": step}
        log.info("%s", host_allocator.describe())  # set (or not) when the process started
        peak, peak_source = device_peak_flops(self.model_config.dtype)
        flops = step_flops_per_token(self.model_config, self.trainer.step_config.masking)
        log.info("training %s: %d steps, global batch %d x %d tokens on %d devices (mesh %s); peak %.3g FLOP/s/device (%s)",
                 self.model_config.model_type, self.total_steps, self.global_batch, run.max_seq_length,
                 jax.device_count(), dict(self.mesh.shape), peak, peak_source)
        progress = _progress_bar(self.is_main and run.progress_bar, step, self.total_steps)
        window = _Window()
        pending = None  # (step, metrics on device, local tokens): checked after the next step is dispatched
        bundle_config = self._bundle_config()  # the same every step: built once, outside the loop
        with ckpt_lib.PreemptionGuard() as guard, Prefetcher(iterator, transform=self._device_batch) as batches:
            compile_start = time.perf_counter()
            while step < self.total_steps:
                batch, tokens = next(batches)
                state, metrics = self.trainer.train_step(state, batch)
                step += 1
                if compile_start is not None:
                    jax.block_until_ready(metrics["loss"])
                    log.info("first step (compile included) took %.1f s", time.perf_counter() - compile_start)
                    self.metrics.write(step, {"compile_seconds": time.perf_counter() - compile_start})
                    compile_start = None
                    window.reset()
                if pending is not None:
                    window.add(*self._checked(pending))
                pending = (step, metrics, tokens, batches.last_wait_seconds)
                stopping = guard.should_stop(step)
                if step % run.logging_steps == 0 or step == self.total_steps or stopping or self._eval_due(step) \
                        or self.checkpoints.should_save(step):
                    window.add(*self._checked(pending))  # everything up to this step is verified finite
                    pending = None
                if step % run.logging_steps == 0 or step == self.total_steps:
                    peak = peak_at_least(peak, window.tokens_per_second() * flops, self.model_config.dtype)
                    record = window.summary(flops, total_peak_flops(peak))
                    self.metrics.write(step, record)
                    progress.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
                    log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in record.items()))
                    window.reset()
                progress.update(1)
                eval_results = None  # only the step that evaluated carries metrics (for --keep_best)
                if self._eval_due(step):
                    eval_start = time.perf_counter()
                    eval_results = self.evaluate(state.params, step) or None
                    window.start += time.perf_counter() - eval_start  # throughput counts training time only
                # the last step and a requested stop always save; otherwise --save_steps / --save_minutes decide
                data_state, force = batches.state_dict(), stopping or step == self.total_steps
                if isinstance(self.train_rows, StreamingRows) and (force or self.checkpoints.should_save(step)):
                    data_state = states_of_every_process(data_state)  # each process streams its own position
                self.checkpoints.save(step, state, data_state, bundle_config, metrics=eval_results, force=force)
                if stopping:
                    break
        progress.close()
        self.checkpoints.wait()
        if guard.stopped:  # agreed by every process, not only the one that got the signal
            log.info("stopped by a signal at step %d; checkpoint saved in %s — run the same command to resume",
                     step, self.checkpoints.directory)
            return {"step": step, "preempted": True}
        self.final_state = state
        return {"step": step}

    def _device_batch(self, local: dict) -> tuple[dict, int]:
        """In the prefetch thread, overlapping the running step: the global arrays and the non-pad tokens."""
        return self._global(local), int(np.count_nonzero(local["segment_ids"])) * jax.process_count()

    def _checked(self, pending):
        step, metrics, tokens, wait = pending
        metrics = jax.device_get(metrics)
        try:
            check_finite(metrics, step)
            # a finite loss with non-finite gradients still makes this step's update, and the checkpoint
            # saved from it, NaN: stop before that checkpoint is written
            grad_norm = float(metrics.get("grad_norm", 0.0))
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {step}: lower --learning_rate, raise "
                                         "--warmup_steps or use fp32 compute; the last checkpoint before it is intact")
        except NonFiniteLossError:
            self.checkpoints.wait()  # let the last good checkpoint finish writing before the run stops
            raise
        return metrics, tokens, wait

    def _eval_due(self, step: int) -> bool:
        # as the old script: --eval_steps evaluates while training; --do_eval adds the evaluation at the end
        return bool(self.eval_rows is not None and self.run.eval_steps
                    and step % self.run.eval_steps == 0 and step != self.total_steps)

    def _bundle_config(self) -> dict:
        architecture = model_class_for(self.model_config, self.run.objective).__name__
        return {"run": {**self.run.to_dict(), "device_count": jax.device_count()},
                "model": self.model_config.to_hf_dict(architecture)}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params, step: int) -> dict[str, float]:
        if self.eval_rows is None:
            log.warning("no evaluation data: pass --validation_file or --validation_split_percentage > 0")
            return {}
        batch_size = self.run.per_device_eval_batch_size * jax.device_count()
        totals: dict[str, float] = {}
        local_batches, index = self.eval_rows.eval_batches(batch_size), 0
        while True:  # processes may hold different numbers of eval rows: go on while any has some
            local = next(local_batches, None)
            if not distributed.any_process(local is not None):
                break
            if local is None:
                local = self.eval_rows.empty_batch(batch_size)
            sums = jax.device_get(self.trainer.eval_step(params, self._global(local), index))
            index += 1
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        if not totals:
            log.warning("the validation split has no rows: no evaluation")
            return {}
        results = eval_summary(totals)
        self.metrics.write(step, results)
        log.info("eval at step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in results.items()))
        return results


class _Window:
    """Metrics accumulated between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.values, self.tokens, self.wait, self.steps, self.start = {}, 0, 0.0, 0, time.perf_counter()
        self.cpu_start = time.process_time()  # this process's CPU seconds, all threads: host work + XLA:CPU

    def add(self, metrics, tokens, wait):
        for name, value in metrics.items():
            self.values[name] = self.values.get(name, 0.0) + float(value)
        self.tokens += tokens
        self.wait += wait
        self.steps += 1

    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def summary(self, flops_per_token: float, peak_flops: float) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        mean = {name: value / steps for name, value in self.values.items()}
        tokens_per_second = self.tokens / elapsed
        record = {"train_loss": mean.get("loss", float("nan")), "mlm_accuracy": mean.get("mlm_accuracy", float("nan")),
                  "learning_rate": mean.get("learning_rate", float("nan")), "grad_norm": mean.get("grad_norm", float("nan")),
                  "tokens_per_second": tokens_per_second, "mfu": tokens_per_second * flops_per_token / peak_flops,
                  "step_seconds": elapsed / steps, "input_wait_seconds": self.wait / steps,
                  "cpu_seconds_per_step": (time.process_time() - self.cpu_start) / steps}
        for name in ("nsp_loss", "nsp_accuracy", "mlm_loss"):
            if name in mean:
                record[name] = mean[name]
        return record


def _progress_bar(enabled: bool, initial: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def run_pretraining(run: RunConfig) -> dict[str, Any]:
    """Train and/or evaluate, then export the final model into --output_dir as a Hugging Face folder."""
    from flax_bert.run.export import export_run

    job = Run(run)
    results: dict[str, Any] = {}
    if run.do_train:
        results.update(job.train())
        if results.get("preempted"):
            return results
        params = job.final_state.params
    else:
        params, step = job.evaluated_params()
        results["step"] = step
        log.info("evaluating %s (step %d) only: no training, nothing written but eval_results.json",
                 job.start.path, step)
    if run.do_eval:
        eval_results = job.evaluate(params, results.get("step", 0))
        if eval_results and run.do_train:
            eval_results.update(_against_unigram_baseline(job, eval_results))
        if eval_results and job.is_main:
            record = {"step": results.get("step", 0), **eval_results}
            storage.write_atomic(storage.join(job.output_dir, "eval_results.json"), json.dumps(record, indent=2) + "\n")
        results.update(eval_results)
    if run.do_train:
        export_run(job, params, eval_results=results)
        job.checkpoints.close()
    job.metrics.close()
    return results


def _against_unigram_baseline(job: Run, eval_results: dict) -> dict:
    """Held-out masked accuracy beside always guessing the most frequent training token: whether it learned."""
    from flax_bert.training.eval_baseline import unigram_baseline

    if "eval_accuracy" not in eval_results:  # the same keys on every process: the collective below is skipped by all
        return {}
    baseline = unigram_baseline(job.train_rows, job.eval_rows, job.model_config.vocab_size,
                                job.trainer.step_config.masking.special_ids)
    if baseline is None:
        return {}
    token, accuracy = baseline
    log.info("held-out masked-token accuracy %.3f; always guessing the most frequent token %r would score %.3f",
             eval_results["eval_accuracy"], job.tokenizer.convert_ids_to_tokens(token), accuracy)
    return {"unigram_baseline_accuracy": accuracy}

