"""Packing token ids into fixed-length rows: segment ids, word starts, padding. Pure numpy.

Packing (the default): each document is wrapped as the tokenizer's model expects (RoBERTa
``<s> ... </s>``, BERT ``[CLS] ... [SEP]``) and the wrapped documents are laid end to end in one
stream that is cut into rows of exactly ``max_seq_length``. A document that does not fit in the
rest of a row continues at the start of the next row, as a new segment. Only the last row is padded,
so nothing is dropped and the rows hold every token once.
``segment_ids``: 0 = padding, 1..n = the n-th document (piece) in the row; attention and position ids
restart per segment in the model.
Line-by-line: one document per row, cut to fit (keeping its closing token), then padded.
"""

from __future__ import annotations

import numpy as np

from flax_bert.data.tokenize import TokenizerInfo


def row_features(input_ids: np.ndarray, doc_ids: np.ndarray, info: TokenizerInfo) -> dict[str, np.ndarray]:
    """input_ids, segment_ids, word_starts for rows [R, L]; ``doc_ids`` is -1 on padding and any
    increasing document number elsewhere."""
    real = doc_ids >= 0
    first_doc = doc_ids[:, :1]
    segment_ids = np.where(real, doc_ids - first_doc + 1, 0).astype(np.int32)
    # A word starts where the token says so, at a special token, after a special or bare whitespace,
    # and at the start of every segment (a document cut mid-word starts a new word in its next row).
    new_segment = np.ones_like(real)
    new_segment[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    after_break = np.zeros_like(real)
    after_break[:, 1:] = info.breaks_word[input_ids[:, :-1]]
    word_starts = real & (info.word_start[input_ids] | new_segment | after_break)
    return {"input_ids": input_ids.astype(np.int32), "segment_ids": segment_ids, "word_starts": word_starts}


def wrap_documents(tokens: np.ndarray, offsets: np.ndarray, info: TokenizerInfo, first_doc: int = 0):
    """Concatenates documents with their special tokens: (stream ids int32, doc id per token int64)."""
    lengths = np.diff(offsets)
    n_pre, n_suf = len(info.prefix), len(info.suffix)
    wrapped = lengths + n_pre + n_suf
    starts = np.concatenate([[0], np.cumsum(wrapped)[:-1]]).astype(np.int64)
    stream = np.empty(int(wrapped.sum()), np.int32)
    shift = np.repeat(starts - (offsets[:-1] - offsets[0]) + n_pre, lengths)
    stream[np.arange(len(shift), dtype=np.int64) + shift] = tokens[offsets[0] : offsets[-1]]
    for j, token in enumerate(info.prefix):
        stream[starts + j] = token
    for j, token in enumerate(info.suffix):
        stream[starts + n_pre + lengths + j] = token
    doc_ids = np.repeat(np.arange(first_doc, first_doc + len(lengths), dtype=np.int64), wrapped)
    return stream, doc_ids


class StreamPacker:
    """Packs documents given chunk by chunk; ``add`` returns the rows completed so far, ``finish``
    the padded last row. Used for the cached corpus (chunks of the tokenized file) and for streaming."""

    def __init__(self, info: TokenizerInfo, max_seq_length: int):
        self.info, self.length = info, max_seq_length
        self.carry_ids = np.zeros(0, np.int32)
        self.carry_docs = np.zeros(0, np.int64)
        self.next_doc = 0

    def add(self, tokens: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray] | None:
        ids, docs = wrap_documents(tokens, offsets, self.info, self.next_doc)
        self.next_doc += len(offsets) - 1
        ids = np.concatenate([self.carry_ids, ids])
        docs = np.concatenate([self.carry_docs, docs])
        full = len(ids) // self.length * self.length
        self.carry_ids, self.carry_docs = ids[full:], docs[full:]
        if not full:
            return None
        return row_features(ids[:full].reshape(-1, self.length), docs[:full].reshape(-1, self.length), self.info)

    def finish(self) -> dict[str, np.ndarray] | None:
        if not len(self.carry_ids):
            return None
        pad = self.length - len(self.carry_ids)
        ids = np.concatenate([self.carry_ids, np.full(pad, self.info.pad_id, np.int32)])[None]
        docs = np.concatenate([self.carry_docs, np.full(pad, -1, np.int64)])[None]
        self.carry_ids, self.carry_docs = self.carry_ids[:0], self.carry_docs[:0]
        return row_features(ids, docs, self.info)


def packed_row_count(offsets: np.ndarray, info: TokenizerInfo, max_seq_length: int) -> int:
    total = int(offsets[-1] - offsets[0]) + (len(offsets) - 1) * (len(info.prefix) + len(info.suffix))
    return -(-total // max_seq_length)


def pack_line_by_line(tokens: np.ndarray, offsets: np.ndarray, info: TokenizerInfo, max_seq_length: int,
                      first_doc: int = 0) -> dict[str, np.ndarray]:
    """One document per row: prefix, as much text as fits, suffix, padding."""
    n_pre, n_suf = len(info.prefix), len(info.suffix)
    room = max_seq_length - n_pre - n_suf
    lengths = np.minimum(np.diff(offsets), room)
    count = len(lengths)
    columns = np.arange(max_seq_length)[None, :]
    text_cols = (columns >= n_pre) & (columns < n_pre + lengths[:, None])
    ids = np.full((count, max_seq_length), info.pad_id, np.int32)
    source = offsets[:-1, None] + columns - n_pre
    ids[text_cols] = tokens[source[text_cols]]
    rows = np.arange(count)
    for j, token in enumerate(info.prefix):
        ids[:, j] = token
    for j, token in enumerate(info.suffix):
        ids[rows, n_pre + lengths + j] = token
    doc_ids = np.where(columns < (lengths + n_pre + n_suf)[:, None], first_doc + rows[:, None], -1)
    return row_features(ids, doc_ids, info)


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Reference for the model: each token's position within its segment (0, 1, ... restarting at every
    segment; 0 on padding). RoBERTa's position ids are padding_idx + 1 + this on real tokens."""
    columns = np.broadcast_to(np.arange(segment_ids.shape[-1]), segment_ids.shape)
    starts = np.ones(segment_ids.shape, bool)
    starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    start_column = np.maximum.accumulate(np.where(starts, columns, 0), axis=-1)
    return np.where(segment_ids > 0, columns - start_column, 0).astype(np.int32)
