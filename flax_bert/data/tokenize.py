"""Tokenization: what the pipeline needs to know about a tokenizer, and a disk cache of token ids.

The cache holds, per (tokenizer fingerprint, document-stream fingerprint, unit kind), the flat
token ids of every unit (a document, or a sentence for NSP) without special tokens, plus offsets.
Special tokens and word-start flags are added at packing time, so one cache serves packing,
line-by-line and any ``max_seq_length``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Iterator

import numpy as np

from flax_bert.data.sources import DataError, DocumentStream

CACHE_VERSION = 1
_ENCODE_CHARS = 4_000_000  # text per encode call: big enough for the Rust thread pool to pay off
_BYTE_LEVEL_SPACES = frozenset("ĠĊĉč")  # byte-level BPE's images of space, \n, \t, \r
# Sentence end: . ! or ? then whitespace, then something that starts a sentence (capital, digit,
# quote or bracket). Keeps "e.g. this" and "H. americanus" together; good enough for NSP pairs.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """The facts about a tokenizer that packing needs, as numpy lookup tables over token ids."""

    fingerprint: str
    vocab_size: int  # len(tokenizer), added tokens included
    pad_id: int
    prefix: tuple[int, ...]  # what the tokenizer puts before one text (<s> or [CLS])
    suffix: tuple[int, ...]  # ... and after it (</s> or [SEP])
    cls_id: int | None
    sep_id: int | None
    special_ids: tuple[int, ...]
    word_start: np.ndarray  # bool [V]: the token begins a word by itself ("Ġthe", "the" but not "##s")
    breaks_word: np.ndarray  # bool [V]: the token after this one begins a word (specials, bare whitespace)
    word_rule: str  # "byte-level", "wordpiece", "metaspace" or "every-token"
    backend: object = dataclasses.field(default=None, compare=False, repr=False)  # private tokenizers.Tokenizer


def fast_backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer: "
                        f"load it with AutoTokenizer (use_fast=True)")
    # A private copy: never let a tokenizer.json's truncation/padding settings cut documents.
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def tokenizer_info(tokenizer) -> TokenizerInfo:
    backend = fast_backend(tokenizer)
    serialized = backend.to_str()
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(len(tokenizer), max(vocab.values()) + 1)
    special_ids = tuple(sorted(set(tokenizer.all_special_ids)))
    if tokenizer.pad_token_id is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no pad token: "
                        f"set tokenizer.pad_token before training")

    model_kind = type(backend.model).__name__
    if model_kind == "WordPiece":
        prefix = backend.model.continuing_subword_prefix
        rule, starts = "wordpiece", lambda tok: not tok.startswith(prefix)
    elif "ByteLevel" in repr(backend.pre_tokenizer):
        rule, starts = "byte-level", lambda tok: tok.startswith("Ġ")
    elif "Metaspace" in repr(backend.pre_tokenizer):
        rule, starts = "metaspace", lambda tok: tok.startswith("▁")
    else:  # unknown scheme: every token is its own word, so whole-word masking degrades to token masking
        rule, starts = "every-token", lambda tok: True
    word_start = np.zeros(size, bool)
    breaks_word = np.zeros(size, bool)
    for token, index in vocab.items():
        word_start[index] = starts(token)
        breaks_word[index] = rule == "byte-level" and bool(token) and set(token) <= _BYTE_LEVEL_SPACES
    word_start[list(special_ids)] = True
    breaks_word[list(special_ids)] = True

    probe = "hello"
    bare = backend.encode(probe, add_special_tokens=False).ids
    full = backend.encode(probe, add_special_tokens=True).ids
    at = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), 0)
    return TokenizerInfo(
        fingerprint=hashlib.sha256(serialized.encode()).hexdigest()[:24],
        vocab_size=size,
        pad_id=int(tokenizer.pad_token_id),
        prefix=tuple(full[:at]),
        suffix=tuple(full[at + len(bare) :]),
        cls_id=tokenizer.cls_token_id,
        sep_id=tokenizer.sep_token_id,
        special_ids=special_ids,
        word_start=word_start,
        breaks_word=breaks_word,
        word_rule=rule,
        backend=backend,
    )


def split_sentences(document: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(document) if s.strip()]


@dataclasses.dataclass
class TokenizedCorpus:
    """Token ids of every unit, flat; unit i is ``tokens[unit_offsets[i]:unit_offsets[i+1]]``.
    For sentence units, document j is units ``doc_units[j]:doc_units[j+1]``."""

    tokens: np.ndarray  # int32 [T] (memory-mapped from the cache)
    unit_offsets: np.ndarray  # int64 [U + 1]
    doc_units: np.ndarray | None  # int64 [D + 1]; None when units are documents

    @property
    def num_tokens(self) -> int:
        return int(self.unit_offsets[-1])

    @property
    def num_units(self) -> int:
        return len(self.unit_offsets) - 1

    def unit(self, index: int) -> np.ndarray:
        return self.tokens[self.unit_offsets[index] : self.unit_offsets[index + 1]]


@contextlib.contextmanager
def _rust_threads(num_workers: int | None):
    """Lets the Rust tokenizer use its thread pool for the duration (threads, not processes: forking
    after JAX has started its threads is unsafe). RAYON_NUM_THREADS only counts before first use."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if num_workers == 1 else "true"
    if num_workers and num_workers > 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(num_workers))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _text_groups(stream: DocumentStream) -> Iterator[list[str]]:
    group, chars = [], 0
    for batch in stream.batches():
        group.extend(batch)
        chars += sum(map(len, batch))
        if chars >= _ENCODE_CHARS:
            yield group
            group, chars = [], 0
    if group:
        yield group


def encode_texts(backend, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(flat int32 ids, int64 lengths) of ``texts`` without special tokens."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    id_lists = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, id_lists), np.int64, len(id_lists))
    flat = np.fromiter(itertools.chain.from_iterable(id_lists), np.int32, int(lengths.sum()))
    return flat, lengths


def encode_group(backend, texts: list[str], sentences: bool, space_later_sentences: bool = False):
    """(ids, unit_lengths, units_per_doc or None) of one group of documents; empty units dropped.

    `space_later_sentences` (byte-level BPE): a sentence after a document's first is encoded with its
    leading space, so its first word gets the same token ("ĠIt", a word start) as in running text."""
    per_doc = None
    if sentences:
        pieces = [split_sentences(t) for t in texts]
        if space_later_sentences:
            pieces = [[p[0]] + [" " + x for x in p[1:]] if p else p for p in pieces]
        per_doc = np.fromiter(map(len, pieces), np.int64, len(pieces))
        texts = [s for p in pieces for s in p]
    ids, lengths = encode_texts(backend, texts)
    if per_doc is not None:
        doc_of_unit = np.repeat(np.arange(len(per_doc)), per_doc)
        per_doc = np.bincount(doc_of_unit[lengths > 0], minlength=len(per_doc))
        per_doc = per_doc[per_doc > 0]
    return ids, lengths[lengths > 0], per_doc


def iter_encoded(stream: DocumentStream, backend, sentences: bool, num_workers: int | None,
                 space_later_sentences: bool = False):
    """``encode_group`` over the whole stream, a group of ~_ENCODE_CHARS characters at a time."""
    with _rust_threads(num_workers):
        for texts in _text_groups(stream):
            yield encode_group(backend, texts, sentences, space_later_sentences)


def tokenized_cache_key(info: TokenizerInfo, stream: DocumentStream, sentences: bool, shard: int = 0,
                        num_shards: int = 1) -> str:
    parts = [CACHE_VERSION, info.fingerprint, stream.fingerprint, "spaced-sentences" if sentences else "documents",
             shard, num_shards]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def load_tokenized(folder: pathlib.Path) -> TokenizedCorpus:
    meta = json.loads((folder / "meta.json").read_text())
    tokens = (np.memmap(folder / "tokens.bin", np.int32, "r", shape=(meta["num_tokens"],))
              if meta["num_tokens"] else np.zeros(0, np.int32))
    doc_units = np.load(folder / "doc_units.npy") if meta["sentences"] else None
    return TokenizedCorpus(tokens, np.load(folder / "unit_offsets.npy"), doc_units)


def publish_folder(staging: pathlib.Path, folder: pathlib.Path, replace: bool = False) -> None:
    """Moves a finished temp folder into place (``replace``: over an older one). Cache folders are
    deterministic, so when another process sharing the cache got there first, its copy is kept."""
    if folder.exists() and (replace or not (folder / "meta.json").is_file()):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(staging, folder)
    except OSError:
        if not (folder / "meta.json").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)


class _ShardWriter:
    """Token ids of one shard, appended group by group into a temp folder that ``finish`` renames into place."""

    def __init__(self, folder: pathlib.Path, sentences: bool, shard: int, num_shards: int, replace: bool):
        self.folder, self.sentences, self.shard, self.num_shards = folder, sentences, shard, num_shards
        self.replace = replace
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.staging = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        self.tokens = open(self.staging / "tokens.bin", "wb")
        self.unit_lengths, self.docs_units, self.total = [], [], 0

    def add(self, ids: np.ndarray, lengths: np.ndarray, per_doc: np.ndarray | None) -> None:
        self.tokens.write(ids.tobytes())
        self.unit_lengths.append(lengths)
        self.total += len(ids)
        if per_doc is not None:
            self.docs_units.append(per_doc)

    def finish(self, source: str) -> None:
        self.tokens.close()
        lengths = np.concatenate(self.unit_lengths) if self.unit_lengths else np.zeros(0, np.int64)
        np.save(self.staging / "unit_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        if self.sentences:
            per_doc = np.concatenate(self.docs_units) if self.docs_units else np.zeros(0, np.int64)
            np.save(self.staging / "doc_units.npy", np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64))
        meta = {"num_tokens": self.total, "num_units": len(lengths), "sentences": self.sentences, "source": source,
                "shard": self.shard, "num_shards": self.num_shards}
        (self.staging / "meta.json").write_text(json.dumps(meta))
        publish_folder(self.staging, self.folder, self.replace)

    def discard(self) -> None:
        self.tokens.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def tokenize_shards_to_cache(stream: DocumentStream, tokenizer, info: TokenizerInfo, cache_dir: pathlib.Path,
                             shards: list[int], num_shards: int = 1, sentences: bool = False,
                             num_workers: int | None = None, overwrite: bool = False) -> dict[int, TokenizedCorpus]:
    """Tokenizes the documents of ``shards`` (document i belongs to shard i % num_shards) into
    ``cache_dir/tokenized/<key>``, one folder per shard, in one pass over the stream; shards already
    cached are loaded. Only the chosen shards' documents are tokenized: each process of a multi-host
    run builds its own shards and never the others'. Each folder appears atomically (temp + rename)."""
    folders = {s: cache_dir / "tokenized" / tokenized_cache_key(info, stream, sentences, s, num_shards)
               for s in shards}
    missing = [s for s in shards if overwrite or not (folders[s] / "meta.json").is_file()]
    if missing:
        backend = info.backend or fast_backend(tokenizer)
        space = info.word_rule == "byte-level"
        writers = {}
        try:
            for s in missing:
                writers[s] = _ShardWriter(folders[s], sentences, s, num_shards, overwrite)
            first = 0  # index of the group's first document in the stream
            with _rust_threads(num_workers):
                for texts in _text_groups(stream):
                    for s in missing:
                        mine = texts[(s - first) % num_shards :: num_shards]
                        if mine:
                            writers[s].add(*encode_group(backend, mine, sentences, space))
                    first += len(texts)
            for s in missing:
                writers.pop(s).finish(stream.name)
        finally:
            for writer in writers.values():
                writer.discard()
    return {s: load_tokenized(folders[s]) for s in shards}

