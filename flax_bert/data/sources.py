"""Where the text comes from: a Hugging Face hub dataset, local files, or the built-in corpus.

Every source becomes a :class:`DocumentStream`: a deterministic sequence of documents (strings),
read in batches, plus a fingerprint that changes whenever the text could have changed. The
fingerprint is cheap (file size and mtime, the dataset's own fingerprint, the corpus hash), so a
second run finds its tokenized cache without reading the text again.

Document rules:
  * ``.txt`` / ``.raw`` / ``.text`` files: every non-blank line is one document, as in the old
    ``run_mlm_flax.py`` and transformers' ``run_mlm`` (one sentence, record or sequence per line).
    With ``blank_line_documents`` a document is a block of consecutive non-blank lines and blank
    (whitespace-only) lines separate documents: the layout of BERT's ``create_pretraining_data``
    input (one sentence per line, blank line between documents), which sentence pairs need.
  * json/jsonl, csv, parquet and hub datasets: one row's ``text_column`` is one document.
  * the built-in corpus: one docstring or pydoc topic is one document.
Validation split when none is given: document i goes to validation when ``i % 100 <
validation_split_percentage`` (spread over the whole corpus, and the same rule works for streams).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Callable, Iterator

from flax_bert import storage
from flax_bert.data.cursors import (Cursor, DataError, DataFileNotFoundError, DatasetCursor, LineFileCursor,  # noqa: F401
                                    SelectCursor, SkippingCursor, _decode_line)


logger = logging.getLogger(__name__)

READ_BATCH = 1000  # documents per batch handed to the tokenizer
TEXT_SUFFIXES = {".txt": "text", ".raw": "text", ".text": "text"}
TABLE_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclasses.dataclass
class DataArgs:
    """Data flags, named as in Hugging Face's ``run_mlm_flax.py`` where it had them."""

    dataset_name: str | None = None  # hub dataset; none and no train_file -> built-in corpus
    dataset_config_name: str | None = None
    train_file: str | None = None  # .txt/.raw, .json/.jsonl, .csv, .parquet
    validation_file: str | None = None
    text_column: str = "text"
    validation_split_percentage: int = 5  # carved from train when there is no validation split
    max_seq_length: int = 128
    line_by_line: bool = False  # one document per row (truncated) instead of packing
    pad_to_max_length: bool = True  # accepted for compatibility: rows are always max_seq_length (static shapes)
    preprocessing_num_workers: int | None = None  # tokenizer threads; None = all cores
    streaming: bool = False  # tokenize on the fly, never hold the corpus on disk or in memory
    shuffle_buffer_size: int = 10_000  # documents, streaming mode only
    cache_dir: str | None = None  # default $FLAX_BERT_CACHE or ~/.cache/flax_bert
    overwrite_cache: bool = False
    skip_invalid_utf8: bool = False  # drop undecodable bytes (counted) instead of stopping
    max_train_samples: int | None = None  # first N training documents
    max_eval_samples: int | None = None  # first N validation documents
    objective: str = "mlm"  # "mlm" or "mlm+nsp" (BERT sentence pairs)
    short_seq_prob: float = 0.1  # NSP: share of pairs with a shorter random target length (BERT's default)
    data_shards: int | None = None  # logical shards (document i -> shard i % data_shards); None = 1
    blank_line_documents: bool | None = None  # .txt: blocks of lines ended by a blank line; False: one line, one
    # document; None: blocks for mlm+nsp (sentence pairs need documents of several sentences), lines otherwise
    token: str | None = dataclasses.field(default=None, repr=False)  # Hub token for private datasets; never saved


@dataclasses.dataclass
class DocumentStream:
    """Documents of one split, in a fixed order. ``batches()`` may be called many times."""

    name: str  # for messages
    fingerprint: str
    read: Callable[[], Iterator[list[str]]]
    streamable: bool = True
    # A streamed source made of several files may hand each process of a multi-host run its own files:
    # (process_index, process_count) -> that process's documents, or None when it cannot.
    split_by_files: Callable[[int, int], "DocumentStream | None"] | None = None
    # The same documents one at a time from a saved position (None: the start), without reading what
    # comes before it (flax_bert.data.cursors); None when the source cannot seek.
    open_cursor: Callable[[dict | None], Cursor] | None = None

    def batches(self) -> Iterator[list[str]]:
        return self.read()

    def cursor(self, position: dict | None = None) -> Cursor:
        return self.open_cursor(position) if self.open_cursor else SkippingCursor(self, position)

    def files_of_process(self, process_index: int, process_count: int) -> "DocumentStream | None":
        """This process's own files of the stream (it never reads the others'), or None."""
        return self.split_by_files(process_index, process_count) if self.split_by_files else None


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read_text_file(path: pathlib.Path, one_line_documents: bool, skip_invalid_utf8: bool) -> Iterator[list[str]]:
    yield from _batched(LineFileCursor(path, "lines" if one_line_documents else "blocks", skip_invalid_utf8))


def _batched(documents) -> Iterator[list[str]]:
    batch = []
    for text in documents:
        batch.append(text)
        if len(batch) >= READ_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_utf8_stream(path: pathlib.Path) -> int | None:
    """Byte offset of the first invalid UTF-8 byte, or None (chunked: never loads the whole file)."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with storage.open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            pending = len(decoder.getstate()[0])  # bytes of a split character carried from the last chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                return offset - pending + err.start
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return offset - len(decoder.getstate()[0])
    return None


def _cleaned_copy_path(path, cache_dir: pathlib.Path) -> pathlib.Path:
    size, version = storage.stat(path)
    return cache_dir / "utf8_clean" / f"{_hash(str(path), size, version)}{storage.suffix(path)}"


def _cleaned_copy(path: pathlib.Path, cache_dir: pathlib.Path) -> pathlib.Path:
    """A UTF-8-clean copy of a json/csv file (bad bytes dropped), for --skip_invalid_utf8. It appears whole
    or not at all (a resumed stream reads it as the data), so one already there is complete and kept."""
    target = _cleaned_copy_path(path, cache_dir)
    if target.is_file():
        return target
    raw = storage.read_bytes(path)
    text, skipped = _decode_line(raw, path, 0, skip=True)
    logger.warning("skipped %d invalid UTF-8 bytes in %s (--skip_invalid_utf8)", skipped, path)
    with storage.replaced_atomically(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return target


def _check_text_column(dataset, text_column: str, name: str) -> None:
    columns = dataset.column_names
    if columns is None:  # a stream whose features are unknown until the first row
        first = next(iter(dataset), None)
        columns = list(first) if first else []
    if text_column not in columns:
        raise DataError(f"{name} has no column {text_column!r} (columns: {', '.join(columns)}): "
                        f"pass --text_column with one of them")


def _dataset_cursor(dataset, text_column: str, name: str, position: dict | None) -> DatasetCursor:
    if position is None:  # a resumed stream had its column checked when it started
        _check_text_column(dataset, text_column, name)
    return DatasetCursor(dataset, text_column, name, position)


def _text_batches_from_dataset(dataset, text_column: str, name: str) -> Iterator[list[str]]:
    _check_text_column(dataset, text_column, name)
    for rows in dataset.select_columns([text_column]).iter(batch_size=READ_BATCH):
        batch = [t.strip() for t in rows[text_column] if isinstance(t, str) and t.strip()]
        if batch:
            yield batch


def file_documents(path: str | os.PathLike, args: DataArgs) -> DocumentStream:
    """A local file or a URL (flax_bert.storage) as documents; raises at once on a missing, empty or
    unsupported file."""
    path = storage.absolute(path) if storage.is_url(path) else pathlib.Path(path).expanduser()
    if not storage.isfile(path):
        raise DataFileNotFoundError(f"data file {path} does not exist: check --train_file/--validation_file")
    size, version = storage.stat(path)  # a URL's version: its etag, generation or mtime
    if size == 0:
        raise DataError(f"data file {path} is empty: point --train_file/--validation_file at a file with text")
    suffix = storage.suffix(path).lower()
    blocks = args.objective == "mlm+nsp" if args.blank_line_documents is None else args.blank_line_documents
    one_line_documents = not blocks
    fingerprint = _hash("file", path if storage.is_url(path) else str(path.resolve()), size, version, args.text_column,
                        one_line_documents, args.skip_invalid_utf8)
    if suffix in TEXT_SUFFIXES:
        kind = "lines" if one_line_documents else "blocks"
        return DocumentStream(str(path), fingerprint,
                              lambda: _read_text_file(path, one_line_documents, args.skip_invalid_utf8),
                              open_cursor=lambda position: LineFileCursor(path, kind, args.skip_invalid_utf8, position))
    if suffix not in TABLE_SUFFIXES:
        supported = ", ".join(sorted({**TEXT_SUFFIXES, **TABLE_SUFFIXES}))
        raise DataError(f"data file {path} has an unsupported extension {suffix!r}: use one of {supported}")

    def load(resumed: bool = False):
        source = path
        if storage.is_url(path) and not args.streaming:  # datasets would download it too; this works offline
            source = storage.local_copy(path, resolve_cache_dir(args) / "downloads")
        cleaned = _cleaned_copy_path(path, resolve_cache_dir(args)) if args.skip_invalid_utf8 else None
        if suffix != ".parquet" and cleaned is not None and cleaned.is_file():  # whole: written atomically
            source = cleaned
        elif suffix != ".parquet" and (not resumed or args.skip_invalid_utf8):
            # a resumed stream's file was checked when the run started; with --skip_invalid_utf8 a copy
            # that is missing (never made, or lost to a kill) is made again, not replaced by the raw file
            bad_offset = _check_utf8_stream(source)
            if bad_offset is not None:
                if not args.skip_invalid_utf8:
                    raise DataError(
                        f"{path} is not valid UTF-8 (byte offset {bad_offset}): re-encode it as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8) or pass --skip_invalid_utf8 to drop bad bytes"
                    )
                source = _cleaned_copy(path, resolve_cache_dir(args))
        import datasets

        try:
            table = datasets.load_dataset(TABLE_SUFFIXES[suffix], data_files={"train": str(source)}, split="train",
                                          streaming=args.streaming)
        except Exception as err:  # the builders' errors are long and nested; keep the first line
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f"cannot read {path} as {suffix[1:]} ({reason}): fix the file or its extension") from err
        return table

    def read():
        yield from _text_batches_from_dataset(load(), args.text_column, str(path))

    def open_cursor(position):
        return _dataset_cursor(load(resumed=position is not None), args.text_column, str(path), position)

    return DocumentStream(str(path), fingerprint, read, open_cursor=open_cursor if args.streaming else None)


def hub_documents(args: DataArgs) -> tuple[DocumentStream, DocumentStream | None]:
    """(train, validation or None) from ``datasets.load_dataset(dataset_name, dataset_config_name)``."""
    import datasets

    label = args.dataset_name + (f"/{args.dataset_config_name}" if args.dataset_config_name else "")
    try:
        # --cache_dir also holds the downloaded dataset, as in the old script (unset: datasets' own cache)
        splits = datasets.load_dataset(args.dataset_name, args.dataset_config_name, streaming=args.streaming,
                                       cache_dir=str(resolve_cache_dir(args)) if storage.is_url(args.cache_dir) else args.cache_dir,
                                       token=args.token)
    except ConnectionError as err:
        raise DataError(
            f"cannot download dataset {label!r}: there is no network ({type(err).__name__}); "
            f"use --train_file with a local copy, or omit the dataset to train on the built-in corpus"
        ) from None
    except FileNotFoundError as err:
        raise DataError(f"dataset {label!r} was not found ({str(err).splitlines()[0]}): "
                        f"check --dataset_name/--dataset_config_name") from None
    if "train" not in splits:
        raise DataError(f"dataset {label!r} has no 'train' split (splits: {', '.join(splits)}): "
                        f"pick another dataset or config")

    def stream(split):
        table = splits[split]
        token = getattr(table, "_fingerprint", None) or "stream"
        name = f"{label}[{split}]"

        def split_by_files(process_index: int, process_count: int) -> DocumentStream | None:
            if table.num_shards % process_count:  # datasets would read every file and skip rows: no gain
                return None
            from datasets.distributed import split_dataset_by_node

            own = split_dataset_by_node(table, rank=process_index, world_size=process_count)
            return DocumentStream(f"{name} (files of process {process_index} of {process_count})",
                                  _hash("hub", label, split, token, args.text_column, process_index, process_count),
                                  lambda: _text_batches_from_dataset(own, args.text_column, name),
                                  open_cursor=lambda position: _dataset_cursor(own, args.text_column, name, position))

        return DocumentStream(name, _hash("hub", label, split, token, args.text_column),
                              lambda: _text_batches_from_dataset(table, args.text_column, name),
                              split_by_files=split_by_files if args.streaming else None,
                              open_cursor=(lambda position: _dataset_cursor(table, args.text_column, name, position))
                              if args.streaming else None)

    validation = "validation" if "validation" in splits else None
    return stream("train"), (stream(validation) if validation else None)


def builtin_documents(args: DataArgs) -> DocumentStream:
    from flax_bert.data import corpus
    path = corpus.builtin_corpus_path(args.cache_dir)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:24]

    def read():
        yield from _batched(LineFileCursor(path, "jsonl"))

    return DocumentStream("built-in corpus", _hash("builtin", digest), read,
                          open_cursor=lambda position: LineFileCursor(path, "jsonl", position=position,
                                                                      name="built-in corpus"))


def _select(stream: DocumentStream, role: str, percentage: int, limit: int | None) -> DocumentStream:
    """Carves train or validation out of one stream (i % 100 < percentage -> validation), then keeps
    the first ``limit`` documents."""

    def read():  # the cursor a resumed stream opens, from the start
        yield from _batched(SelectCursor(stream.cursor, role, percentage, limit))

    def split_by_files(process_index: int, process_count: int) -> DocumentStream | None:
        own = stream.files_of_process(process_index, process_count)
        # "the first N documents" is a statement about the whole stream: then keep reading all of it
        return _select(own, role, percentage, None) if own is not None and limit is None else None

    return DocumentStream(f"{stream.name} ({role})", _hash(stream.fingerprint, role, percentage, limit), read,
                          split_by_files=split_by_files if stream.split_by_files else None,
                          open_cursor=lambda position: SelectCursor(stream.cursor, role, percentage, limit, position))


def resolve_cache_dir(args: DataArgs) -> pathlib.Path:
    from flax_bert.storage import default_cache_dir

    if storage.is_url(args.cache_dir):  # a shared store: read through a local mirror (flax_bert.data.shared_cache)
        return storage.mirror(args.cache_dir)
    return pathlib.Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()


def document_streams(args: DataArgs) -> tuple[DocumentStream, DocumentStream | None]:
    """(train, validation) document streams for ``args``; validation is None when there is none and
    ``validation_split_percentage`` is 0."""
    if args.dataset_name and args.train_file:
        raise DataError("both --dataset_name and --train_file were given: pass only one of them")
    if not 0 <= args.validation_split_percentage < 100:
        raise DataError(f"--validation_split_percentage={args.validation_split_percentage} is out of range: use 0..99")
    if args.dataset_name:
        train, validation = hub_documents(args)
    elif args.train_file:
        train = file_documents(args.train_file, args)
        validation = None
    else:
        train, validation = builtin_documents(args), None
    if args.validation_file:
        validation = file_documents(args.validation_file, args)
    pct = args.validation_split_percentage
    if validation is None:
        carved = _select(train, "validation", pct, args.max_eval_samples) if pct > 0 else None
        train = _select(train, "train", pct, args.max_train_samples)
        return train, carved
    return (_select(train, "all", 0, args.max_train_samples),
            _select(validation, "all", 0, args.max_eval_samples))


def training_documents(args: DataArgs) -> DocumentStream:
    return document_streams(args)[0]
