"""Dynamic masking: rates, exclusions, reproducibility across splits/sharding, whole-word masking."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flax_bert.training import masking
# RoBERTa-like layout: <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> the last id.
CLS, PAD, SEP, UNK = 0, 1, 2, 3
VOCAB = 1000
MASK = VOCAB - 1
SPECIALS = (CLS, PAD, SEP, UNK, MASK)
PROB = 0.15
B, L = 64, 256
SLOTS = masking.num_prediction_slots(L, PROB)
WWM_SLOTS = masking.num_prediction_slots(L, PROB, whole_word_masking=True)
SEED_KEY = jax.random.key(1234)
COMMON = dict(special_ids=SPECIALS, mask_token_id=MASK, random_vocab_size=VOCAB, mlm_probability=PROB)


# One compiled function per configuration, shared by all tests (step and offset are traced).
@jax.jit
def mask_jit(ids, step, offset):
    return masking.mask_tokens(SEED_KEY, step, ids, num_slots=SLOTS, example_offset=offset, **COMMON)


@functools.partial(jax.jit, static_argnames="num_slots")
def mask_wwm_jit(ids, word_starts, step, num_slots=WWM_SLOTS):
    return masking.mask_tokens(
        SEED_KEY, step, ids, num_slots=num_slots, word_starts_BxL=word_starts, whole_word_masking=True, **COMMON
    )


def make_batch(rng, batch=B):
    """Packed rows: <s> doc </s><s> doc </s> then ~10% padding at the row end."""
    ids = rng.integers(UNK + 1, MASK, size=(batch, L)).astype(np.int32)
    ids[:, 0] = CLS
    ids[:, 100], ids[:, 101] = SEP, CLS  # a document boundary at a fixed place
    ids[:, 180] = UNK
    for row, n_pad in enumerate(rng.integers(0, 52, size=batch)):
        ids[row, L - n_pad - 1] = SEP
        ids[row, L - n_pad :] = PAD
    return ids


@pytest.fixture(scope="module")
def masked_steps():
    """Sixteen steps of fresh batches: ~230k maskable tokens, ~35k selected."""
    rng = np.random.default_rng(0)
    results = []
    for step in range(16):
        ids = make_batch(rng)
        out = jax.device_get(mask_jit(jnp.asarray(ids), step, 0))
        results.append((ids, out))
    return results


def test_slot_budget():
    assert masking.num_prediction_slots(128, 0.15) == 24
    assert masking.num_prediction_slots(512, 0.15) == 80
    assert masking.num_prediction_slots(128, 0.15, whole_word_masking=True) == 32
    assert masking.num_prediction_slots(512, 0.15, whole_word_masking=True) == 104
    assert masking.num_prediction_slots(4, 0.5) == 4  # never more than the row
    with pytest.raises(ValueError, match="mlm_probability"):
        masking.num_prediction_slots(128, 1.5)


def test_rates_and_exclusions(masked_steps):
    n_maskable = n_selected = n_masked = n_random = n_kept = 0
    for ids, out in masked_steps:
        maskable = ~np.isin(ids, SPECIALS)
        real = out.weights > 0
        assert out.positions.shape == out.labels.shape == out.weights.shape == (B, SLOTS)
        assert out.positions.dtype == np.int32 and out.labels.dtype == np.int32 and out.weights.dtype == np.float32
        for row in range(B):
            pos = out.positions[row][real[row]]
            expected = int(np.round(PROB * maskable[row].sum()))
            assert len(pos) == expected == out.weights[row].sum()
            assert len(np.unique(pos)) == len(pos), "positions repeat"
            assert np.all(np.diff(pos) > 0)
            assert maskable[row][pos].all(), "special or padding token selected"
            np.testing.assert_array_equal(out.labels[row][real[row]], ids[row][pos])
            # Unused slots are harmless: position 0, label 0, weight 0.
            assert not out.positions[row][~real[row]].any() and not out.labels[row][~real[row]].any()
            # Nothing outside the selection changes.
            untouched = np.ones(L, bool)
            untouched[pos] = False
            np.testing.assert_array_equal(out.input_ids[row][untouched], ids[row][untouched])
            new = out.input_ids[row][pos]
            is_mask, is_kept = new == MASK, new == ids[row][pos]
            is_random = ~is_mask & ~is_kept
            assert not np.isin(new[is_random], SPECIALS).any(), "random replacement is a special token"
            assert ((new[is_random] >= 0) & (new[is_random] < VOCAB)).all()
            n_masked += is_mask.sum()
            n_random += is_random.sum()
            n_kept += is_kept.sum()
        n_maskable += maskable.sum()
        n_selected += real.sum()
    assert n_maskable >= 100_000
    assert abs(n_selected / n_maskable - PROB) < 0.003
    assert abs(n_masked / n_selected - 0.8) < 0.01
    assert abs(n_random / n_selected - 0.1) < 0.01
    assert abs(n_kept / n_selected - 0.1) < 0.01


def test_random_replacement_uniform_over_non_specials():
    specials = [0, 3, 9]
    draws = np.asarray(masking._random_non_special(jax.random.key(0), (70_000,), 10, specials))
    counts = np.bincount(draws, minlength=10)
    assert counts[specials].sum() == 0
    allowed = counts[[1, 2, 4, 5, 6, 7, 8]]
    np.testing.assert_allclose(allowed / len(draws), 1 / 7, atol=0.006)


def test_independent_of_batch_split():
    ids = jnp.asarray(make_batch(np.random.default_rng(1)))
    whole = mask_jit(ids, 7, 0)
    first, second = mask_jit(ids[: B // 2], 7, 0), mask_jit(ids[B // 2 :], 7, B // 2)
    for field in masking.MaskedBatch._fields:
        joined = np.concatenate([getattr(first, field), getattr(second, field)])
        np.testing.assert_array_equal(joined, getattr(whole, field), err_msg=field)
    # A different step gives different masks; the same step is deterministic.
    assert not np.array_equal(mask_jit(ids, 8, 0).positions, whole.positions)
    np.testing.assert_array_equal(mask_jit(ids, 7, 0).input_ids, whole.input_ids)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_identical_when_sharded_over_8_devices(axis_type):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    ids = jnp.asarray(make_batch(np.random.default_rng(2)))
    if axis_type == "explicit":  # jax.make_mesh's default
        mesh = jax.make_mesh((8,), ("data",))
    else:
        mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded_ids = jax.device_put(ids, NamedSharding(mesh, P("data")))
    sharded = mask_jit(sharded_ids, 3, 0)
    assert len(sharded.input_ids.sharding.device_set) == 8
    plain = mask_jit(ids, 3, 0)
    for field in masking.MaskedBatch._fields:
        np.testing.assert_array_equal(getattr(sharded, field), getattr(plain, field), err_msg=field)


def test_bad_arguments_raise():
    ids = jnp.asarray(make_batch(np.random.default_rng(3), batch=2))
    with pytest.raises(ValueError, match="word_starts"):
        masking.mask_tokens(SEED_KEY, 0, ids, num_slots=SLOTS, whole_word_masking=True, **COMMON)
    with pytest.raises(ValueError, match="special_ids"):
        masking.mask_tokens(SEED_KEY, 0, ids, num_slots=SLOTS, **{**COMMON, "special_ids": ()})
    with pytest.raises(ValueError, match="random_vocab_size"):
        masking.mask_tokens(SEED_KEY, 0, ids, num_slots=SLOTS, **{**COMMON, "random_vocab_size": 4})


# Whole-word masking ---------------------------------------------------------------------------
WORD_START_IDS = (UNK + 1, 600)  # WordPiece: plain pieces; BPE: pieces with a leading space "Ġ"
CONTINUATION_IDS = (600, MASK)  # WordPiece: "##" pieces; BPE: pieces without a leading space


def make_word_batch(rng, layout):
    """Rows of words of 1-4 tokens; returns ids, the word_starts a tokenizer would give, and the
    true word index of every token (-1 for specials/padding) to check against."""
    ids = np.full((B, L), PAD, np.int32)
    starts = np.zeros((B, L), bool)
    word_of = np.full((B, L), -1, np.int64)
    next_word = 0
    for row in range(B):
        content_end = L - 1 - rng.integers(0, 52)
        pos, ids[row, 0] = 1, CLS
        doc_start = True
        while pos < content_end:
            if pos == 100:  # a document boundary </s><s> at a fixed place
                ids[row, 100], ids[row, 101], pos, doc_start = SEP, CLS, 102, True
                continue
            limit = 100 if pos < 100 else content_end  # words never straddle the boundary
            n_tokens = min(rng.geometric(0.6), 4, limit - pos)
            ids[row, pos] = rng.integers(*WORD_START_IDS)
            ids[row, pos + 1 : pos + n_tokens] = rng.integers(*CONTINUATION_IDS, size=n_tokens - 1)
            if layout == "bpe" and doc_start:
                # Byte-level BPE: a document's first word has no leading space, so a
                # "starts with Ġ" rule misses it; masking must still treat it as a word start.
                ids[row, pos] = rng.integers(*CONTINUATION_IDS)
            starts[row, pos] = ids[row, pos] < 600
            word_of[row, pos : pos + n_tokens] = next_word
            next_word, pos, doc_start = next_word + 1, pos + n_tokens, False
        ids[row, content_end] = SEP
    if layout == "wordpiece":
        starts |= np.isin(ids, SPECIALS)  # e.g. a tokenizer marking every non-"##" token
    return ids, starts, word_of


@pytest.mark.parametrize("layout", ["wordpiece", "bpe"])
def test_whole_word_masking(layout):
    rng = np.random.default_rng({"wordpiece": 10, "bpe": 11}[layout])
    n_words = n_selected_words = short_rows = 0
    for step in range(6):
        ids, starts, word_of = make_word_batch(rng, layout)
        out = jax.device_get(mask_wwm_jit(jnp.asarray(ids), jnp.asarray(starts), step))
        selected = np.zeros((B, L), bool)
        for row in range(B):
            selected[row, out.positions[row][out.weights[row] > 0]] = True
        assert not (selected & (word_of < 0)).any(), "special or padding token selected"
        words = word_of[word_of >= 0]
        word_len = np.bincount(words)
        word_selected = np.bincount(words, weights=selected[word_of >= 0])
        word_masked = np.bincount(words, weights=(out.input_ids == MASK)[word_of >= 0])
        present = word_len > 0
        assert np.all(((word_selected == 0) | (word_selected == word_len))[present]), "word partially selected"
        # The 80/10/10 decision is per word: a selected word is masked entirely or not at all.
        assert np.all(((word_masked == 0) | (word_masked == word_len))[present])
        # Overflow of the slot budget (dropping whole words) should be rare at the default budget.
        for row in range(B):
            row_words = np.unique(word_of[row][word_of[row] >= 0])
            expected = int(np.round(PROB * len(row_words)))
            got = len(np.unique(word_of[row][selected[row]]))
            assert got <= expected
            short_rows += got < expected
        n_words += present.sum()
        n_selected_words += (word_selected[present] > 0).sum()
    assert n_words >= 40_000
    assert abs(n_selected_words / n_words - PROB) < 0.005
    assert short_rows <= 0.01 * 6 * B


def test_whole_word_overflow_drops_whole_words():
    """With a tiny budget, words that do not fit are dropped whole, never cut."""
    rng = np.random.default_rng(12)
    ids, starts, word_of = make_word_batch(rng, "wordpiece")
    out = jax.device_get(mask_wwm_jit(jnp.asarray(ids), jnp.asarray(starts), 0, num_slots=8))
    assert out.weights.sum(axis=1).max() <= 8
    assert out.weights.sum(axis=1).min() >= 8 - 3  # only the last word (<= 4 tokens) is dropped
    for row in range(B):
        chosen = out.positions[row][out.weights[row] > 0]
        for word in np.unique(word_of[row][chosen]):
            assert np.isin(np.flatnonzero(word_of[row] == word), chosen).all(), "word cut by the budget"


def tokenizer_with_added_tokens(added: int = 40):
    """A 25-token word-level tokenizer ([PAD] [UNK] [CLS] [SEP] [MASK] w0..w19) plus `added` tokens
    [unused0].. added as ModernBERT's are: special to the tokenizer, yet not in all_special_ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(20)]
    backend = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tokenizer.add_tokens([f"[unused{i}]" for i in range(added)], special_tokens=True)
    return tokenizer


def test_random_replacements_come_from_the_ordinary_vocabulary_not_added_tokens():
    """The masking the trainer builds from a tokenizer never puts an added token ([unused*]) in as a random
    replacement: 40 of its 65 ids are added tokens, so a draw over [0, len(tokenizer)) would hit them often."""
    from types import SimpleNamespace

    from flax_bert.training.step import MaskingConfig, Trainer

    tokenizer = tokenizer_with_added_tokens()
    assert len(tokenizer) == 65 and set(tokenizer.all_special_ids) == set(range(5))
    config = MaskingConfig.from_tokenizer(tokenizer, mlm_probability=1.0, max_seq_length=32)
    ordinary = np.arange(5, 25)
    ids = np.random.default_rng(0).choice(ordinary, size=(64, 32)).astype(np.int32)
    trainer = SimpleNamespace(step_config=SimpleNamespace(masking=config))  # what Trainer._mask reads
    out = jax.device_get(Trainer._mask(trainer, SEED_KEY, 0, {"input_ids": jnp.asarray(ids)}))
    replaced = out.input_ids[(out.input_ids != ids) & (out.input_ids != tokenizer.mask_token_id)]
    assert replaced.size > 100  # ~10% of 2048 selected tokens
    assert np.isin(replaced, ordinary).all(), sorted(set(replaced.tolist()) - set(ordinary.tolist()))
