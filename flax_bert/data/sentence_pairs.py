"""Sentence-pair rows for next-sentence prediction (``objective='mlm+nsp'``), as BERT built them.

Follows ``create_instances_from_document`` in google-research/bert ``create_pretraining_data.py``:
walk each document's sentences, gathering them into a chunk until it reaches a target length
(``max_seq_length - 3``, or with probability ``short_seq_prob`` a random shorter one); split the chunk
at a random sentence into A and the rest; half the time B is that rest (label 0, "is next"), otherwise
B is a run of sentences from a random other document (label 1) and the unused rest of the chunk goes
back into the walk; the longer side is trimmed, one token at a time from a random end, until
``[CLS] A [SEP] B [SEP]`` fits.

One difference, to keep the label an exact coin flip: BERT falls back to a random B whenever a chunk
has one sentence, which skews the labels toward "random" on corpora of short documents. Here, when
the coin says "is next" and the chunk has one sentence, B is the document's next sentence if there is
one, else the sentence is cut in two halves (and only a one-token sentence falls back to random).
"""

from __future__ import annotations

import numpy as np

from flax_bert.data.packing import row_features
from flax_bert.data.sources import DataError
from flax_bert.data.tokenize import TokenizedCorpus, TokenizerInfo


def _trimmed(a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator):
    """BERT's truncate_seq_pair in closed form: trim the longer side (b on ties) one token at a time,
    each token from the front or the back with equal chance."""
    la, lb = len(a), len(b)
    excess = la + lb - max_tokens
    if excess <= 0:
        return a, b
    if abs(la - lb) >= excess:
        cut_a, cut_b = (excess, 0) if la > lb else (0, excess)
    else:
        rest = excess - abs(la - lb)
        shorter = min(la, lb)
        keep_a, keep_b = shorter - rest // 2, shorter - (rest + 1) // 2
        cut_a, cut_b = la - keep_a, lb - keep_b

    def cut(x, n):
        front = int(rng.binomial(n, 0.5)) if n else 0
        return x[front : len(x) - (n - front)]

    return cut(a, cut_a), cut(b, cut_b)


def build_nsp_rows(corpus: TokenizedCorpus, info: TokenizerInfo, max_seq_length: int, seed: int = 0,
                   short_seq_prob: float = 0.1, shard: int = 0) -> dict[str, np.ndarray]:
    """Rows [N, L]: input_ids, segment_ids (1 on tokens, 0 on padding: one pair per row), word_starts,
    token_type_ids (0 for [CLS] A [SEP], 1 for B [SEP]) and next_sentence_label [N] (0 next, 1 random).
    ``corpus`` is one data shard; random B sentences come from the shard's other documents."""
    if corpus.doc_units is None:
        raise DataError("NSP rows need a corpus tokenized by sentence: build it with sentences=True")
    if info.cls_id is None or info.sep_id is None:
        raise DataError("objective 'mlm+nsp' needs a tokenizer with [CLS] and [SEP] tokens: "
                        "use a BERT (WordPiece) tokenizer")
    if max_seq_length < 8:
        raise DataError(f"max_seq_length={max_seq_length} is too short for sentence pairs: use at least 8")
    doc_units = corpus.doc_units
    num_docs = len(doc_units) - 1
    if num_docs < 2:
        raise DataError(f"next-sentence prediction needs at least 2 documents per data shard (random B comes from "
                        f"another one) but one has {num_docs}: add text or lower --data_shards")
    rng = np.random.default_rng([seed, 0x4E5350, shard])
    max_tokens = max_seq_length - 3
    unit = corpus.unit
    pairs = []

    def random_b(doc: int, target: int) -> np.ndarray:
        other = int(rng.integers(num_docs - 1))
        other += other >= doc
        start, stop = int(doc_units[other]), int(doc_units[other + 1])
        pieces, length = [], 0
        for index in range(int(rng.integers(start, stop)), stop):
            pieces.append(unit(index))
            length += len(pieces[-1])
            if length >= target:
                break
        return np.concatenate(pieces)

    for doc in range(num_docs):
        first, stop = int(doc_units[doc]), int(doc_units[doc + 1])
        target = max_tokens if rng.random() >= short_seq_prob else int(rng.integers(2, max_tokens + 1))
        chunk, length, i = [], 0, first
        while i < stop:
            chunk.append(i)
            length += len(unit(i))
            if i == stop - 1 or length >= target:
                a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
                tokens_a = np.concatenate([unit(u) for u in chunk[:a_end]])
                is_random = bool(rng.random() < 0.5)
                if not is_random and a_end == len(chunk):
                    if i + 1 < stop:  # borrow the next sentence as B
                        i += 1
                        chunk.append(i)
                    elif len(tokens_a) >= 2:  # last sentence of the document: its second half is B
                        half = len(tokens_a) // 2
                        tokens_a, chunk = tokens_a[:half], chunk + [None]
                    else:
                        is_random = True
                if is_random:
                    tokens_b = random_b(doc, max(1, target - len(tokens_a)))
                    i -= len(chunk) - a_end  # BERT puts the unused sentences back
                elif chunk[-1] is None:
                    tokens_b = unit(chunk[0])[len(tokens_a):]
                else:
                    tokens_b = np.concatenate([unit(u) for u in chunk[a_end:]])
                pairs.append((*_trimmed(tokens_a, tokens_b, max_tokens, rng), int(is_random)))
                chunk, length = [], 0
                target = max_tokens if rng.random() >= short_seq_prob else int(rng.integers(2, max_tokens + 1))
            i += 1
    return _pairs_to_rows(pairs, info, max_seq_length)


def _pairs_to_rows(pairs, info: TokenizerInfo, max_seq_length: int) -> dict[str, np.ndarray]:
    count = len(pairs)
    ids = np.full((count, max_seq_length), info.pad_id, np.int32)
    types = np.zeros((count, max_seq_length), np.int32)
    doc_ids = np.full((count, max_seq_length), -1, np.int64)
    labels = np.zeros(count, np.int32)
    for row, (a, b, label) in enumerate(pairs):
        la, lb = len(a), len(b)
        ids[row, 0] = info.cls_id
        ids[row, 1 : 1 + la] = a
        ids[row, 1 + la] = info.sep_id
        ids[row, 2 + la : 2 + la + lb] = b
        ids[row, 2 + la + lb] = info.sep_id
        types[row, 2 + la : 3 + la + lb] = 1
        doc_ids[row, : 3 + la + lb] = 0
        labels[row] = label
    rows = row_features(ids, doc_ids, info)
    rows["token_type_ids"] = types
    rows["next_sentence_label"] = labels
    return rows
