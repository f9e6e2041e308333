"""Batches of a ``--streaming`` run, and a state that lets a new process continue exactly where one stopped.

Per process: documents (its own files of a dataset made of a multiple of P files, else documents i with
i % P == p) -> seeded shuffle buffer (per process and epoch) -> groups for the tokenizer -> packing (or
one document per row) -> local batches, with the rows left over carried into the next -> epochs (endless
for training, ``num_epochs`` for evaluation; the last batch filled with empty rows).

Before each group goes to the tokenizer the whole pipeline is snapshotted: the source's position
(byte offset or the ``datasets`` state, plus the selection and share indices), the shuffle buffer's
documents and its generator's state, the epoch, the packer's unfinished row and the carried rows. A batch's
state is "the snapshot of the group its rows came from + rows handed out since". Resuming restores the
snapshot, tokenizes that one group again and drops those rows: no document before the snapshot is read.
A snapshot holds the buffer's texts, so its size is about the buffer's (docs/benchmarks.md measures one);
it is taken once per group and shared, never changed, by the states of that group's batches.

Each process has its own snapshot, and only process 0 writes the checkpoint's JSON: a multi-process run
gathers every process's state into it at each save (``states_of_every_process``), and each process
picks its own on resume. A checkpoint from before snapshots (``{"batches": n}``) still resumes, by
replaying n batches of this process's share from the start. The batches depend on P: resume with the
same P.
"""

from __future__ import annotations

import base64
import json
import logging

import numpy as np

from flax_bert.data.iterators import _local_batch_size
from flax_bert.data.packing import StreamPacker, pack_line_by_line
from flax_bert.data.sources import DataError
from flax_bert.data.cursors import ShareCursor
from flax_bert.data.tokenize import _ENCODE_CHARS, _rust_threads, encode_group, fast_backend

logger = logging.getLogger(__name__)

GROUP_CHARS = _ENCODE_CHARS  # a group for the tokenizer: chunks of documents until this many characters
GROUP_CHUNK = 1000  # documents per chunk (a group is a whole number of chunks, the last one of an epoch excepted)


def _encode_array(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def _decode_array(record: dict) -> np.ndarray:
    flat = np.frombuffer(base64.b64decode(record["data"]), np.dtype(record["dtype"]))
    return flat.reshape(record["shape"]).copy()


def _rng_state(rng: np.random.Generator | None) -> dict | None:
    """The generator's state with its 128-bit integers as strings (JSON readers differ on big numbers)."""
    if rng is None:
        return None
    state = rng.bit_generator.state
    return {**state, "state": {k: str(v) for k, v in state["state"].items()}}


def _rng_from(state: dict | None) -> np.random.Generator | None:
    if state is None:
        return None
    rng = np.random.default_rng()
    rng.bit_generator.state = {**state, "state": {k: int(v) for k, v in state["state"].items()}}
    return rng


class _Pipeline:
    """One process's pipeline as explicit state: ``snapshot()`` and ``_Pipeline(..., snapshot)``."""

    def __init__(self, owner: "StreamingBatchIterator", snapshot: dict | None = None, read_on: bool = False):
        self.owner, self.rows, self.args = owner, owner.rows, owner.rows.args
        self.size = self.args.shuffle_buffer_size if owner.shuffle and self.args.shuffle_buffer_size > 1 else 0
        if snapshot is None:
            self._start_epoch(0)
            self.carry = None
            return
        self.epoch, self.documents, self.produced = snapshot["epoch"], snapshot["documents"], snapshot["produced"]
        self.cursor = owner.open_documents(snapshot["source"])
        self.exhausted, self.buffer = snapshot["exhausted"], list(snapshot["buffer"])
        self.rng = _rng_from(snapshot["rng"])
        self.drain = None if snapshot["drain"] is None else snapshot["drain"][::-1]
        self.packer = StreamPacker(self.rows.info, self.args.max_seq_length)
        packer = snapshot["packer"]
        self.packer.carry_ids, self.packer.carry_docs = _decode_array(packer["ids"]), _decode_array(packer["docs"])
        self.packer.next_doc = packer["next_doc"]
        self.carry = None if snapshot["carry"] is None else {k: _decode_array(v) for k, v in snapshot["carry"].items()}
        self.size = snapshot["shuffle_buffer_size"]  # until the snapshot's group is made again (see chunks)
        if read_on:  # the snapshot of a stream packed at another length: pass its group, pack from the next one
            if self._group():
                self.produced += 1  # the group made rows in that stream: an epoch that ends here was not empty
            self.packer, self.carry = StreamPacker(self.rows.info, self.args.max_seq_length), None

    def _use_configured_buffer(self) -> None:
        """--shuffle_buffer_size may change on resume: the new size applies from the first group after the
        restored one. A buffer saved by a shuffling run comes out first, in its order, when this run does
        not shuffle; a run that starts shuffling starts its generator."""
        args = self.args
        size = args.shuffle_buffer_size if self.owner.shuffle and args.shuffle_buffer_size > 1 else 0
        if size == self.size:
            return
        if not size and self.buffer:
            self.drain, self.buffer = self.buffer[::-1] + (self.drain or []), []
        if size and self.rng is None:
            self.rng = np.random.default_rng([self.owner.seed, self.rows.process_index, self.epoch])
        self.size = size

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.documents, self.produced = epoch, 0, 0
        self.cursor, self.exhausted = self.owner.open_documents(None), False
        self.buffer, self.drain = [], None  # drain: the buffer's last documents, once the source is done (reversed)
        self.rng = np.random.default_rng([self.owner.seed, self.rows.process_index, epoch]) if self.size else None
        self.packer = StreamPacker(self.rows.info, self.args.max_seq_length)

    def snapshot(self) -> dict:
        return {"epoch": self.epoch, "source": self.cursor.position(), "where": self.cursor.describe(),
                "documents": self.documents, "exhausted": self.exhausted, "buffer": list(self.buffer),
                "rng": _rng_state(self.rng), "drain": None if self.drain is None else self.drain[::-1],
                "packer": {"ids": _encode_array(self.packer.carry_ids), "docs": _encode_array(self.packer.carry_docs),
                           "next_doc": int(self.packer.next_doc)},
                "carry": None if self.carry is None else {k: _encode_array(v) for k, v in self.carry.items()},
                "produced": self.produced, "shuffle_buffer_size": self.size}

    def _read(self) -> str | None:
        if self.exhausted:
            return None
        text = next(self.cursor, None)
        if text is None:
            self.exhausted = True
        else:
            self.documents += 1
        return text

    def _next_document(self) -> str | None:
        """The shuffle buffer: once full, each new document takes the place of a random one, which comes
        out; when the source is done, what is left comes out in a random order."""
        if not self.size:
            return self.drain.pop() if self.drain else self._read()
        size = self.size
        while self.drain is None:
            text = self._read()
            if text is None:
                self.drain = [self.buffer[slot] for slot in self.rng.permutation(len(self.buffer))][::-1]
                self.buffer = []
                break
            if len(self.buffer) < size:
                self.buffer.append(text)
                continue
            slot = int(self.rng.integers(size))
            text, self.buffer[slot] = self.buffer[slot], text
            return text
        return self.drain.pop() if self.drain else None

    def _group(self) -> list[str]:
        group, chars = [], 0
        while True:
            for _ in range(GROUP_CHUNK):
                text = self._next_document()
                if text is None:
                    return group
                group.append(text)
                chars += len(text)
            if chars >= GROUP_CHARS:
                return group

    def _rows_of(self, group: list[str]):
        rows, args = self.rows, self.args
        backend = rows.info.backend or fast_backend(rows.tokenizer)
        with _rust_threads(args.preprocessing_num_workers):
            ids, lengths, _ = encode_group(backend, group, False)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        if args.line_by_line:
            return pack_line_by_line(ids, offsets, rows.info, args.max_seq_length)
        return self.packer.add(ids, offsets)

    def chunks(self):
        """Yields ``(None, snapshot)`` before each group goes to the tokenizer, ``(rows, None)`` for the rows
        made from it (and from the packer's last row at the end of an epoch)."""
        owner, first = self.owner, True
        while owner.num_epochs is None or self.epoch < owner.num_epochs:
            while True:
                if not first:  # the first group is the restored snapshot's: made again as it was
                    self._use_configured_buffer()
                first = False
                yield None, self.snapshot()
                group = self._group()
                if not group:
                    break
                out = self._rows_of(group)
                if out is not None:
                    self.produced += len(out["input_ids"])
                    yield out, None
            if not self.args.line_by_line and (out := self.packer.finish()) is not None:
                self.produced += len(out["input_ids"])
                yield out, None
            if not self.produced:  # a whole epoch without a row: stop instead of spinning forever
                raise DataError(f"the stream {self.rows.stream.name} gave process {self.rows.process_index} no "
                                f"text: check the dataset and --text_column")
            self._start_epoch(self.epoch + 1)


def states_of_every_process(state: dict) -> dict:
    """This process's stream state and every other one's, for the checkpoint that process 0 writes:
    ``{"batches", "process_count", "processes": [state of process 0, ...]}``. A collective: every process
    calls it at the same save."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return state
    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return {"batches": int(state["batches"]), "process_count": len(lengths),
            "processes": [json.loads(gathered[p, : lengths[p]].tobytes()) for p in range(len(lengths))]}


class StreamingBatchIterator:
    """Batches of ``StreamingRows`` (see the module's docstring). ``state_dict()``: ``{"batches": n,
    "process_count": P, "process_index": p, "snapshot": {...}, "rows_since_snapshot": r}``."""

    def __init__(self, rows, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None):
        self.rows, self.global_batch_size, self.seed = rows, global_batch_size, seed
        self.shuffle, self.num_epochs = shuffle, num_epochs
        self.local_batch_size = _local_batch_size(global_batch_size, rows.process_count)
        self.batches, self._local, self._resume = 0, None, None
        self._continue = None  # a snapshot of another length's stream to read on after (continue_after)
        self._state = {"batches": 0, "process_count": int(rows.process_count)}

    def open_documents(self, position: dict | None):
        """This process's documents from ``position`` (None: the start of an epoch)."""
        stream, process, count = self.rows.stream, self.rows.process_index, self.rows.process_count
        own_files = stream.files_of_process(process, count) if count > 1 else None
        if own_files is not None:  # a dataset of several files: read only this process's files
            return own_files.cursor(position)
        if count == 1:
            return stream.cursor(position)
        return ShareCursor(stream.cursor, process, count, position)

    def state_dict(self) -> dict:
        return self._state  # a new dict after every batch, never changed: safe to hand to another thread

    def load_state_dict(self, state: dict) -> None:
        state = self._own_state(state)
        self.batches, self._local, self._state = int(state["batches"]), None, dict(state)
        snapshot = state.get("snapshot")
        if snapshot is not None and state.get("process_index") == self.rows.process_index:
            self._resume = (snapshot, int(state["rows_since_snapshot"]))
            logger.info("streaming resumes at %s (epoch %d, document %d of this process), shuffle buffer %d "
                        "documents, no replay (tokenizes that one group again and drops its first %d rows)",
                        snapshot["where"], snapshot["epoch"], snapshot["documents"],
                        len(snapshot["buffer"]) + len(snapshot["drain"] or ()), self._resume[1])
        elif self.batches:
            why = ("holds another process's stream position" if snapshot is not None
                   else "holds a batch count only (written before streams saved their position)")
            logger.warning("the checkpoint %s: replaying %d batches of this process's share from the start, "
                           "which reads and tokenizes all of them again", why, self.batches)
            self._resume = None

    def continue_after(self, state: dict) -> None:
        """Read on after the documents another stream of the same source had read at ``state`` (the previous
        phase's, packed at another length): the documents of the group its last batch came from are not read
        again, and that group's rows it had not trained yet, at the old length, are dropped (at most one group
        of documents). No state with a position (a checkpoint from before snapshots): the stream starts over."""
        state = self._own_state(state)
        snapshot = state.get("snapshot")
        if snapshot is None or state.get("process_index") != self.rows.process_index:
            logger.warning("the previous phase's stream position is unknown (no snapshot of this process): this "
                           "phase reads the stream from its start")
            return
        self._continue = snapshot
        logger.info("the stream reads on after the previous phase's documents, packed at %d tokens: its last group "
                    "(from %s, epoch %d) is not read again, and that group's rows it had not trained are dropped",
                    self.rows.args.max_seq_length, snapshot["where"], snapshot["epoch"])

    def _own_state(self, state: dict) -> dict:
        """This process's part of a saved state (a multi-process run gathers every process's at each save)."""
        saved = int(state.get("process_count", 0))
        if saved != self.rows.process_count:
            raise DataError(f"the checkpoint's stream was read by {saved} processes, this run has "
                            f"{self.rows.process_count}: a --streaming run resumes with the same number of processes")
        return state["processes"][self.rows.process_index] if "processes" in state else state

    def _local_batches(self):
        """(local batch, snapshot, rows handed out since it) over this process's epochs."""
        size = self.local_batch_size
        start, skip = self._resume or (None, 0)  # resuming: the rows handed out before the checkpoint
        pipeline = _Pipeline(self, self._continue, read_on=True) if self._continue else _Pipeline(self, start)
        snapshot, since, rows = None, 0, pipeline.carry
        for chunk, new_snapshot in pipeline.chunks():
            if new_snapshot is not None:  # taken with the carried rows: count from them
                snapshot, since = new_snapshot, 0
                continue
            rows = chunk if rows is None else {k: np.concatenate([rows[k], chunk[k]]) for k in chunk}
            if skip:
                drop = min(skip, len(rows["input_ids"]))
                rows, since, skip = {k: v[drop:] for k, v in rows.items()}, since + drop, skip - drop
            full = len(rows["input_ids"]) // size * size
            for first in range(0, full, size):
                since += size
                yield {k: v[first : first + size] for k, v in rows.items()}, snapshot, since
            rows = pipeline.carry = {k: v[full:] for k, v in rows.items()}
        left = 0 if rows is None else len(rows["input_ids"])
        if left and not skip:  # (rows still to skip here: the filled last batch was handed out already)
            filler = self.rows.empty_batch(self.global_batch_size)
            yield {k: np.concatenate([rows[k], filler[k][: size - left]]) for k in rows}, snapshot, since + size

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._local is None:
            self._local = self._local_batches()
            if self._resume is None:
                for _ in range(self.batches):  # a checkpoint without a snapshot: replay to its position
                    next(self._local, None)
        item = next(self._local, None)
        if item is None:
            raise StopIteration
        batch, snapshot, since = item
        self.batches += 1
        self._state = {"batches": self.batches, "process_count": int(self.rows.process_count),
                       "process_index": int(self.rows.process_index), "snapshot": snapshot,
                       "rows_since_snapshot": since}
        return batch
