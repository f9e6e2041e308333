"""Optimizer: global-norm clipping -> AdamW, LAMB or StableAdamW, a warmup+decay schedule, and a no-decay mask.

AdamW here matches ``torch.optim.AdamW`` (decoupled weight decay, eps added after the
bias-corrected square root), so hyperparameters carry over from PyTorch/Hugging Face recipes.
Gradient accumulation is done by the train step (scan over micro-batches), not here.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from flax_bert.errors import InputError

SCHEDULES = ("linear", "cosine", "constant", "wsd")
OPTIMIZERS = ("adamw", "lamb", "stableadamw", "adafactor")
DECAYED_NAMES = frozenset({"kernel", "embedding"})  # NNX Linear/Embed weights
# Path entries that belong to the NNX Variable wrapper (State leaves end in .value), not the name.
_VARIABLE_ATTRS = frozenset({"value", "raw_value"})


def _param_name(path) -> str | None:
    """The parameter's own name: the last string key, skipping the Variable's value attribute
    and integer keys (list indices, stacked layers)."""
    for key in reversed(path):
        if isinstance(key, jax.tree_util.GetAttrKey):
            if key.name in _VARIABLE_ATTRS:
                continue
            return key.name
        if isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
            return key.key
        # SequenceKey, integer DictKey, FlattenedIndexKey: an index, not a name.
    return None


def decay_mask(params):
    """Same-structure pytree of bools: True where weight decay applies.

    Decay only matrices and embeddings (last name ``kernel`` or ``embedding``); biases and
    LayerNorm scales/biases are exempt, as in Hugging Face's ("bias", "LayerNorm.weight") rule and
    Google's BERT. Deciding by name, not by rank, keeps the rule right for scanned layers whose
    LayerNorm scales are stacked into matrices. Works on an ``nnx.State`` or nested dicts.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _param_name(path) in DECAYED_NAMES, params)


def make_schedule(*, learning_rate: float, warmup_steps: int, total_steps: int, schedule: str = "linear",
                  decay_fraction: float = 0.1):
    """Linear warmup from 0 to ``learning_rate``, then linear/cosine decay to 0 at total_steps
    (or constant). Same values as transformers' get_{linear,cosine,constant}_schedule_with_warmup.
    ``wsd`` (warmup-stable-decay, ModernBERT's trapezoid): the peak until the last
    ``decay_fraction`` of total_steps, then 1 - sqrt decay to 0 at total_steps."""
    if schedule not in SCHEDULES:
        raise InputError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if learning_rate <= 0:
        raise InputError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise InputError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule != "constant" and total_steps <= warmup_steps:
        raise InputError(
            f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}) for a {schedule} "
            "schedule; lower warmup_steps or use schedule='constant'"
        )
    decay_steps = total_steps - warmup_steps
    if schedule == "linear":
        after_warmup = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    elif schedule == "cosine":
        after_warmup = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=0.0)
    elif schedule == "wsd":
        after_warmup = _stable_then_sqrt_decay(learning_rate, decay_steps, decay_fraction * total_steps)
    else:
        after_warmup = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return after_warmup
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def _stable_then_sqrt_decay(learning_rate: float, steps: int, decay_steps: float):
    """`steps` after the warmup: the peak, then over the last `decay_steps` (at most all of them) 1 - sqrt(progress)."""
    if not 0 < decay_steps:
        raise InputError(f"the wsd decay phase must be positive, got {decay_steps} steps")
    decay_steps = min(float(decay_steps), float(steps))
    decay_start = steps - decay_steps

    def schedule(count):
        progress = jnp.clip((count - decay_start) / decay_steps, 0.0, 1.0)
        return learning_rate * (1.0 - jnp.sqrt(progress))

    return schedule


def _stable_adamw(learning_rate, b1, b2, eps, weight_decay, mask) -> optax.GradientTransformation:
    """StableAdamW (Wortsman et al. 2023, as ModernBERT trains): AdamW whose step for each tensor is
    divided by max(1, RMS(g² / v̂)), Adafactor's update clipping, so a gradient spike far beyond the
    second-moment estimate cannot take a full step. For stacked layers the RMS is taken per layer slice
    (the leading axis of parameters under a `layer`/`layers` module), as for unstacked ones. The learning
    rate comes last, from optax.scale_by_learning_rate as in AdamW, so the schedule's step lives in the
    ScaleByScheduleState that --reset_optimizer carries on (Trainer.fresh_opt_state)."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return {"count": jnp.zeros((), jnp.int32), "mu": zeros, "nu": jax.tree.map(jnp.zeros_like, params)}

    def update(grads, state, params):
        count = state["count"] + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["mu"], grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["nu"], grads)
        c1, c2 = 1 - b1 ** count, 1 - b2 ** count

        def one(path, g, m, v, p, decay):
            v_hat = v / c2
            ratio = g * g / jnp.maximum(v_hat, eps * eps)
            axes = tuple(range(1, g.ndim)) if is_stacked_layer(path) and g.ndim > 1 else None
            rms = jnp.sqrt(jnp.mean(ratio, axis=axes, keepdims=axes is not None))
            step = (m / c1) / (jnp.sqrt(v_hat) + eps) + (weight_decay * p if decay else 0.0)
            return step / jnp.maximum(1.0, rms)

        updates = jax.tree_util.tree_map_with_path(one, grads, mu, nu, params, mask(params))
        return updates, {"count": count, "mu": mu, "nu": nu}

    return optax.chain(optax.GradientTransformation(init, update), optax.scale_by_learning_rate(learning_rate))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm as one scalar factor, min(1, max_norm / norm), multiplied into every gradient (as
    torch's clip_grad_norm_ does). optax selects t / norm * max_norm element by element, which XLA writes out as a
    clipped copy of each gradient before the moments read it: one more pass over every parameter's worth of
    memory. A product with a scalar fuses into its readers instead. The state is optax's (EmptyState)."""

    def update(updates, state, params=None):
        del params
        factor = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _path_names(path) -> list[str]:
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name not in _VARIABLE_ATTRS:
            names.append(key.name)
        elif isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
            names.append(key.key)
    return names


def is_stacked_layer(path) -> bool:
    """Whether a parameter belongs to the encoder's stacked layers (BERT/RoBERTa `encoder.layer.*`, ModernBERT
    `model.layers.*`, created with nnx.vmap), whose leading axis is the layer index (the "layers" logical
    axis), whatever its rank."""
    names = _path_names(path)
    return "layers" in names or any(a == "encoder" and b == "layer" for a, b in zip(names, names[1:]))


def scale_by_layerwise_trust_ratio() -> optax.GradientTransformation:
    """optax.scale_by_trust_ratio, with one ratio per layer for stacked encoder weights: LAMB's "layer" is a
    weight matrix of one transformer layer, so a [layers, ...] leaf gets the norms of each slice along its
    leading axis, and the update equals the one computed on the layers kept apart."""

    def scale(path, update, param):
        if update is None or isinstance(update, optax.MaskedNode):
            return update
        axes = tuple(range(1, param.ndim)) if is_stacked_layer(path) and param.ndim > 1 else None
        param_norm = optax.safe_norm(param, 0.0, axis=axes, keepdims=axes is not None)
        update_norm = optax.safe_norm(update, 0.0, axis=axes, keepdims=axes is not None)
        ratio = param_norm / update_norm
        return update * jnp.where((param_norm == 0.0) | (update_norm == 0.0), jnp.ones_like(ratio), ratio)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("the trust ratio needs the parameters: call update(updates, state, params)")
        return jax.tree_util.tree_map_with_path(scale, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _lamb(learning_rate, b1, b2, eps, weight_decay, mask) -> optax.GradientTransformation:
    """LAMB as in Google's BERT/NVIDIA's implementation: parameters exempt from weight decay are
    also exempt from the layer-wise trust ratio (optax.lamb would apply it to biases too, whose
    tiny norms make their updates vanish); the ratio is taken per layer of stacked weights."""
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask),
        optax.masked(scale_by_layerwise_trust_ratio(), mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def make_optimizer(
    *,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "linear",
    optimizer: str = "adamw",
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = 1.0,
    decay_fraction: float = 0.1,
    schedule_fn: Callable | None = None,
) -> tuple[optax.GradientTransformation, Callable]:
    """Return (transformation, schedule_fn). Defaults are RoBERTa's (b2=0.98, eps=1e-6); pass
    b2=0.999 for BERT's. max_grad_norm None or 0 disables clipping. `schedule_fn` (update count -> rate)
    replaces the schedule the other arguments describe (training phases bring their own)."""
    if optimizer not in OPTIMIZERS:
        raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if weight_decay < 0:
        raise InputError(f"weight_decay must be >= 0, got {weight_decay}")
    if max_grad_norm is not None and max_grad_norm < 0:
        raise InputError(f"max_grad_norm must be > 0 (or None/0 to disable clipping), got {max_grad_norm}")
    schedule_fn = schedule_fn or make_schedule(
        learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule,
        decay_fraction=decay_fraction,
    )
    if optimizer == "adamw":
        update = optax.adamw(schedule_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    elif optimizer == "stableadamw":
        update = _stable_adamw(schedule_fn, b1, b2, eps, weight_decay, decay_mask)
    elif optimizer == "adafactor":  # as the old run_mlm_flax.py: optax's defaults, only the schedule given
        update = optax.adafactor(learning_rate=schedule_fn)
    else:
        update = _lamb(schedule_fn, b1, b2, eps, weight_decay, decay_mask)
    # Clip first, on the raw (accumulated) gradient, as torch's clip_grad_norm_ before step().
    if max_grad_norm:
        return optax.chain(clip_by_global_norm(max_grad_norm), update), schedule_fn
    return update, schedule_fn
