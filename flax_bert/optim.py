"""Optimizer: global-norm clipping -> AdamW or LAMB, a warmup+decay schedule, and a no-decay mask.

AdamW here matches ``torch.optim.AdamW`` (decoupled weight decay, eps added after the
bias-corrected square root), so hyperparameters carry over from PyTorch/Hugging Face recipes.
Gradient accumulation is done by the train step (scan over micro-batches), not here.
"""
from __future__ import annotations

from typing import Callable

import jax
import optax

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "lamb", "adafactor")
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


def make_schedule(*, learning_rate: float, warmup_steps: int, total_steps: int, schedule: str = "linear"):
    """Linear warmup from 0 to ``learning_rate``, then linear/cosine decay to 0 at total_steps
    (or constant). Same values as transformers' get_{linear,cosine,constant}_schedule_with_warmup."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule != "constant" and total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}) for a {schedule} "
            "schedule; lower warmup_steps or use schedule='constant'"
        )
    decay_steps = total_steps - warmup_steps
    if schedule == "linear":
        after_warmup = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    elif schedule == "cosine":
        after_warmup = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=0.0)
    else:
        after_warmup = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return after_warmup
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def _lamb(learning_rate, b1, b2, eps, weight_decay, mask) -> optax.GradientTransformation:
    """LAMB as in Google's BERT/NVIDIA's implementation: parameters exempt from weight decay are
    also exempt from the layer-wise trust ratio (optax.lamb would apply it to biases too, whose
    tiny norms make their updates vanish)."""
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask),
        optax.masked(optax.scale_by_trust_ratio(), mask),
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
) -> tuple[optax.GradientTransformation, Callable]:
    """Return (transformation, schedule_fn). Defaults are RoBERTa's (b2=0.98, eps=1e-6); pass
    b2=0.999 for BERT's. max_grad_norm None or 0 disables clipping."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if max_grad_norm is not None and max_grad_norm < 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None/0 to disable clipping), got {max_grad_norm}")
    schedule_fn = make_schedule(
        learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule
    )
    if optimizer == "adamw":
        update = optax.adamw(schedule_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    elif optimizer == "adafactor":  # as the old run_mlm_flax.py: optax's defaults, only the schedule given
        update = optax.adafactor(learning_rate=schedule_fn)
    else:
        update = _lamb(schedule_fn, b1, b2, eps, weight_decay, decay_mask)
    # Clip first, on the raw (accumulated) gradient, as torch's clip_grad_norm_ before step().
    if max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), update), schedule_fn
    return update, schedule_fn
