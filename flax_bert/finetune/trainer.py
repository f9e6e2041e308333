"""Fine-tune one seed: a sequence classifier on pretraining's mesh and sharding, optimizer (training.optim) and
train-state layout (training.step), with one jitted step reused by every seed and every learning rate."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flax_bert.data.iterators import make_global_batch
from flax_bert.finetune.data import Encoded, collate, length_batches
from flax_bert.models import classifier_class_for
from flax_bert.models.config import ModelConfig
from flax_bert.training import sharding
from flax_bert.training.optim import make_optimizer, make_schedule
from flax_bert.training.step import NonFiniteLossError, TrainState, train_state_layout

log = logging.getLogger("flax_bert")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One cell of a sweep."""

    learning_rate: float
    num_train_epochs: float
    weight_decay: float

    @property
    def name(self) -> str:
        return f"lr{self.learning_rate:g}_ep{self.num_train_epochs:g}_wd{self.weight_decay:g}"


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    batch_size: int              # global: per-device batch x devices
    max_seq_length: int
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class Optimizer:
    max_grad_norm: float | None = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6


class Compiled:
    """The jitted pieces for one classifier config on one mesh, shared by every trainer built for them (compiled
    once per process): the train step (one per weight decay, which the optimizer holds) takes the learning rate as
    an input, so seeds, learning rates and reruns share one compile."""

    def __init__(self, config: ModelConfig, task: str, mesh, optimizer: Optimizer):
        self.config, self.task, self.mesh, self.optimizer = config, task, mesh, optimizer
        self.model_class = classifier_class_for(config)
        abstract_model = nnx.eval_shape(lambda: self.model_class(config, rngs=nnx.Rngs(0)))
        self.graphdef, abstract = nnx.split(abstract_model, nnx.Param)
        self.abstract_params = abstract.to_pure_dict()
        self.param_shardings = sharding.param_shardings(abstract_model, self.abstract_params, mesh)
        self.predict = jax.jit(self._logits, in_shardings=(self.param_shardings, None))
        self._steps: dict[float, tuple] = {}

    def model(self, params):
        return nnx.merge(self.graphdef, params)

    def _logits(self, params, batch):
        return self.model(params)(batch["input_ids"], attention_mask=batch["attention_mask"],
                                  token_type_ids=batch["token_type_ids"]).logits

    def _loss(self, params, batch, dropout_key):
        logits = self.model(params)(batch["input_ids"], attention_mask=batch["attention_mask"],
                                    token_type_ids=batch["token_type_ids"], dropout_key=dropout_key).logits
        if self.task == "regression":
            per_row = (logits[:, 0] - batch["labels"]) ** 2
        else:
            per_row = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return jnp.sum(per_row * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    def steps(self, weight_decay: float):
        """(init, step) for `weight_decay`. The optimizer runs at learning rate 1 and the step scales its update by
        the scheduled rate it is given: AdamW's update, decay included, is linear in the learning rate."""
        if weight_decay not in self._steps:
            o = self.optimizer
            tx, _ = make_optimizer(learning_rate=1.0, warmup_steps=0, total_steps=1, schedule="constant",
                                   weight_decay=weight_decay, max_grad_norm=o.max_grad_norm, b1=o.adam_beta1,
                                   b2=o.adam_beta2, eps=o.adam_epsilon)
            shardings, _ = train_state_layout(tx, self.abstract_params, self.param_shardings, self.mesh)

            def step(state: TrainState, batch, learning_rate, dropout_key):
                loss, grads = jax.value_and_grad(self._loss)(state.params, batch, dropout_key)
                updates, opt_state = tx.update(grads, state.opt_state, state.params)
                updates = jax.tree.map(lambda u: learning_rate * u, updates)
                return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), loss

            jitted = jax.jit(step, in_shardings=(shardings, None, None, None), out_shardings=(shardings, None),
                             donate_argnums=(0,))
            init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), out_shardings=shardings)
            self._steps[weight_decay] = (init, jitted)
        return self._steps[weight_decay]


@functools.lru_cache(maxsize=4)
def compiled_for(config: ModelConfig, task: str, mesh, optimizer: Optimizer) -> Compiled:
    return Compiled(config, task, mesh, optimizer)


class ClassifierTrainer:
    """Fine-tunes and predicts with the compiled pieces of its config (`compiled_for`)."""

    def __init__(self, config: ModelConfig, task: str, mesh, options: LoopOptions, pad_token_id: int):
        self.config, self.task, self.mesh, self.options, self.pad_token_id = config, task, mesh, options, pad_token_id
        self.compiled = compiled_for(config, task, mesh, Optimizer(options.max_grad_norm, options.adam_beta1,
                                                                   options.adam_beta2, options.adam_epsilon))
        self.model_class = self.compiled.model_class
        self._told_fresh = False

    def initial_params(self, tensors: dict, seed: int, fresh_mismatched_heads: bool) -> dict:
        """The source encoder's weights; the head from the source where it has one, else fresh from `seed`."""
        from flax_bert.models.convert import assign_hf_tensors

        model = self.model_class(self.config, rngs=nnx.Rngs(seed))
        fresh = assign_hf_tensors(model, tensors, source="the model", fresh_mismatched_heads=fresh_mismatched_heads)
        if fresh and not self._told_fresh:
            self._told_fresh = True
            log.info("initialized from each seed: %s (the rest comes from the model)", ", ".join(sorted(fresh)))
        return nnx.state(model, nnx.Param).to_pure_dict()

    def model(self, params):
        return self.compiled.model(params)

    def fit(self, params: dict, data: Encoded, setting: Setting, seed: int, label: str = "") -> dict:
        """Train `params` on `data` for the setting's epochs with a linear warmup and decay; return the params."""
        o = self.options
        steps_per_epoch = math.ceil(len(data) / o.batch_size)
        total = max(1, math.ceil(setting.num_train_epochs * steps_per_epoch))
        warmup = min(math.ceil(o.warmup_ratio * total), total - 1)
        rates = np.asarray(make_schedule(learning_rate=setting.learning_rate, warmup_steps=warmup, total_steps=total,
                                         schedule="linear")(jnp.arange(total)), np.float32)
        init, step = self.compiled.steps(setting.weight_decay)
        state = init(params)
        rng, lengths = np.random.default_rng(seed), data.lengths
        epochs = (batch for _ in itertools.count() for batch in length_batches(lengths, o.batch_size, rng))
        progress = Progress(total, f"{label} seed {seed}", o.progress_bar)
        for index in range(total):
            batch = self._device_batch(collate(data, next(epochs), o.batch_size, self.pad_token_id, o.max_seq_length))
            key = jax.random.fold_in(jax.random.key(seed), index)
            state, loss = step(state, batch, rates[index], key)
            progress.update(index + 1, loss)
        final_loss = float(loss)
        progress.close(final_loss)
        if not math.isfinite(final_loss):
            raise NonFiniteLossError(f"the loss is {final_loss} after {total} steps ({label} seed {seed}): lower "
                                     "--learning_rate or use --dtype float32")
        return state.params

    # ------------------------------------------------------------------ prediction
    def outputs(self, params: dict, data: Encoded) -> np.ndarray:
        """Logits [examples, num_labels] in the examples' order."""
        o = self.options
        out = np.zeros((len(data), self.config.num_labels), np.float32)
        for indices in length_batches(data.lengths, o.batch_size):
            batch = self._device_batch(collate(data, indices, o.batch_size, self.pad_token_id, o.max_seq_length))
            out[indices] = np.asarray(self.compiled.predict(params, batch))[:len(indices)]
        return out

    def _device_batch(self, batch: dict) -> dict:
        return make_global_batch(batch, self.mesh, (sharding.BATCH_AXES,))


class Progress:
    """A tqdm bar on a terminal; elsewhere (logs, CI) a plain line every tenth of the steps."""

    def __init__(self, total: int, description: str, enabled: bool):
        self.total, self.description, self.start = total, description, time.time()
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=description, unit="step", dynamic_ncols=True, leave=False)
        self.every = max(1, total // 10)

    def update(self, done: int, loss) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if done % 10 == 0:
                self.bar.set_postfix(loss=f"{float(loss):.4f}")
        elif self.enabled and (done % self.every == 0) and done < self.total:
            log.info("%s: step %d/%d, loss %.4f (%.0f s)", self.description, done, self.total, float(loss),
                     time.time() - self.start)

    def close(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.close()
        log.info("%s: %d steps, final loss %.4f (%.0f s)", self.description, self.total, loss, time.time() - self.start)
