"""Batch order, per-process shares, resumable state, background prefetch, global arrays.

State is ``{"epoch": e, "position": r}``: r is the first global row (in epoch e's order) of the next
global batch. It is the same on every process, so one copy in the checkpoint restores all of them.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time

import numpy as np

from flax_bert.data_packing import StreamPacker, pack_line_by_line
from flax_bert.data_sources import DataError, DocumentStream
from flax_bert.data_tokenize import fast_backend, iter_encoded

# jax is imported inside the functions that need it: the tokenizer tools and tests of the host
# pipeline should not pay for (or depend on) starting JAX.


def _process_layout(global_batch_size: int, process_index: int | None, process_count: int | None):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} does not split over {process_count} processes: "
                         f"use a per-device batch size that gives a multiple of {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    return process_index, process_count, global_batch_size // process_count


ROW_LOG_VARIABLE = "FLAX_BERT_LOG_ROWS"


def _row_log_path(process_index: int) -> str | None:
    """Opt-in debug record (tests of multi-process runs): with FLAX_BERT_LOG_ROWS=PREFIX every batch
    appends the global row indices this process read to PREFIX.process<N>.jsonl, so a test can prove
    each process touched only its own share."""
    prefix = os.environ.get(ROW_LOG_VARIABLE)
    return f"{prefix}.process{process_index}.jsonl" if prefix else None


class _ShareIterator:
    """What both iterators hold: the rows, the global batch, the order settings and this process's share."""

    def __init__(self, rows, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = False,
                 process_index: int | None = None, process_count: int | None = None):
        self.rows, self.global_batch_size, self.seed = rows, global_batch_size, seed
        self.shuffle, self.num_epochs, self.drop_remainder = shuffle, num_epochs, drop_remainder
        self.process_index, self.process_count, self.local_batch_size = _process_layout(
            global_batch_size, process_index, process_count)
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "position": int(self.position)}


class BatchIterator(_ShareIterator):
    """Endless (``num_epochs=None``) or finite iterator over this process's share of global batches."""

    def __init__(self, rows, global_batch_size: int, **settings):
        super().__init__(rows, global_batch_size, **settings)
        if self.drop_remainder and len(rows) < global_batch_size:
            raise ValueError(f"{len(rows)} rows make no full global batch of {global_batch_size}: "
                             f"lower the batch size, add data or keep the last partial batch")
        self._order_epoch, self._order = None, None
        self._row_log = _row_log_path(self.process_index)

    @property
    def steps_per_epoch(self) -> int:
        count = len(self.rows)
        return count // self.global_batch_size if self.drop_remainder else -(-count // self.global_batch_size)

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= int(state["position"]) <= len(self.rows):
            raise ValueError(f"iterator position {state['position']} is beyond the {len(self.rows)} rows of this "
                             f"dataset: the data changed since the checkpoint; resume with the same data")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            count = len(self.rows)
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(count) if self.shuffle
                           else np.arange(count))
            self._order_epoch = epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        last_start = len(self.rows) - (self.global_batch_size if self.drop_remainder else 1)
        if self.position > last_start:
            self.epoch, self.position = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        start = self.position + self.process_index * self.local_batch_size
        share = self.epoch_order(self.epoch)[start : start + self.local_batch_size]
        indices = np.full(self.local_batch_size, -1, np.int64)  # -1: an empty row filling the last batch
        indices[: len(share)] = share
        if self._row_log:
            with open(self._row_log, "a") as log:
                log.write(json.dumps({"epoch": int(self.epoch), "position": int(self.position),
                                      "rows": [int(i) for i in share]}) + "\n")
        self.position += self.global_batch_size
        return self.rows.gather(indices)


class StreamingBatchIterator(_ShareIterator):
    """Like BatchIterator for ``StreamingRows``: documents pass a seeded shuffle buffer (per epoch),
    are tokenized and packed on the fly; every process reads the stream and keeps its slice of each
    global batch (equal batch counts on all hosts, one shared state). Restoring replays the epoch up
    to the saved position, which costs tokenizing that part again."""

    def __init__(self, rows, global_batch_size: int, **settings):
        super().__init__(rows, global_batch_size, **settings)
        self._batches = None

    def load_state_dict(self, state: dict) -> None:
        if int(state["position"]) % self.global_batch_size:
            raise ValueError(f"streaming position {state['position']} is not a multiple of the global batch "
                             f"{self.global_batch_size}: resume with the batch size of the checkpoint")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = None

    def _shuffled_documents(self, epoch: int):
        documents = (text for batch in self.rows.stream.batches() for text in batch)
        size = self.rows.args.shuffle_buffer_size
        if not self.shuffle or size <= 1:
            yield from documents
            return
        rng, buffer = np.random.default_rng([self.seed, epoch]), []
        for text in documents:
            if len(buffer) < size:
                buffer.append(text)
                continue
            slot = int(rng.integers(size))
            yield buffer[slot]
            buffer[slot] = text
        for slot in rng.permutation(len(buffer)):
            yield buffer[slot]

    def _epoch_rows(self, epoch: int):
        rows, args = self.rows, self.rows.args
        documents = self._shuffled_documents(epoch)

        def in_batches():
            chunk = []
            for text in documents:
                chunk.append(text)
                if len(chunk) >= 1000:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

        shuffled = DocumentStream(rows.stream.name, rows.stream.fingerprint, in_batches)
        packer, produced = StreamPacker(rows.info, args.max_seq_length), 0
        backend = rows.info.backend or fast_backend(rows.tokenizer)
        for ids, lengths, _ in iter_encoded(shuffled, backend, False, args.preprocessing_num_workers):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            out = (pack_line_by_line(ids, offsets, rows.info, args.max_seq_length) if args.line_by_line
                   else packer.add(ids, offsets))
            if out is not None:
                produced += len(out["input_ids"])
                yield out
        if not args.line_by_line and (out := packer.finish()) is not None:
            if produced == 0 and epoch == 0:
                raise DataError(f"the corpus ({rows.stream.name}) is shorter than one row of max_seq_length="
                                f"{args.max_seq_length}: add text or lower --max_seq_length")
            yield out

    def _global_batches(self, epoch: int):
        """Global batches (dicts of [G, ...] arrays) of the epoch; the last one filled with empty rows
        (or dropped with drop_remainder)."""
        size, carry = self.global_batch_size, None
        for chunk in self._epoch_rows(epoch):
            rows = chunk if carry is None else {k: np.concatenate([carry[k], chunk[k]]) for k in chunk}
            full = len(rows["input_ids"]) // size * size
            for start in range(0, full, size):
                yield {k: v[start : start + size] for k, v in rows.items()}
            carry = {k: v[full:] for k, v in rows.items()}
        left = 0 if carry is None else len(carry["input_ids"])
        if left and not self.drop_remainder:
            filler = {k: np.zeros((size - left, *v.shape[1:]), v.dtype) for k, v in carry.items()}
            filler["input_ids"][:] = self.rows.info.pad_id
            yield {k: np.concatenate([carry[k], filler[k]]) for k in carry}

    def _advance(self):
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            if self._batches is None:
                self._batches = self._global_batches(self.epoch)
                for _ in range(self.position // self.global_batch_size):  # replay to the saved position
                    next(self._batches, None)
            batch = next(self._batches, None)
            if batch is not None:
                return batch
            if self.position == 0:  # a whole epoch without a row: stop instead of spinning forever
                raise DataError(f"the stream {self.rows.stream.name} gave no text: "
                                f"check the dataset and --text_column")
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._advance()
        self.position += self.global_batch_size
        start = self.process_index * self.local_batch_size
        return {k: v[start : start + self.local_batch_size] for k, v in batch.items()}


_END = object()


class Prefetcher:
    """Runs an iterator in a background thread, ``depth`` batches ahead. ``wait_seconds`` adds up the
    time the consumer spent blocked on input (``last_wait_seconds``: the latest ``next``);
    ``state_dict()`` is the wrapped iterator's state after the last batch handed out, so a checkpoint
    never skips the batches still sitting in the queue. Restore the iterator before wrapping it."""

    def __init__(self, iterator, depth: int = 2):
        self._iterator, self._queue = iterator, queue.Queue(maxsize=max(1, depth))
        self._state = iterator.state_dict()
        self._stop = threading.Event()
        self.wait_seconds, self.last_wait_seconds = 0.0, 0.0
        self._thread = threading.Thread(target=self._produce, name="flax-bert-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self):
        try:
            for batch in self._iterator:
                if not self._put((batch, self._iterator.state_dict())):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(error)

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        item = self._queue.get()
        self.last_wait_seconds = time.perf_counter() - start
        self.wait_seconds += self.last_wait_seconds
        if item is _END or isinstance(item, BaseException):
            self._queue.put(item)  # the producer has stopped: keep answering the same way
            if item is _END:
                raise StopIteration
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_global_batch(local_batch: dict[str, np.ndarray], mesh, partition_spec) -> dict:
    """Assembles each process's rows into global ``jax.Array``s sharded over ``mesh`` along the batch
    dimension as ``partition_spec`` says (1-D entries such as next_sentence_label use its first axis)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    spec = tuple(partition_spec)
    return {
        name: jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec(*spec[: value.ndim])), value)
        for name, value in local_batch.items()
    }
