"""The train state and the pure, jitted, mesh-sharded train and eval steps.

One call of `train_step` masks the global batch on device (per-example keys), runs the encoder,
sends only the prediction slots through the vocabulary head, and applies the optimizer update,
accumulating gradients over micro-batches with `lax.scan`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_bert.errors import InputError
from flax_bert.training import sharding
from flax_bert.models.config import ModelConfig
from flax_bert.training.masking import MaskedBatch, mask_tokens, num_prediction_slots
from flax_bert.models import model_class_for
from flax_bert.models import attention, partitioning

Batch = dict[str, jax.Array]


class NonFiniteLossError(InputError, FloatingPointError):
    """The loss became NaN or Inf."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array         # int32 scalar: optimizer updates done so far
    params: Any             # pure dict of parameters (Hugging Face module tree)
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """What the on-device masking needs to know about the tokenizer (static)."""

    special_ids: tuple[int, ...]
    mask_token_id: int
    random_vocab_size: int          # random replacements are drawn from [0, this) minus specials
    mlm_probability: float = 0.15
    max_seq_length: int = 128
    whole_word_masking: bool = False
    never_drawn_ids: tuple[int, ...] = ()  # nor these: added tokens, which are not ordinary vocabulary

    @property
    def num_slots(self) -> int:
        return num_prediction_slots(self.max_seq_length, self.mlm_probability, self.whole_word_masking)

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> "MaskingConfig":
        if tokenizer.mask_token_id is None:
            raise InputError("the tokenizer has no mask token; masked-LM pretraining needs one")
        special_ids = tuple(sorted(set(tokenizer.all_special_ids)))
        # added tokens (ModernBERT's [unused*], placeholders) are no ordinary vocabulary: never a random replacement
        added = tuple(sorted(set(getattr(tokenizer, "added_tokens_decoder", {})) - set(special_ids)))
        return cls(special_ids=special_ids, mask_token_id=tokenizer.mask_token_id, random_vocab_size=len(tokenizer),
                   never_drawn_ids=added, **kwargs)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    masking: MaskingConfig
    seed: int = 0
    objective: str = "mlm"                 # "mlm" | "mlm+nsp"
    gradient_accumulation_steps: int = 1
    eval_seed: int = 1234                   # fixed: eval masks are the same at every evaluation
    eval_masking: MaskingConfig | None = None  # evaluation's own mask rate (default: the training masking)


def train_state_layout(tx: optax.GradientTransformation, abstract_params, param_shardings, mesh: Mesh):
    """(shardings, abstract shapes) of a TrainState: the optimizer's moments lie as their parameters do."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: sharding.replicated(mesh))
    shardings = TrainState(step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt)
    return shardings, abstract


class Trainer:
    """Holds the static pieces (graph, optimizer, mesh, shardings) and the jitted steps. The steps trace under
    `partitioning.use_mesh(mesh)`: the models pin their activations to the batch axes (FSDP shards parameters,
    never activations). `--attention` is decided here for the mesh's platform, and logged."""

    def __init__(self, model_config: ModelConfig, step_config: StepConfig, tx: optax.GradientTransformation,
                 mesh: Mesh, schedule: Callable | None = None):
        platform = mesh.devices.flat[0].platform
        implementation, why = attention.resolve(model_config.attention, model_config, platform,
                                                step_config.masking.max_seq_length)
        logging.getLogger("flax_bert").info("attention: %s (%s)", implementation, why)
        model_config = model_config.replace(attention=implementation)
        self.model_config, self.step_config, self.tx, self.mesh = model_config, step_config, tx, mesh
        self.schedule = schedule
        model_class = model_class_for(model_config, step_config.objective)
        abstract_model = nnx.eval_shape(lambda: model_class(model_config, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
        abstract_params = abstract_params.to_pure_dict()
        param_shardings = sharding.param_shardings(abstract_model, abstract_params, mesh)
        self.state_shardings, self.abstract_state = train_state_layout(tx, abstract_params, param_shardings, mesh)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, None),
                                  out_shardings=(self.state_shardings, None), donate_argnums=(0,))
        self.eval_step = jax.jit(self._eval_step, in_shardings=(param_shardings, None))

    # ------------------------------------------------------------------ state
    def init_state(self, seed: int = 0, params: Any = None) -> TrainState:
        """Fresh (or given) parameters, created already sharded on the mesh."""
        model_class = model_class_for(self.model_config, self.step_config.objective)

        def init(params):
            if params is None:
                params = nnx.state(model_class(self.model_config, rngs=nnx.Rngs(seed)), nnx.Param).to_pure_dict()
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

        return jax.jit(init, out_shardings=self.state_shardings)(params)

    def fresh_opt_state(self, params, step: int):
        """A new optimizer state for `params` (moments at zero) whose learning-rate schedule goes on from
        `step` rather than warming up again: what --reset_optimizer puts in place of a saved one that does not fit."""
        is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)  # noqa: E731

        def init(params):
            return jax.tree.map(lambda node: node._replace(count=jnp.asarray(step, node.count.dtype))
                                if is_schedule(node) else node, self.tx.init(params), is_leaf=is_schedule)

        return jax.jit(init, out_shardings=self.state_shardings.opt_state)(params)

    def model(self, params):
        return nnx.merge(self.graphdef, params)

    # ------------------------------------------------------------------ steps
    def masking_key(self) -> jax.Array:
        """Training masks: example i at step s uses fold_in(fold_in(this key, s), i)."""
        return jax.random.fold_in(jax.random.key(self.step_config.seed), 0)

    def _mask(self, seed_key, step, batch: Batch, masking: MaskingConfig | None = None,
              row_ids=None) -> MaskedBatch:
        m = masking or self.step_config.masking
        return mask_tokens(seed_key, step, batch["input_ids"], example_index_B=row_ids, special_ids=m.special_ids,
                           mask_token_id=m.mask_token_id, random_vocab_size=m.random_vocab_size,
                           mlm_probability=m.mlm_probability, num_slots=m.num_slots,
                           word_starts_BxL=batch.get("word_starts"), whole_word_masking=m.whole_word_masking,
                           never_drawn_ids=m.never_drawn_ids)

    def _loss_sums(self, params, inputs: Batch, masked: MaskedBatch, dropout_key, mlm_count, nsp_count):
        """Sums over the (micro-)batch, pre-divided by the global counts so micro-batch grads add up."""
        out = self.model(params)(masked.input_ids, segment_ids=inputs["segment_ids"],
                                 token_type_ids=inputs.get("token_type_ids"),
                                 masked_positions=masked.positions, dropout_key=dropout_key)
        ce_BxP = optax.softmax_cross_entropy_with_integer_labels(out.logits, masked.labels)
        mlm_loss = jnp.sum(ce_BxP * masked.weights)
        correct = jnp.sum((jnp.argmax(out.logits, -1) == masked.labels) * masked.weights)
        sums = {"mlm_loss": mlm_loss, "mlm_correct": correct}
        loss = mlm_loss / mlm_count
        if self.step_config.objective == "mlm+nsp":
            nsp_labels, real = inputs["next_sentence_label"], _real_rows(inputs)  # empty filler rows excluded
            nsp_ce = optax.softmax_cross_entropy_with_integer_labels(out.seq_relationship_logits, nsp_labels)
            nsp_loss = jnp.sum(nsp_ce * real)
            sums["nsp_loss"] = nsp_loss
            sums["nsp_correct"] = jnp.sum((jnp.argmax(out.seq_relationship_logits, -1) == nsp_labels) * real)
            loss = loss + nsp_loss / nsp_count
        return loss, sums

    def _train_step(self, state: TrainState, batch: Batch):
        with partitioning.use_mesh(self.mesh):
            return self._train_step_on_mesh(state, batch)

    def _train_step_on_mesh(self, state: TrainState, batch: Batch):
        cfg = self.step_config
        masked = self._mask(self.masking_key(), state.step, batch)
        dropout_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 1), state.step)
        mlm_count = jnp.maximum(jnp.sum(masked.weights), 1.0)
        nsp_count = jnp.maximum(jnp.sum(_real_rows(batch)), 1.0)
        inputs = {k: v for k, v in batch.items() if k != "input_ids"}

        k = cfg.gradient_accumulation_steps
        grad_fn = jax.grad(self._loss_sums, has_aux=True)
        if k == 1:
            grads, sums = grad_fn(state.params, inputs, masked, dropout_key, mlm_count, nsp_count)
        else:
            micro = jax.tree.map(lambda x: _split_micro_batches(x, k, self.mesh), (inputs, masked))

            def accumulate(carry, xs):
                grads_acc, sums_acc = carry
                (micro_inputs, micro_masked), index = xs
                grads, sums = grad_fn(state.params, micro_inputs, micro_masked,
                                      jax.random.fold_in(dropout_key, index), mlm_count, nsp_count)
                return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                     jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro[0]),
                                                                    jax.tree.map(lambda x: x[0], micro[1]),
                                                                    dropout_key, mlm_count, nsp_count)[1]))
            (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums), (micro, jnp.arange(k)))

        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = self._metrics(sums, mlm_count, nsp_count)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if self.schedule is not None:
            metrics["learning_rate"] = self.schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    @staticmethod
    def _metrics(sums, mlm_count, nsp_count):
        metrics = {"loss": sums["mlm_loss"] / mlm_count, "mlm_accuracy": sums["mlm_correct"] / mlm_count,
                   "num_predictions": mlm_count}
        if "nsp_loss" in sums:
            metrics["nsp_loss"] = sums["nsp_loss"] / nsp_count
            metrics["nsp_accuracy"] = sums["nsp_correct"] / nsp_count
            metrics["loss"] = metrics["loss"] + metrics["nsp_loss"]
            metrics["mlm_loss"] = sums["mlm_loss"] / mlm_count
        return metrics

    def _eval_step(self, params, batch: Batch):
        """Sums for one eval batch. Each row's mask depends only on the eval seed and the row's identity in the
        validation set (batch["row_ids"]), never on the batch size, the device count or where in a batch it sits."""
        with partitioning.use_mesh(self.mesh):
            return self._eval_sums(params, batch)

    def _eval_sums(self, params, batch: Batch):
        masked = self._mask(jax.random.key(self.step_config.eval_seed), 0, batch, self.step_config.eval_masking,
                            row_ids=batch["row_ids"])
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "row_ids")}
        _, sums = self._loss_sums(params, inputs, masked, None, 1.0, 1.0)
        sums["mlm_count"] = jnp.sum(masked.weights)
        sums["rows"] = jnp.sum(_real_rows(batch))
        return sums


def _real_rows(batch: Batch) -> jax.Array:
    """1.0 for rows holding tokens, 0.0 for the empty rows that fill an epoch's last batch."""
    return jnp.any(batch["segment_ids"] > 0, axis=-1).astype(jnp.float32)


def _split_micro_batches(x: jax.Array, k: int, mesh: Mesh) -> jax.Array:
    """[k*b, ...] -> [k, b, ...] taking every k-th row, so each micro-batch spans all devices."""
    rows = x.shape[0]
    if rows % k:
        raise ValueError(f"batch of {rows} rows does not split into {k} micro-batches")
    x = jnp.swapaxes(x.reshape(rows // k, k, *x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))


def check_finite(metrics: dict, step: int) -> None:
    loss = float(metrics["loss"])
    if not jnp.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}: lower --learning_rate, raise --warmup_steps or use fp32 compute; "
            "the last checkpoint before it is intact")


def eval_summary(totals: dict) -> dict:
    """Aggregate eval sums into eval_loss, perplexity, eval_accuracy (and NSP metrics)."""
    import math

    count = max(totals["mlm_count"], 1.0)
    loss = totals["mlm_loss"] / count
    out = {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "eval_accuracy": totals["mlm_correct"] / count}
    if "nsp_loss" in totals:
        out["eval_nsp_loss"] = totals["nsp_loss"] / totals["rows"]
        out["eval_nsp_accuracy"] = totals["nsp_correct"] / totals["rows"]
    return out
