"""What a model that learned nothing about context would score: always predict the training data's most
frequent token. Printed beside the held-out masked accuracy, so a person can see whether a run learned.

Masks pick uniformly among the non-special tokens of a row, so the expected accuracy of that constant
guess is the share of that token among the evaluation rows' non-special tokens.
"""
from __future__ import annotations

import numpy as np

from flax_bert.training import distributed


def _token_counts(rows, vocab_size: int, special_ids) -> np.ndarray | None:
    """Counts of every token id over the cached rows of `rows`, all processes' shards together (a collective;
    None for streamed data). A process that holds no shard (few documents, many hosts) still takes part
    with zeros: whether to gather depends only on the kind of rows, the same on every process."""
    shards = getattr(rows, "shards", None)
    if shards is None:
        return None
    counts = np.zeros(vocab_size, np.int64)
    for shard in shards.values():
        ids = np.asarray(shard.arrays["input_ids"]).ravel()
        counts += np.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)[:vocab_size]
    counts[[i for i in special_ids if 0 <= i < vocab_size]] = 0
    return distributed.process_sum_array(counts)  # each process holds only its own shards


def unigram_baseline(train_rows, eval_rows, vocab_size: int, special_ids) -> tuple[int, float] | None:
    """(the most frequent training token, its share of the evaluation tokens), or None without cached rows."""
    train = _token_counts(train_rows, vocab_size, special_ids)
    evaluation = _token_counts(eval_rows, vocab_size, special_ids)
    if train is None or evaluation is None or not evaluation.sum():
        return None
    token = int(train.argmax())
    return token, float(evaluation[token] / evaluation.sum())


def token_share(eval_rows, token: int, vocab_size: int, special_ids) -> float | None:
    """`token`'s share of the evaluation rows' non-special tokens (None without cached rows): the baseline of
    an evaluation that does not read the training data, with the token a training run found most frequent."""
    evaluation = _token_counts(eval_rows, vocab_size, special_ids)
    if evaluation is None or not evaluation.sum() or not 0 <= token < vocab_size:
        return None
    return float(evaluation[token] / evaluation.sum())
