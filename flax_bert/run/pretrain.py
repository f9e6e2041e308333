"""The pretraining run as a short story: build it (flax_bert.run.build), restore or initialise its state, run the
train loop (each step's multi-host decisions taken in flax_bert.run.step_plan), evaluate, export.

`run_pretraining(RunConfig)` is what `run_mlm_flax.py` and `flax-bert train` call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from flax_bert import storage
from flax_bert.data.pipeline import Prefetcher, StreamingRows, make_global_batch
from flax_bert.data.streaming import states_of_every_process
from flax_bert.models.convert import load_hf
from flax_bert.run import checkpoint as ckpt_lib
from flax_bert.run import out_of_memory
from flax_bert.run.build import (build_data, build_optimizer, build_trainer, bundle_config, claim_output_dir,
                                 decide_batch_warmup, decide_data_shards, decide_model, decide_phases, hub_options,
                                 phase_iterator, phase_options, phase_model_config, plan_training, record_options,
                                 resolve_tokenizer, smallest_global_batch, start_processes)
from flax_bert.run.config import RunConfig, model_overrides
from flax_bert.run.evaluation import evaluate_rows
from flax_bert.run.export import push_revision
from flax_bert.run.progress import TrainLog, progress_bar
from flax_bert.run.step_plan import StepPlanner
from flax_bert.training import distributed
from flax_bert.training.metrics import MetricsWriter
from flax_bert.training.phases import Phase
from flax_bert.training.sharding import BATCH_AXES
from flax_bert.training.step import NonFiniteLossError, check_finite

log = logging.getLogger("flax_bert")


# ----------------------------------------------------------------------------- the run
class Run:
    """One pretraining run: built in order (processes and mesh, output directory, tokenizer, model, data,
    trainer, checkpoints); `train()` runs the loop, `evaluate()` scores the validation split."""

    def __init__(self, run: RunConfig, downstream: Callable | None = None):
        self.mesh = start_processes(run)
        self.is_main = jax.process_index() == 0
        self.output_dir = storage.absolute(run.output_dir)  # Orbax needs absolute paths; a URL stays a URL
        self.start = claim_output_dir(run, self.output_dir)
        start_dir = (storage.parent(storage.parent(self.start.path))
                     if self.start.kind == "checkpoint" and self.start.source != "output_dir" else None)
        self.tokenizer = resolve_tokenizer(run, self.output_dir, start_dir)
        self.run, self.base_model_config = decide_model(run, self.tokenizer, self.start)
        self.micro_batch = self.run.per_device_train_batch_size * jax.device_count()
        self.global_batch = self.micro_batch * self.run.gradient_accumulation_steps
        phases = decide_phases(self.run, self.base_model_config)
        warmup = decide_batch_warmup(self.run, self.global_batch, phases)
        self.smallest_batch = smallest_global_batch(self.run, phases, warmup, self.global_batch)
        self.run = decide_data_shards(self.run, self.smallest_batch)
        self._rows: dict[int, tuple] = {}  # max_seq_length -> (training rows, validation rows)
        plan = plan_training(self.run, phases, warmup, self.global_batch) if phases else None
        first = plan.phase_at(self.start.step).max_seq_length if plan else self.run.max_seq_length
        self.train_rows, self.eval_rows = self.rows_for(first)
        record_options(self.run, self.output_dir)  # the inputs opened: this is the run's directory now
        self.plan = plan or plan_training(self.run, None, warmup, self.global_batch, self.train_rows)
        self.total_steps = self.plan.total_steps
        self.optimizer = build_optimizer(self.run, self.plan)
        self.enter_phase(self.plan.phase_at(self.start.step), announce=False)
        if self.is_main and run.do_train:
            ckpt_lib.claim_written(self.output_dir, "metrics.jsonl", "tensorboard")
        self.checkpoints = ckpt_lib.Checkpointer(self.output_dir, save_steps=run.save_steps,
                                                 save_minutes=run.save_minutes, save_total_limit=run.save_total_limit,
                                                 keep_best=run.keep_best) if run.do_train else None
        self.metrics = MetricsWriter(self.output_dir, enabled=self.is_main and run.do_train)
        # downstream(model, tokenizer, mesh) -> {"downstream_METRIC": ...}: given by the command (finetune sits above run)
        self.downstream = downstream if run.downstream_eval else None
        self.planner = StepPlanner(self.run, self.plan, self.checkpoints, evaluates=self.eval_rows is not None,
                                   downstream=self.downstream is not None)
        self.last_evaluation: tuple[int, dict] | None = None  # (step, results) of the loop's latest evaluation

    def rows_for(self, max_seq_length: int) -> tuple:
        """(training rows, validation rows) packed at this length: built (or read from the cache) once."""
        if max_seq_length not in self._rows:
            run = dataclasses.replace(self.run, max_seq_length=max_seq_length)
            self._rows[max_seq_length] = build_data(run, self.tokenizer, self.smallest_batch)
        return self._rows[max_seq_length]

    def enter_phase(self, phase: Phase, announce: bool = True) -> None:
        """The model, rows and jitted steps of a phase (see flax_bert.training.phases)."""
        self.phase = phase
        if announce:
            log.info("entering %s", phase.describe())
        self.model_config = phase_model_config(self.base_model_config, phase)
        self.train_rows, self.eval_rows = self.rows_for(phase.max_seq_length)
        self.phase_run = phase_options(self.run, phase)
        self.trainer = build_trainer(self.phase_run, self.model_config, self.tokenizer, self.mesh,
                                     optimizer=self.optimizer)

    def _global(self, local_batch: dict) -> dict:
        return make_global_batch(local_batch, self.mesh, (BATCH_AXES,))

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        state, data_state = initial_state(self)
        step = int(state.step)
        self.final_state = state
        if step >= self.total_steps:
            log.info("already at step %d of %d: nothing to train", step, self.total_steps)
            return {"step": step}
        progress = progress_bar(self.is_main and self.run.progress_bar, step, self.total_steps)
        self.train_log = TrainLog(self.metrics, self.plan, progress)
        self.train_log.started(self.model_config, self.mesh, step, self.phase)
        with ckpt_lib.PreemptionGuard() as guard, self._finishing_saves():
            while step < self.total_steps and not guard.stopped:
                phase = self.plan.phase_at(step)
                if phase is not self.phase:
                    self.enter_phase(phase)
                try:
                    state, step, data_state = self._train_phase(state, step, data_state, guard)
                except Exception as error:
                    if not out_of_memory.is_out_of_memory(error):
                        raise
                    raise out_of_memory.train_step_error(
                        error, self.phase_run, jax.devices()[0].platform,
                        phase=self.phase if self.run.phases else None) from None
        progress.close()
        self.checkpoints.wait()
        if guard.stopped:  # agreed by every process, not only the one that got the signal
            log.info("stopped by a signal at step %d; checkpoint saved in %s — run the same command to resume",
                     step, self.checkpoints.directory)
            return {"step": step, "preempted": True}
        self.final_state = state
        return {"step": step}

    @contextlib.contextmanager
    def _finishing_saves(self):
        """When the loop raises (bad data, a diverging loss), the checkpoint being written in the background is
        finished before the error ends the process: none is left half-written."""
        try:
            yield
        except BaseException:
            try:
                self.checkpoints.wait()
            except Exception as error:  # the loop's own error is the one to report
                log.warning("the checkpoint being written when the run stopped failed too: %s", error)
            raise

    def _train_phase(self, state, step: int, data_state: dict | None, guard):
        """Steps of the current phase until it ends (or a stop); returns (state, step, data position): a next phase
        on the same rows reads on from there."""
        end = self.plan.phase_end(self.phase.index)
        self.train_log.enter(self.phase, self.model_config, self.trainer.step_config.masking)
        pending = None  # (step, metrics on device, tokens, wait): checked one step late
        bundle = bundle_config(self.run, self.model_config)  # built once per phase
        iterator = phase_iterator(self.run, self.plan, self.train_rows, step, data_state)
        with Prefetcher(iterator, transform=self._device_batch) as batches:
            compile_start = time.perf_counter()
            while step < end:
                batch, tokens = next(batches)
                state, metrics = self.trainer.train_step(state, batch)
                distributed.settle_before_host_collectives(metrics)  # the planner's decisions are collectives
                step += 1
                if compile_start is not None:
                    self.train_log.compiled(metrics, step, compile_start)
                    compile_start = None
                if pending is not None:
                    self.train_log.add(*checked_metrics(pending))
                pending = (step, metrics, tokens, batches.last_wait_seconds)
                plan = self.planner.decide(step, self.phase.index, guard)
                if plan.reads_metrics:
                    self.train_log.add(*checked_metrics(pending))  # all up to this step verified finite
                    pending = None
                if plan.log:
                    self.train_log.row(step, batches.state_dict())
                self.train_log.progress.update(1)
                with self.train_log.untimed():  # evaluation and fine-tuning are not counted in the throughput
                    eval_results = (self.evaluate(state.params, step) or None) if plan.evaluate else None
                    if eval_results:
                        self.last_evaluation = (step, eval_results)
                    if plan.downstream:
                        self._downstream(state.params, step)
                if plan.save:
                    self._save(step, state, batches.state_dict(), bundle, eval_results)
                if plan.hub_revision:
                    with self.train_log.untimed():  # nor is an upload
                        push_revision(self, state.params, step)
                if plan.stop:
                    break
            return state, step, batches.state_dict()

    def _downstream(self, params, step: int) -> None:
        """A copy of the model fine-tuned on the --downstream_eval task, its scores logged."""
        scores = self.downstream(self.trainer.model(params), self.tokenizer, self.mesh)
        self.metrics.write(step, scores)
        log.info("downstream at step %d (%s): %s", step, self.run.downstream_eval,
                 " ".join(f"{k}={v:.4g}" for k, v in scores.items()))

    def _save(self, step: int, state, data_state: dict, bundle: dict, eval_results) -> None:
        """Saves the step the planner decided to save (a collective when streaming: every process's position), with
        the phase it was trained in."""
        data_state = {**data_state, "phase": self.phase.index, "trained": self.plan.trained(step)}
        if isinstance(self.train_rows, StreamingRows):
            data_state = states_of_every_process(data_state)  # each process streams its own position
        self.checkpoints.save(step, state, data_state, bundle, metrics=eval_results, force=True)

    def _device_batch(self, local: dict) -> tuple[dict, int]:
        """In the prefetch thread, overlapping the running step: the global arrays and the non-pad tokens."""
        return self._global(local), int(np.count_nonzero(local["segment_ids"])) * jax.process_count()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params, step: int) -> dict[str, float]:
        batch_size = self.run.per_device_eval_batch_size * jax.device_count()
        try:
            results = evaluate_rows(self.trainer, params, self.eval_rows, batch_size, self._global)
        except Exception as error:
            if not out_of_memory.is_out_of_memory(error):
                raise
            raise out_of_memory.eval_step_error(error, self.phase_run, jax.devices()[0].platform) from None
        if results:
            self.metrics.write(step, results)
            log.info("eval at step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in results.items()))
        return results


# ----------------------------------------------------------------------------- the start state
def initial_state(job: Run):
    """(train state, data-iterator state or None) following the resume order; logs which it took."""
    log.info("%s", job.start.describe())
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            job.trainer.abstract_state, job.trainer.state_shardings)
    if job.start.kind == "checkpoint":
        own = job.start.source == "output_dir"  # the writer may move a damaged checkpoint aside
        source = job.checkpoints if own else ckpt_lib.Checkpointer.for_path(storage.absolute(job.start.path))
        restored = source.restore(abstract, step=job.start.step, reset_optimizer=job.trainer.fresh_opt_state
                                  if job.run.reset_optimizer else None)
        state, data_state, _, step = restored
        log.info("restored step %d", step)
        if restored.optimizer_reset:
            log.warning("--reset_optimizer: the optimizer state of %s does not fit this run's optimizer; kept its "
                        "parameters, step %d and data position, started a fresh optimizer state (moments at zero, "
                        "learning-rate schedule at step %d)", restored.path, step, step)
        elif job.run.reset_optimizer:
            log.info("--reset_optimizer: the checkpoint's optimizer state fits this run's optimizer: kept")
        return state, data_state
    if job.start.kind == "hf":
        architecture = type(job.trainer.model(job.trainer.abstract_state.params)).__name__
        from flax_bert.models.convert import resolve_model_folder

        folder = resolve_model_folder(job.start.path, **hub_options(job.run))
        model = load_hf(folder, architecture=architecture, **model_overrides(job.run))
        from flax import nnx

        return job.trainer.init_state(params=nnx.state(model, nnx.Param).to_pure_dict()), None
    return job.trainer.init_state(seed=job.run.seed), None

def evaluated_params(job: Run):
    """(parameters, step) to evaluate without training: the start checkpoint's or model's weights only,
    read without the optimizer state and without writing anything."""
    if job.start.kind == "checkpoint":
        params, _, step = ckpt_lib.Checkpointer.for_path(storage.absolute(job.start.path)).restore_params()
        shardings = job.trainer.state_shardings.params
        return jax.tree.map(lambda value, sharding: jax.device_put(value, sharding), params, shardings), step
    return initial_state(job)[0].params, 0


def checked_metrics(pending):
    """(metrics on the host, tokens, input wait) of a dispatched step, once they are known to be finite (the
    loop's error lets the last good checkpoint finish writing first: Run._finishing_saves)."""
    step, metrics, tokens, wait = pending
    metrics = jax.device_get(metrics)
    check_finite(metrics, step)
    # a finite loss with non-finite gradients still makes this step's update, and the checkpoint
    # saved from it, NaN: stop before that checkpoint is written
    grad_norm = float(metrics.get("grad_norm", 0.0))
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {step}: lower --learning_rate, raise "
                                 "--warmup_steps or use fp32 compute; the last checkpoint before it is intact")
    return metrics, tokens, wait


def run_pretraining(run: RunConfig, downstream: Callable | None = None) -> dict[str, Any]:
    """Train and/or evaluate, then export the final model into --output_dir as a Hugging Face folder.
    `downstream(model, tokenizer, mesh)`: the --downstream_eval score (the command passes finetune's)."""
    from flax_bert.run.export import export_run

    job = Run(run, downstream)
    results: dict[str, Any] = {}
    if run.do_train:
        results.update(job.train())
        if results.get("preempted"):
            return results
        params = job.final_state.params
    else:
        params, step = evaluated_params(job)
        results["step"] = step
        log.info("evaluating %s (step %d) only: no training, nothing written but eval_results.json",
                 job.start.path, step)
    if run.do_eval:
        step = results.get("step", 0)
        evaluated = job.last_evaluation  # the loop evaluated the last step already (--eval_steps): not twice
        eval_results = dict(evaluated[1]) if evaluated and evaluated[0] == step else job.evaluate(params, step)
        if eval_results:
            eval_results.update(_against_unigram_baseline(job, eval_results))
        if eval_results and job.is_main:
            record = {"step": results.get("step", 0), **eval_results}
            ckpt_lib.claim_written(job.output_dir, "eval_results.json")
            storage.write_atomic(storage.join(job.output_dir, "eval_results.json"), json.dumps(record, indent=2) + "\n")
        results.update(eval_results)
    if run.do_train:
        export_run(job, params, eval_results=results)
        job.checkpoints.close()
    job.metrics.close()
    return results


def _against_unigram_baseline(job: Run, eval_results: dict) -> dict:
    """Held-out masked accuracy beside always guessing the most frequent training token: whether it learned."""
    from flax_bert.training.eval_baseline import token_share, unigram_baseline

    if "eval_accuracy" not in eval_results:  # the same keys on every process: the collective below is skipped by all
        return {}
    special_ids = job.trainer.step_config.masking.special_ids
    if job.run.do_train:
        baseline = unigram_baseline(job.train_rows, job.eval_rows, job.model_config.vocab_size, special_ids)
    else:  # evaluating only: the training data is not read, its most frequent token is in the last eval_results.json
        token = _stored_baseline_token(job.output_dir)
        share = None if token is None else token_share(job.eval_rows, token, job.model_config.vocab_size, special_ids)
        baseline = None if share is None else (token, share)
    if baseline is None:
        return {}
    token, accuracy = baseline
    log.info("held-out masked-token accuracy %.3f; always guessing the most frequent token %r would score %.3f",
             eval_results["eval_accuracy"], job.tokenizer.decode([token]), accuracy)  # '\n', not 'Ċ'
    return {"unigram_baseline_accuracy": accuracy, "unigram_baseline_token": token}


def _stored_baseline_token(output_dir) -> int | None:
    """The most frequent training token a previous evaluation of this run recorded (None: none recorded)."""
    path = storage.join(output_dir, "eval_results.json")
    try:
        token = json.loads(storage.read_text(path)).get("unigram_baseline_token") if storage.isfile(path) else None
    except ValueError:
        return None
    return token if isinstance(token, int) else None

