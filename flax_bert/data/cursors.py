"""Documents of a stream one at a time, with the place after each one: what lets a ``--streaming`` run
continue where it stopped instead of reading (and tokenizing) everything before it again.

A cursor is an iterator of documents. ``position()`` is a small JSON-able dict, the place just after
the last document it returned; ``describe()`` says it in words for the log. Opening a stream's cursor
at a saved position goes straight there:
  * text files and the built-in corpus (jsonl): a byte offset, ``seek`` and read on. A blank-line
    block ends at the blank line that closes it, so a saved offset is always a block boundary.
  * ``datasets`` streams (json/csv/parquet files, hub datasets): ``IterableDataset.state_dict()`` after
    the last row read, restored with ``load_state_dict``. datasets hands out no row before it, but for
    a json or csv file it parses the file from its start up to that row again (not tokenized: that
    is the slow part), and a parquet file's row groups before it are skipped whole.
  * selection (train/validation carve, ``max_train_samples``) and a process's share (document i of P
    processes) add the indices they count to the position of the stream under them.
"""

from __future__ import annotations

import json
import logging
import pathlib

from flax_bert import storage
from flax_bert.errors import InputError, InputFileNotFoundError

logger = logging.getLogger(__name__)


class DataError(InputError):
    """Bad data input; the message is one line naming the problem and the fix."""


class DataFileNotFoundError(DataError, InputFileNotFoundError):
    pass


def _decode_line(raw: bytes, path: pathlib.Path, offset: int, skip: bool) -> tuple[str, int]:
    """Strict UTF-8 decode of one line; returns (text, number of skipped bytes)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as err:
        if not skip:
            raise DataError(
                f"{path} is not valid UTF-8 (byte offset {offset + err.start}): re-encode it as UTF-8 "
                f"(e.g. iconv -f latin1 -t utf-8) or pass --skip_invalid_utf8 to drop bad bytes"
            ) from None
    pieces, skipped, rest = [], 0, raw
    while rest:
        try:
            pieces.append(rest.decode("utf-8"))
            break
        except UnicodeDecodeError as err:
            pieces.append(rest[: err.start].decode("utf-8"))
            skipped += err.end - err.start
            rest = rest[err.end :]
    return "".join(pieces), skipped



class Cursor:
    """Base: a subclass's ``_documents()`` generator updates ``self._position`` before each ``yield``."""

    _position: dict

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if getattr(self, "_generator", None) is None:
            self._generator = self._documents()
        return next(self._generator)

    def _documents(self):
        raise NotImplementedError

    def position(self) -> dict:
        return dict(self._position)

    def describe(self) -> str:
        raise NotImplementedError


class LineFileCursor(Cursor):
    """A file read line by line from a byte offset. ``kind``: "lines" (every non-blank line is a
    document), "blocks" (blank lines separate documents) or "jsonl" (each line's ``"text"``).
    Position: ``{"offset", "documents", "skipped", "size"}`` (documents so far and undecodable bytes
    dropped, so the end-of-file checks and counts are those of a read from the start; the file's size,
    so that an offset into a file that has changed since is refused instead of read mid-line)."""

    def __init__(self, path: pathlib.Path, kind: str, skip_invalid_utf8: bool = False, position: dict | None = None,
                 name: str | None = None):
        self.path, self.kind, self.skip_invalid_utf8, self.name = path, kind, skip_invalid_utf8, name or str(path)
        size = storage.stat(path)[0]
        if position is not None and position.get("size", size) != size:
            raise DataError(f"{self.name} has changed since the checkpoint was saved ({position['size']} bytes then, "
                            f"{size} now): restore the file the run started with, or start a fresh --output_dir")
        self._position = dict(position or {"offset": 0, "documents": 0, "skipped": 0, "size": size})

    def describe(self) -> str:
        return f"{self.name} byte {self._position['offset']}"

    def _documents(self):
        offset, documents, skipped = (self._position[k] for k in ("offset", "documents", "skipped"))
        block = []
        with storage.open(self.path, "rb") as lines:
            lines.seek(offset)
            for raw in lines:
                if self.kind == "jsonl":
                    offset += len(raw)
                    documents += 1
                    self._position = {**self._position, "offset": offset, "documents": documents}
                    yield json.loads(raw)["text"]
                    continue
                text, bad = _decode_line(raw, self.path, offset, self.skip_invalid_utf8)
                offset += len(raw)
                skipped += bad
                text = text.rstrip("\r\n")
                if text.strip():
                    block.append(text)
                    if self.kind == "blocks":
                        continue
                document = "\n".join(block).strip()
                block.clear()
                if document:
                    documents += 1
                    self._position = {**self._position, "offset": offset, "documents": documents, "skipped": skipped}
                    yield document
            document = "\n".join(block).strip()  # the last block, with no blank line after it
            if document:
                documents += 1
                self._position = {**self._position, "offset": offset, "documents": documents, "skipped": skipped}
                yield document
        if skipped:
            logger.warning("skipped %d invalid UTF-8 bytes in %s (--skip_invalid_utf8)", skipped, self.path)
        if documents == 0 and self.kind != "jsonl":
            raise DataError(f"{self.path} has no text (only blank lines): point --train_file/--validation_file "
                            f"at a text file")


class DatasetCursor(Cursor):
    """Rows of a ``datasets`` stream (``IterableDataset``), one at a time, so that its ``state_dict()``
    at any moment covers exactly the rows handed out. Position: ``{"dataset": state, "rows": n}``."""

    def __init__(self, dataset, text_column: str, name: str, position: dict | None = None):
        self.text_column, self.name = text_column, name
        self.dataset = dataset.select_columns([text_column])  # a new object: loading a state leaves `dataset` alone
        self._start = position
        if position is not None and position["dataset"] is not None:
            self.dataset.load_state_dict(position["dataset"])
        self._rows = position["rows"] if position else 0
        self._started = False

    def position(self) -> dict:
        if not self._started:  # datasets has no state for an iteration that has not begun
            return dict(self._start) if self._start else {"dataset": None, "rows": 0}
        return {"dataset": self.dataset.state_dict(), "rows": self._rows}

    def describe(self) -> str:
        return f"{self.name} row {self._rows}"

    def _documents(self):
        self._started = True
        for row in self.dataset:
            self._rows += 1
            text = row[self.text_column]
            if isinstance(text, str) and text.strip():
                yield text.strip()


class SkippingCursor(Cursor):
    """For a stream that cannot seek: reads from the start and drops the documents before the position
    (read again, never tokenized). Position: ``{"documents": n}``."""

    def __init__(self, stream, position: dict | None = None):
        self.stream, self._position = stream, dict(position or {"documents": 0})

    def describe(self) -> str:
        return f"{self.stream.name} document {self._position['documents']}"

    def _documents(self):
        skip, count = self._position["documents"], 0
        if skip:
            logger.warning("%s cannot seek: reading its first %d documents again to reach the saved position",
                           self.stream.name, skip)
        for batch in self.stream.batches():
            for text in batch:
                count += 1
                if count > skip:
                    self._position = {"documents": count}
                    yield text


class SelectCursor(Cursor):
    """Train/validation carve (document i goes to validation when i % 100 < percentage) and the first
    ``limit`` documents, over another cursor. Position: ``{"inner", "index", "kept"}``."""

    def __init__(self, open_inner, role: str, percentage: int, limit: int | None, position: dict | None = None):
        position = position or {"inner": None, "index": 0, "kept": 0}
        self.inner = open_inner(position["inner"])
        self.role, self.percentage, self.limit = role, percentage, limit
        self.index, self.kept = position["index"], position["kept"]

    def position(self) -> dict:
        return {"inner": self.inner.position(), "index": self.index, "kept": self.kept}

    def describe(self) -> str:
        return self.inner.describe()

    def __next__(self) -> str:
        if self.limit is not None and self.kept >= self.limit:
            raise StopIteration
        for text in self.inner:
            index, self.index = self.index, self.index + 1
            if self.role == "all" or ((index % 100 < self.percentage) == (self.role == "validation")):
                self.kept += 1
                return text
        raise StopIteration


class ShareCursor(Cursor):
    """Process ``process`` of ``count``: documents i with i % count == process. Position: ``{"inner", "index"}``."""

    def __init__(self, open_inner, process: int, count: int, position: dict | None = None):
        position = position or {"inner": None, "index": 0}
        self.inner, self.index = open_inner(position["inner"]), position["index"]
        self.process, self.count = process, count

    def position(self) -> dict:
        return {"inner": self.inner.position(), "index": self.index}

    def describe(self) -> str:
        return self.inner.describe()

    def __next__(self) -> str:
        for text in self.inner:
            index, self.index = self.index, self.index + 1
            if index % self.count == self.process:
                return text
        raise StopIteration
