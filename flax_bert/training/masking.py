"""On-device dynamic masking for masked-LM pretraining (pure jnp, runs inside the jitted step).

Each example draws its randomness from its own key,
``fold_in(fold_in(seed_key, step), global_example_index)``, so the masks depend only on
(seed, step, example) and not on how the batch is split across devices, hosts or micro-batches,
nor on whether the run was resumed.

Selection follows the BERT reference (``create_pretraining_data.py``): exactly
``round(mlm_probability * n)`` units per row (at least one when the row has any), where a unit is
a maskable token, or with whole-word masking a maskable word, chosen uniformly without
replacement. Of the selected units 80% become the mask token, 10% a random token of the ordinary
vocabulary (neither special nor added, such as ModernBERT's ``[unused*]``), 10% stay unchanged. The selected token positions are gathered into a fixed budget of
``num_slots`` prediction slots so the vocabulary head only runs on them (static shapes).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from flax_bert.errors import InputError

MASK_FRACTION = 0.8  # of the selected units, replaced by the mask token
RANDOM_FRACTION = 0.1  # replaced by a random non-special token; the remaining 10% are kept


class MaskedBatch(NamedTuple):
    """What the MLM loss consumes. Unused slots point at position 0 with weight 0 and label 0."""

    input_ids: jax.Array  # int32 [B, L] corrupted ids fed to the encoder
    positions: jax.Array  # int32 [B, P] positions of the selected tokens, ascending, then 0s
    labels: jax.Array  # int32 [B, P] original ids at those positions
    weights: jax.Array  # float32 [B, P] 1.0 for real slots, 0.0 for unused ones


def num_prediction_slots(max_seq_length: int, mlm_probability: float, whole_word_masking: bool = False) -> int:
    """Static number of prediction slots per row.

    Token masking selects at most round(p * n_maskable) <= ceil(p * L) tokens, so ceil(p * L)
    rounded up to a multiple of 8 (friendly to TPU/GPU tiling) never drops anything.

    Whole-word masking selects round(p * n_words) words; the number of tokens they cover has
    mean p * n_maskable_tokens (words are drawn uniformly, so long and short words average out)
    but varies from row to row. We allow 20% plus 8 tokens of headroom, i.e.
    ceil(1.2 * p * L) + 8, rounded up to a multiple of 8. For L=128, p=0.15 that is 32 slots
    (mean 19, standard deviation about 3); for L=512, 104 (mean 77, sd about 6-8). Words
    that still do not fit are dropped whole (see ``mask_tokens``), which is rare at this size.
    """
    if max_seq_length < 1:
        raise InputError(f"max_seq_length must be >= 1, got {max_seq_length}")
    if not 0.0 < mlm_probability <= 1.0:
        raise InputError(f"mlm_probability must be in (0, 1], got {mlm_probability}")
    expected = mlm_probability * max_seq_length
    budget = math.ceil(1.2 * expected) + 8 if whole_word_masking else math.ceil(expected - 1e-9)
    # Never more slots than tokens: a row cannot select more than L positions.
    return min(8 * math.ceil(max(budget, 1) / 8), max_seq_length)


def _check_args(special_ids, mask_token_id, random_vocab_size, mlm_probability, num_slots):
    if not 0.0 <= mlm_probability <= 1.0:
        raise InputError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}; use num_prediction_slots()")
    if mask_token_id < 0:
        raise ValueError(f"mask_token_id must be a token id >= 0, got {mask_token_id}")
    specials_in_vocab = sorted({int(s) for s in special_ids if 0 <= int(s) < random_vocab_size})
    if random_vocab_size - len(specials_in_vocab) < 1:
        raise ValueError(
            f"random_vocab_size={random_vocab_size} leaves no non-special token to draw; "
            "pass the tokenizer's vocabulary size"
        )
    return specials_in_vocab


def _random_non_special(key, shape, random_vocab_size: int, sorted_specials: list[int]) -> jax.Array:
    """Uniform over [0, V) minus the special ids, without rejection.

    Draw r in [0, V - k) and shift it past the specials: the i-th sorted special s_i pushes r up
    by one when r >= s_i - i, so r += #{i : s_i - i <= r} (s_i - i is non-decreasing).
    """
    draws = jax.random.randint(key, shape, 0, random_vocab_size - len(sorted_specials), dtype=jnp.int32)
    if not sorted_specials:
        return draws
    thresholds = jnp.asarray([s - i for i, s in enumerate(sorted_specials)], dtype=jnp.int32)
    return draws + jnp.searchsorted(thresholds, draws, side="right").astype(jnp.int32)


def _mask_row(
    key,
    ids_L,
    word_starts_L,
    *,
    special_ids,
    sorted_not_drawn,
    mask_token_id,
    random_vocab_size,
    mlm_probability,
    num_slots,
):
    """One row. Token masking is whole-word masking where every token is its own word."""
    (seq_len,) = ids_L.shape
    score_key, decision_key, random_key = jax.random.split(key, 3)
    positions_L = jnp.arange(seq_len, dtype=jnp.int32)

    specials = jnp.asarray(special_ids, dtype=ids_L.dtype)
    is_special_L = jnp.any(ids_L[:, None] == specials[None, :], axis=-1)
    maskable_L = ~is_special_L

    # Specials are words of their own, so a word never mixes special and ordinary tokens
    # (and a continuation right after a document separator still starts a new word).
    after_special_L = jnp.concatenate([jnp.ones((1,), bool), is_special_L[:-1]])
    starts_L = word_starts_L | is_special_L | after_special_L
    word_id_L = jnp.cumsum(starts_L.astype(jnp.int32)) - 1  # in [0, L)

    # Per-word tables indexed by word id (at most L words); the draw at a word's first token
    # stands for the whole word. Absent and special words score -1 and sort last.
    start_slot_L = jnp.where(starts_L, word_id_L, seq_len)  # seq_len = dropped by the scatter
    word_maskable_W = jnp.zeros((seq_len,), bool).at[start_slot_L].set(maskable_L, mode="drop")
    scores_L = jax.random.uniform(score_key, (seq_len,))
    word_score_W = jnp.full((seq_len,), -1.0).at[start_slot_L].set(scores_L, mode="drop")
    word_score_W = jnp.where(word_maskable_W, word_score_W, -1.0)
    word_len_W = jnp.zeros((seq_len,), jnp.int32).at[word_id_L].add(1)

    n_maskable_words = jnp.sum(word_maskable_W.astype(jnp.int32))
    n_to_select = jnp.round(mlm_probability * n_maskable_words.astype(jnp.float32)).astype(jnp.int32)
    n_to_select = jnp.where(n_maskable_words > 0, jnp.maximum(n_to_select, 1), 0)
    if mlm_probability == 0.0:
        n_to_select = jnp.zeros_like(n_to_select)

    # Rank words by score (stable sort keeps ties deterministic); take the first n_to_select,
    # but stop before the word whose tokens would overflow the slot budget, so words are
    # dropped whole (never partially) and only in the rare overflow case.
    order_W = jnp.argsort(-word_score_W, stable=True)
    tokens_so_far_W = jnp.cumsum(word_len_W[order_W])
    rank_W = positions_L  # ranks 0..L-1
    keep_sorted_W = (rank_W < n_to_select) & (tokens_so_far_W <= num_slots)
    keep_word_W = jnp.zeros((seq_len,), bool).at[order_W].set(keep_sorted_W)
    selected_L = keep_word_W[word_id_L] & maskable_L

    # 80/10/10 per word: a word is masked, randomized or kept as a whole, so no sub-token of a
    # masked word is left visible as a hint. (Google's BERT and HF's collator decide per token;
    # the expected per-token fractions are 80/10/10 either way.)
    decision_L = jax.random.uniform(decision_key, (seq_len,))
    word_decision_W = jnp.zeros((seq_len,)).at[start_slot_L].set(decision_L, mode="drop")
    decision_L = word_decision_W[word_id_L]
    to_mask_L = selected_L & (decision_L < MASK_FRACTION)
    to_random_L = selected_L & (decision_L >= MASK_FRACTION) & (decision_L < MASK_FRACTION + RANDOM_FRACTION)
    random_ids_L = _random_non_special(random_key, (seq_len,), random_vocab_size, sorted_not_drawn)
    corrupted_L = jnp.where(to_mask_L, jnp.asarray(mask_token_id, ids_L.dtype), ids_L)
    corrupted_L = jnp.where(to_random_L, random_ids_L.astype(ids_L.dtype), corrupted_L)

    # Compact the selected positions (ascending) into the slots; the overflow rule above
    # guarantees they fit.
    slot_L = jnp.cumsum(selected_L.astype(jnp.int32)) - 1
    slot_L = jnp.where(selected_L, slot_L, num_slots)
    positions_P = jnp.zeros((num_slots,), jnp.int32).at[slot_L].set(positions_L, mode="drop")
    n_selected = jnp.sum(selected_L.astype(jnp.int32))
    real_P = jnp.arange(num_slots) < n_selected
    labels_P = jnp.where(real_P, ids_L[positions_P], 0).astype(jnp.int32)
    return corrupted_L, positions_P, labels_P, real_P.astype(jnp.float32)


def _rows_sharding(ids_BxL: jax.Array):
    """The batch's row sharding when its mesh axes are Explicit, else None.

    Under explicit sharding (``jax.make_mesh``'s default since JAX 0.7) every op must agree on
    shardings, which vmapped per-row code mixing sharded rows with replicated constants does not;
    we then run the masking with those axes switched to Auto (the compiler propagates the
    row sharding itself, as it does for Auto meshes) and hand the outputs back row-sharded.
    """
    sharding = getattr(jax.typeof(ids_BxL), "sharding", None)
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or not spec or spec[0] is None:
        return None
    row_axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    axis_types = dict(zip(mesh.axis_names, mesh.axis_types))
    if not all(axis_types[axis] == AxisType.Explicit for axis in row_axes):
        return None
    return NamedSharding(mesh, PartitionSpec(spec[0]))


def mask_tokens(
    seed_key: jax.Array,
    step,
    input_ids_BxL: jax.Array,
    *,
    special_ids: tuple[int, ...],
    mask_token_id: int,
    random_vocab_size: int,
    mlm_probability: float,
    num_slots: int,
    example_offset=0,
    example_index_B: jax.Array | None = None,
    word_starts_BxL: jax.Array | None = None,
    whole_word_masking: bool = False,
    never_drawn_ids: tuple[int, ...] = (),
) -> MaskedBatch:
    """Dynamically mask a batch; see the module docstring for the scheme.

    seed_key: a PRNG key (typed or raw uint32). step: the optimizer step (may be traced).
    example_offset: global index of row 0, so any slice of the global batch masks exactly as it
    would inside the whole batch (may be traced). example_index_B: each row's own index instead (evaluation
    keys each row by its identity in the validation set, whatever batch it sits in). special_ids: never selected nor drawn as random
    replacements; must include the pad id. random_vocab_size: replacements are drawn from
    [0, random_vocab_size) minus special_ids and never_drawn_ids (tokens that may be masked but are not
    ordinary vocabulary: a tokenizer's added tokens). num_slots: static slot budget, see
    ``num_prediction_slots``.
    """
    special_ids = tuple(int(s) for s in special_ids)
    if not special_ids:
        raise ValueError("special_ids is empty; pass at least the pad id (tokenizer.all_special_ids)")
    sorted_not_drawn = _check_args(special_ids + tuple(int(i) for i in never_drawn_ids), mask_token_id,
                                   random_vocab_size, mlm_probability, num_slots)
    if input_ids_BxL.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids_BxL.shape}")
    batch, seq_len = input_ids_BxL.shape
    if whole_word_masking:
        if word_starts_BxL is None:
            raise ValueError("whole_word_masking=True needs word_starts_BxL (the batch's 'word_starts')")
        if word_starts_BxL.shape != input_ids_BxL.shape:
            raise ValueError(
                f"word_starts shape {word_starts_BxL.shape} differs from input_ids shape {input_ids_BxL.shape}"
            )
        word_starts_BxL = word_starts_BxL.astype(bool)
    else:
        word_starts_BxL = jnp.ones_like(input_ids_BxL, dtype=bool)  # keeps the batch's sharding

    step_key = jax.random.fold_in(seed_key, step)
    if example_index_B is None:
        example_index_B = jnp.asarray(example_offset, jnp.int32) + jnp.arange(batch, dtype=jnp.int32)
    keys_B = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(example_index_B)
    row_fn = lambda key, ids, starts: _mask_row(  # noqa: E731
        key,
        ids,
        starts,
        special_ids=special_ids,
        sorted_not_drawn=sorted_not_drawn,
        mask_token_id=mask_token_id,
        random_vocab_size=random_vocab_size,
        mlm_probability=mlm_probability,
        num_slots=num_slots,
    )
    mask_rows = jax.vmap(row_fn)
    rows_sharding = _rows_sharding(input_ids_BxL)
    if rows_sharding is not None:
        mask_rows = jax.sharding.auto_axes(mask_rows, out_sharding=(rows_sharding,) * 4)
    corrupted, positions, labels, weights = mask_rows(keys_B, input_ids_BxL, word_starts_BxL)
    return MaskedBatch(input_ids=corrupted, positions=positions, labels=labels, weights=weights)
