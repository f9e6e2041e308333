"""Host-side data pipeline: sources -> logical shards -> tokenized cache -> packed rows -> batches.

    num_shards = resolve_data_shards(None, jax.process_count(), global_batch_size)
    train_rows, eval_rows = build_datasets(DataArgs(..., data_shards=num_shards), tokenizer, seed=seed)
    batches = Prefetcher(train_rows.iterator(global_batch_size, seed=seed))
    local = next(batches)                       # dict of numpy arrays, this process's rows
    batch = make_global_batch(local, mesh, PartitionSpec("data"))
    state = batches.state_dict()                # rows read from every shard, the same on every process

Batch dict (numpy, [B, L] unless noted, B = this process's share of the global batch):
  input_ids int32, segment_ids int32 (0 = padding, 1..n = document in the row), word_starts bool,
  and for objective "mlm+nsp": token_type_ids int32, next_sentence_label int32 [B] (0 next, 1 random).

Logical shards make multi-host runs read, tokenize and shuffle only their own data, yet give the
same batches for any number of processes: document i of a split belongs to shard i % S, and S stays
fixed. Process p of P owns shards [p*S/P, (p+1)*S/P) and tokenizes, packs and caches only those.
Slot j of a global batch of G rows is always filled from shard floor(j*S/G), so process p's slots
[p*G/P, (p+1)*G/P) come from its own shards, whatever P is (P must divide S and G; S <= G).
Each shard is an endless sequence of epochs, epoch e in ``default_rng([seed, shard, e])`` order.
Host-side only: nothing here imports the model.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import shutil
import tempfile

import numpy as np

from flax_bert import storage

from flax_bert.data import shared_cache
from flax_bert.errors import InputError
from flax_bert.data.iterators import (Prefetcher, ShardedBatchIterator, check_data_shards, empty_rows,
                                      make_global_batch, owned_shards)
from flax_bert.data.sentence_pairs import build_nsp_rows
from flax_bert.data.packing import StreamPacker, pack_line_by_line, packed_row_count
from flax_bert.data.sources import DataArgs, DataError, DocumentStream, document_streams, resolve_cache_dir
from flax_bert.data.streaming import StreamingBatchIterator
from flax_bert.data.tokenize import (CACHE_VERSION, TokenizedCorpus, TokenizerInfo, publish_folder,
                                     tokenize_shards_to_cache,
                                     tokenized_cache_key, tokenizer_info)

__all__ = ["DataArgs", "DataError", "PackedRows", "ShardedRows", "StreamingRows", "ShardedBatchIterator",
           "StreamingBatchIterator", "Prefetcher", "build_datasets", "check_tokenizer_fits", "make_global_batch",
           "resolve_data_shards", "tokenizer_info", "validation_shards"]

logger = logging.getLogger(__name__)
_PACK_CHUNK_TOKENS = 1 << 22  # documents are packed this many tokens at a time (bounded memory)
DEFAULT_DATA_SHARDS = 16


def resolve_data_shards(requested: int | None, process_count: int, global_batch_size: int) -> int:
    """The number of logical shards: ``requested`` when given (checked), else 16 (or the least multiple
    of 16 and the process count) when the global batch has room for it, else one per process."""
    if requested:
        check_data_shards(requested, process_count, global_batch_size)
        return requested
    shards = math.lcm(DEFAULT_DATA_SHARDS, process_count)
    return shards if shards <= global_batch_size else process_count


def validation_shards(process_count: int) -> int:
    """Logical shards of the validation rows (each is packed on its own): the default count whatever the
    training batch or --data_shards, so every run scores the same rows, and evaluating an exported model
    scores what its training run's last evaluation did."""
    return math.lcm(DEFAULT_DATA_SHARDS, process_count)


class PackedRows:
    """Fixed-length rows held in memory-mapped ``.npy`` files (or plain arrays)."""

    def __init__(self, arrays: dict[str, np.ndarray], pad_id: int):
        self.arrays, self.pad_id = arrays, pad_id

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    @property
    def max_seq_length(self) -> int:
        return self.arrays["input_ids"].shape[1]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(np.count_nonzero(self.arrays["segment_ids"]))

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at ``indices``; index -1 gives an empty row (padding only, label 0)."""
        valid = indices >= 0
        picked = np.where(valid, indices, 0)
        batch = {name: np.asarray(array[picked]) for name, array in self.arrays.items()}
        if not valid.all():
            for name, values in batch.items():
                values[~valid] = self.pad_id if name == "input_ids" else 0
        return batch


class ShardedRows:
    """This process's logical shards of one split, each a ``PackedRows`` (shard -> rows)."""

    def __init__(self, shards: dict[int, PackedRows], num_shards: int, process_index: int, process_count: int,
                 max_seq_length: int, pad_id: int, nsp: bool):
        self.shards, self.num_shards = shards, num_shards
        self.process_index, self.process_count = process_index, process_count
        self.max_seq_length, self.pad_id, self.nsp = max_seq_length, pad_id, nsp

    @property
    def local_rows(self) -> int:
        """Rows in this process's shards (the split's total is the sum over processes)."""
        return sum(len(rows) for rows in self.shards.values())

    @property
    def num_tokens(self) -> int:
        return sum(rows.num_tokens for rows in self.shards.values())

    def iterator(self, global_batch_size, *, seed: int = 0, shuffle: bool = True) -> ShardedBatchIterator:
        """Endless training batches (this process's rows of each global batch); `global_batch_size` may be a
        function of the batch index (a batch-size warmup)."""
        return ShardedBatchIterator(self, global_batch_size, seed=seed, shuffle=shuffle)

    def eval_batches(self, global_batch_size: int):
        """Every row of this process's shards once, in order, in local batches of global_batch_size / P rows;
        only the last one is filled up with empty rows. Processes may yield different counts: see ``empty_batch``.
        ``row_ids`` [B] names each row by its place in the split (shard s, row r: s + S * r; -1 for an empty
        row), the same for any batch size and process count: evaluation keys each row's mask by it."""
        local = global_batch_size // self.process_count
        order = sorted(self.shards)
        shard_of_row = np.repeat(order, [len(self.shards[s]) for s in order])
        row_in_shard = np.concatenate([np.arange(len(self.shards[s])) for s in order] or [np.zeros(0, np.int64)])
        for start in range(0, len(shard_of_row), local):
            shards, rows = shard_of_row[start : start + local], row_in_shard[start : start + local]
            parts = [{**self.shards[s].gather(rows[shards == s]),
                      "row_ids": (s + self.num_shards * rows[shards == s]).astype(np.int32)} for s in np.unique(shards)]
            if len(rows) < local:
                parts.append(self._empty(local - len(rows)))
            yield {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def empty_batch(self, global_batch_size: int) -> dict[str, np.ndarray]:
        """A local batch of empty rows, for a process that has run out while others evaluate on."""
        return self._empty(global_batch_size // self.process_count)

    def _empty(self, count: int) -> dict[str, np.ndarray]:
        return {**empty_rows(count, self.max_seq_length, self.pad_id, self.nsp), "row_ids": np.full(count, -1, np.int32)}


class StreamingRows:
    """Rows made on the fly from a document stream (``--streaming``): nothing is cached. Process p of P
    reads only its own files of a dataset made of several files, else tokenizes only documents i with
    i % P == p; either way its batches depend on P (resume with the same P)."""

    def __init__(self, stream: DocumentStream, tokenizer, info: TokenizerInfo, args: DataArgs, process_index: int,
                 process_count: int):
        self.stream, self.tokenizer, self.info, self.args = stream, tokenizer, info, args
        self.process_index, self.process_count = process_index, process_count

    def iterator(self, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None) -> StreamingBatchIterator:
        return StreamingBatchIterator(self, global_batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs)

    def eval_batches(self, global_batch_size: int):
        """One pass in stream order; ``row_ids`` number the rows as they come (row k of process p: p + P * k)."""
        seen = 0
        for batch in self.iterator(global_batch_size, shuffle=False, num_epochs=1):
            count = len(batch["input_ids"])
            ids = self.process_index + self.process_count * np.arange(seen, seen + count)
            seen += count
            real = np.any(batch["segment_ids"] > 0, axis=-1)
            yield {**batch, "row_ids": np.where(real, ids, -1).astype(np.int32)}

    def empty_batch(self, global_batch_size: int) -> dict[str, np.ndarray]:
        count = global_batch_size // self.process_count
        return {**empty_rows(count, self.args.max_seq_length, self.info.pad_id, False),
                "row_ids": np.full(count, -1, np.int32)}


def check_tokenizer_fits(tokenizer, model_vocab_size: int, max_position_embeddings: int, max_seq_length: int,
                         model_type: str = "roberta", pad_token_id: int | None = None) -> None:
    """Raises DataError when the tokenizer's ids or ``max_seq_length`` do not fit the model.

    RoBERTa numbers positions from padding_idx + 1 (padding_idx = the pad token id), so it can use
    max_position_embeddings - pad_token_id - 1 positions (514 - 1 - 1 = 512 for roberta-base)."""
    size = len(tokenizer)
    if size > model_vocab_size:
        raise DataError(f"the tokenizer has {size} tokens but the model's vocab_size is {model_vocab_size}: "
                        f"set vocab_size >= {size} in the model config or use the model's own tokenizer")
    pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    usable = max_position_embeddings - (pad or 0) - 1 if model_type == "roberta" else max_position_embeddings
    if max_seq_length > usable:
        raise DataError(f"max_seq_length={max_seq_length} exceeds the {usable} positions {model_type} can use with "
                        f"max_position_embeddings={max_position_embeddings}: lower --max_seq_length or raise "
                        f"max_position_embeddings")


def _packed_cache_key(tokenized_key: str, args: DataArgs, seed: int) -> str:
    import hashlib

    nsp = args.objective == "mlm+nsp"
    parts = [CACHE_VERSION, tokenized_key, args.max_seq_length, args.line_by_line, args.objective,
             seed if nsp else None, args.short_seq_prob if nsp else None]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def _load_rows(folder: pathlib.Path, pad_id: int) -> PackedRows | None:
    """The rows cached in ``folder``; None for a cached empty shard."""
    meta = json.loads((folder / "meta.json").read_text())
    if not meta["rows"]:
        return None
    return PackedRows({name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}, pad_id)


def _write_rows(folder: pathlib.Path, row_count: int, length: int, chunks, replace: bool = False,
                stats: dict | None = None) -> None:
    """Streams row chunks into preallocated .npy files in a temp folder, then renames it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        files, at = {}, 0
        for chunk in chunks:
            for name, values in chunk.items():
                if name not in files:
                    shape = (row_count, *values.shape[1:])
                    files[name] = np.lib.format.open_memmap(staging / f"{name}.npy", "w+", values.dtype, shape)
                files[name][at : at + len(values)] = values
            at += len(chunk["input_ids"])
        assert at == row_count, (at, row_count)
        for array in files.values():
            array.flush()
        meta = {"arrays": sorted(files), "rows": row_count, "length": length, **(stats or {})}
        (staging / "meta.json").write_text(json.dumps(meta))
        publish_folder(staging, folder, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _doc_chunks(corpus: TokenizedCorpus):
    """Unit-offset slices covering ~_PACK_CHUNK_TOKENS tokens each."""
    offsets = corpus.unit_offsets
    start = 0
    while start < len(offsets) - 1:
        stop = int(np.searchsorted(offsets, offsets[start] + _PACK_CHUNK_TOKENS, side="right"))
        stop = min(max(stop, start + 1), len(offsets) - 1)
        yield offsets[start : stop + 1]
        start = stop


def _packed_chunks(corpus: TokenizedCorpus, info: TokenizerInfo, length: int, line_by_line: bool):
    if line_by_line:
        for offsets in _doc_chunks(corpus):
            yield pack_line_by_line(corpus.tokens, offsets, info, length)
        return
    packer = StreamPacker(info, length)
    for offsets in _doc_chunks(corpus):
        if (rows := packer.add(corpus.tokens, offsets)) is not None:
            yield rows
    if (rows := packer.finish()) is not None:
        yield rows


def _materialize(stream: DocumentStream, tokenizer, info: TokenizerInfo, args: DataArgs, seed: int, split: str,
                 num_shards: int, process_index: int, process_count: int,
                 only_shards: list[int] | None = None) -> ShardedRows | None:
    """This process's shards of ``stream`` (or ``only_shards`` of them: a `prepare` worker's) as packed
    rows, from the cache or built into it."""
    cache_dir = resolve_cache_dir(args)  # with --cache_dir on a URL: its local mirror (flax_bert.data.shared_cache)
    shared = args.cache_dir if storage.is_url(args.cache_dir) else None
    nsp = args.objective == "mlm+nsp"
    shards = owned_shards(num_shards, process_index, process_count) if only_shards is None else only_shards
    token_keys = {s: tokenized_cache_key(info, stream, nsp, s, num_shards) for s in shards}
    folders = {s: cache_dir / "packed" / _packed_cache_key(token_keys[s], args, seed) for s in shards}
    if shared and not args.overwrite_cache:
        shared_cache.fetch(shared, cache_dir, [folders[s] for s in shards])
    missing = [s for s in shards if args.overwrite_cache or not (folders[s] / "meta.json").is_file()]
    if not missing and only_shards is None:
        logger.info("found the prepared %s data (%s, %d shard%s of %d) in %s: nothing to tokenize", split, stream.name,
                    len(shards), "" if len(shards) == 1 else "s", num_shards, cache_dir / "packed")
    if missing:
        if shared and not args.overwrite_cache:  # packed with other settings, the same tokens
            shared_cache.fetch(shared, cache_dir, [cache_dir / "tokenized" / token_keys[s] for s in missing])
        fresh = [cache_dir / "tokenized" / token_keys[s] for s in missing]
        fresh = [folder for folder in fresh if args.overwrite_cache or not (folder / "meta.json").is_file()]
        corpora = tokenize_shards_to_cache(stream, tokenizer, info, cache_dir, missing, num_shards, sentences=nsp,
                                           num_workers=args.preprocessing_num_workers, overwrite=args.overwrite_cache)
        try:
            for shard in missing:
                _pack_to_cache(corpora[shard], folders[shard], stream, info, args, seed, split, shard, num_shards)
        except DataError:
            # bad input leaves nothing behind: not the rows of the shards before it, not the token cache
            for folder in fresh + [folders[s] for s in missing]:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        if shared:
            shared_cache.publish(shared, cache_dir, [cache_dir / "tokenized" / token_keys[s] for s in missing]
                                 + [folders[s] for s in missing], replace=args.overwrite_cache)
    loaded = {s: _load_rows(folders[s], info.pad_id) for s in shards}
    _log_document_stats(stream.name, [folders[s] for s in shards], process_count)
    if num_shards == 1 and loaded[0] is None:
        logger.warning("the validation split (%s) is empty: no evaluation", stream.name)
        return None
    return ShardedRows({s: rows for s, rows in loaded.items() if rows is not None}, num_shards, process_index,
                       process_count, args.max_seq_length, info.pad_id, nsp)


def _pack_to_cache(corpus: TokenizedCorpus, folder: pathlib.Path, stream: DocumentStream, info: TokenizerInfo,
                   args: DataArgs, seed: int, split: str, shard: int, num_shards: int) -> None:
    nsp, length = args.objective == "mlm+nsp", args.max_seq_length
    name = stream.name if num_shards == 1 else f"{stream.name}, shard {shard} of {num_shards}"
    if corpus.num_units == 0:
        if split == "validation":
            _write_rows(folder, 0, length, [], args.overwrite_cache, _corpus_stats(corpus))  # later runs skip it
            return
        hint = "add text" if num_shards == 1 else "add text or lower --data_shards"
        raise DataError(f"the {split} corpus ({name}) has no text: {hint}")
    wrapped_total = corpus.num_tokens + corpus.num_units * (len(info.prefix) + len(info.suffix))
    if num_shards == 1 and split == "train" and not args.line_by_line and not nsp and wrapped_total < length:
        raise DataError(f"the {split} corpus ({name}) has {wrapped_total} tokens, less than one row of "
                        f"max_seq_length={length}: add text or lower --max_seq_length")
    if nsp:
        rows = build_nsp_rows(corpus, info, length, seed=seed, short_seq_prob=args.short_seq_prob, shard=shard)
        if not len(rows["input_ids"]):
            raise DataError(f"the {split} corpus ({name}) gave no sentence pairs: add text")
        _write_rows(folder, len(rows["input_ids"]), length, [rows], args.overwrite_cache, _corpus_stats(corpus))
    else:
        count = corpus.num_units if args.line_by_line else packed_row_count(corpus.unit_offsets, info, length)
        _write_rows(folder, count, length, _packed_chunks(corpus, info, length, args.line_by_line),
                    args.overwrite_cache, _corpus_stats(corpus))


def _corpus_stats(corpus: TokenizedCorpus) -> dict:
    documents = corpus.num_units if corpus.doc_units is None else len(corpus.doc_units) - 1
    return {"documents": int(documents), "text_tokens": corpus.num_tokens}


def _log_document_stats(name: str, folders: list[pathlib.Path], process_count: int) -> None:
    """How many documents the rows came from and their mean length: a surprise (a whole file read as one
    document, or every word as one) shows at once."""
    metas = [json.loads((folder / "meta.json").read_text()) for folder in folders]
    if not metas or any("documents" not in meta for meta in metas):
        return  # a cache written before these counts were kept
    documents, tokens = sum(m["documents"] for m in metas), sum(m["text_tokens"] for m in metas)
    rows = sum(m["rows"] for m in metas)
    where = "" if process_count == 1 else " (this process's shards)"
    logger.info("%s%s: %d documents, mean length %.1f tokens, in %d rows", name, where, documents,
                tokens / max(documents, 1), rows)


def build_datasets(args: DataArgs, tokenizer, seed: int = 0, process_index: int | None = None,
                   process_count: int | None = None, splits: tuple[str, ...] = ("train", "validation")):
    """(train_rows, eval_rows or None) of this process: ``ShardedRows`` (cached on disk; only this
    process's ``args.data_shards`` shards are tokenized) or, with ``args.streaming``, ``StreamingRows``.
    Both have ``.iterator(global_batch_size, seed=...)``, ``.eval_batches`` and ``.empty_batch``.
    ``seed`` only matters for NSP pairs (drawn once and cached); batch order takes its seed from
    ``.iterator``. The process layout defaults to JAX's. ``splits`` without "train": the training rows are
    neither built nor read (None), e.g. to evaluate only."""
    process_index, process_count = _process_layout(process_index, process_count)
    info = tokenizer_info(tokenizer)
    if args.objective not in ("mlm", "mlm+nsp"):
        raise DataError(f"unknown objective {args.objective!r}: use 'mlm' or 'mlm+nsp'")
    room = args.max_seq_length - len(info.prefix) - len(info.suffix)
    if room < 1:
        raise DataError(f"max_seq_length={args.max_seq_length} leaves no room for text between the special "
                        f"tokens: raise --max_seq_length")
    train_stream, eval_stream = document_streams(args)
    if args.streaming:
        if args.objective != "mlm":
            raise DataError("objective 'mlm+nsp' needs the cached (map-style) pipeline: drop --streaming")
        layout = (process_index, process_count)
        return (StreamingRows(train_stream, tokenizer, info, args, *layout),
                StreamingRows(eval_stream, tokenizer, info, args, *layout) if eval_stream else None)
    num_shards = args.data_shards or 1
    check_data_shards(num_shards, process_count)
    layout = (num_shards, process_index, process_count)
    train = _materialize(train_stream, tokenizer, info, args, seed, "train", *layout) if "train" in splits else None
    evaluation = (_materialize(eval_stream, tokenizer, info, args, seed, "validation", validation_shards(process_count),
                               process_index, process_count) if eval_stream else None)
    return train, evaluation


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise InputError(f"process_index {process_index} is outside 0..{process_count - 1}")
    return process_index, process_count
