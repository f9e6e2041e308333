"""Host-side data pipeline: sources -> tokenized cache -> packed rows -> per-process shuffled batches.

    train_rows, eval_rows = build_datasets(DataArgs(...), tokenizer, seed=seed)
    batches = Prefetcher(train_rows.iterator(global_batch_size, seed=seed))
    local = next(batches)                       # dict of numpy arrays, this process's rows
    batch = make_global_batch(local, mesh, PartitionSpec("data"))
    state = batches.state_dict()                # {"epoch": e, "position": next global row}

Batch dict (numpy, [B, L] unless noted, B = this process's share of the global batch):
  input_ids int32, segment_ids int32 (0 = padding, 1..n = document in the row), word_starts bool,
  and for objective "mlm+nsp": token_type_ids int32, next_sentence_label int32 [B] (0 next, 1 random).
Order: epoch e visits rows in ``default_rng([seed, e]).permutation``; global batch b is rows
[b*G, (b+1)*G) of it and process p takes the slice [p*G/P, (p+1)*G/P) of that. The last batch of an
epoch is filled up with empty rows (all padding, segment 0) so shapes stay static and no row is lost.
Host-side only: nothing here imports the model.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import tempfile

import numpy as np

from flax_bert.data_iterators import BatchIterator, Prefetcher, StreamingBatchIterator, make_global_batch
from flax_bert.data_nsp import build_nsp_rows
from flax_bert.data_packing import StreamPacker, pack_line_by_line, packed_row_count
from flax_bert.data_sources import DataArgs, DataError, DocumentStream, document_streams, resolve_cache_dir
from flax_bert.data_tokenize import (CACHE_VERSION, TokenizedCorpus, TokenizerInfo, tokenize_to_cache,
                                     tokenized_cache_key, tokenizer_info)

__all__ = ["DataArgs", "DataError", "PackedRows", "StreamingRows", "BatchIterator", "StreamingBatchIterator",
           "Prefetcher", "build_datasets", "check_tokenizer_fits", "make_global_batch", "tokenizer_info"]

logger = logging.getLogger(__name__)
_PACK_CHUNK_TOKENS = 1 << 22  # documents are packed this many tokens at a time (bounded memory)


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

    def iterator(self, global_batch_size: int, *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = False, process_index: int | None = None,
                 process_count: int | None = None) -> BatchIterator:
        """Training: the defaults (shuffled, endless). Evaluation: ``shuffle=False, num_epochs=1``."""
        return BatchIterator(self, global_batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                             drop_remainder=drop_remainder, process_index=process_index,
                             process_count=process_count)


class StreamingRows:
    """Rows made on the fly from a document stream (``--streaming``): nothing is cached."""

    def __init__(self, stream: DocumentStream, tokenizer, info: TokenizerInfo, args: DataArgs):
        self.stream, self.tokenizer, self.info, self.args = stream, tokenizer, info, args

    def iterator(self, global_batch_size: int, *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = False, process_index: int | None = None,
                 process_count: int | None = None) -> StreamingBatchIterator:
        return StreamingBatchIterator(self, global_batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                                      drop_remainder=drop_remainder, process_index=process_index,
                                      process_count=process_count)


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


def _load_rows(folder: pathlib.Path, pad_id: int) -> PackedRows:
    names = json.loads((folder / "meta.json").read_text())["arrays"]
    return PackedRows({name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in names}, pad_id)


def _write_rows(folder: pathlib.Path, row_count: int, length: int, chunks) -> None:
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
        (staging / "meta.json").write_text(json.dumps({"arrays": sorted(files), "rows": row_count, "length": length}))
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
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


def _materialize(stream: DocumentStream, tokenizer, info: TokenizerInfo, args: DataArgs, seed: int,
                 split: str) -> PackedRows | None:
    cache_dir = resolve_cache_dir(args)
    nsp = args.objective == "mlm+nsp"
    key = _packed_cache_key(tokenized_cache_key(info, stream, nsp), args, seed)
    folder = cache_dir / "packed" / key
    if (folder / "meta.json").is_file() and not args.overwrite_cache:
        return _load_rows(folder, info.pad_id)
    tokenized_folder = cache_dir / "tokenized" / tokenized_cache_key(info, stream, nsp)
    fresh = args.overwrite_cache or not (tokenized_folder / "meta.json").is_file()
    corpus = tokenize_to_cache(stream, tokenizer, info, cache_dir, sentences=nsp,
                               num_workers=args.preprocessing_num_workers, overwrite=args.overwrite_cache)
    try:
        return _pack_to_cache(corpus, folder, stream, info, args, seed, split)
    except DataError:
        if fresh:  # bad input leaves nothing behind, not even the token cache made for it
            shutil.rmtree(tokenized_folder, ignore_errors=True)
        raise


def _pack_to_cache(corpus: TokenizedCorpus, folder: pathlib.Path, stream: DocumentStream, info: TokenizerInfo,
                   args: DataArgs, seed: int, split: str) -> PackedRows | None:
    nsp, length = args.objective == "mlm+nsp", args.max_seq_length
    if split == "validation" and corpus.num_units == 0:
        logger.warning("the validation split (%s) is empty: no evaluation", stream.name)
        return None
    wrapped_total = corpus.num_tokens + corpus.num_units * (len(info.prefix) + len(info.suffix))
    if corpus.num_units == 0 or (split == "train" and not args.line_by_line and not nsp and wrapped_total < length):
        raise DataError(f"the {split} corpus ({stream.name}) has {wrapped_total} tokens, less than one row of "
                        f"max_seq_length={length}: add text or lower --max_seq_length")
    if nsp:
        rows = build_nsp_rows(corpus, info, length, seed=seed, short_seq_prob=args.short_seq_prob)
        if not len(rows["input_ids"]):
            raise DataError(f"the {split} corpus ({stream.name}) gave no sentence pairs: add text")
        _write_rows(folder, len(rows["input_ids"]), length, [rows])
    else:
        count = corpus.num_units if args.line_by_line else packed_row_count(corpus.unit_offsets, info, length)
        _write_rows(folder, count, length, _packed_chunks(corpus, info, length, args.line_by_line))
    return _load_rows(folder, info.pad_id)


def build_datasets(args: DataArgs, tokenizer, seed: int = 0):
    """(train_rows, eval_rows or None): ``PackedRows`` (cached on disk) or, with ``args.streaming``,
    ``StreamingRows``. Both have ``.iterator(global_batch_size, ...)``. ``seed`` only matters for NSP
    pairs (which are drawn once and cached); the batch order takes its seed from ``.iterator``."""
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
        return (StreamingRows(train_stream, tokenizer, info, args),
                StreamingRows(eval_stream, tokenizer, info, args) if eval_stream else None)
    train = _materialize(train_stream, tokenizer, info, args, seed, "train")
    evaluation = _materialize(eval_stream, tokenizer, info, args, seed, "validation") if eval_stream else None
    return train, evaluation
