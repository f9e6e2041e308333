"""Batch order over logical shards, per-process shares, resumable state, prefetch, global arrays.

Training state (``ShardedBatchIterator``) is ``{"data_shards": S, "batches": b, "shard_positions": [q_0 ..]}``:
q_s rows of shard s have been read (counting across its epochs). Every process advances every shard's
position, so the state is the same on all of them and one copy in the checkpoint restores any number
of processes, and a new batch size picks up where the old one stopped.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from flax_bert.data.sources import DataError

# jax is imported inside the functions that need it: the tokenizer tools and tests of the host
# pipeline should not pay for (or depend on) starting JAX.


def owned_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """The contiguous block of shards process ``process_index`` reads: [p*S/P, (p+1)*S/P)."""
    per_process = num_shards // process_count
    return list(range(process_index * per_process, (process_index + 1) * per_process))


def check_data_shards(num_shards: int, process_count: int, global_batch_size: int | None = None) -> None:
    """Raises DataError when the shards cannot be laid out: every process owns the same number of them
    and every shard fills at least one row of each global batch."""
    if num_shards % process_count:
        raise DataError(f"--data_shards={num_shards} does not split over {process_count} processes: "
                        f"use a multiple of {process_count}")
    if global_batch_size is not None and num_shards > global_batch_size:
        raise DataError(f"--data_shards={num_shards} is more than the global batch of {global_batch_size} rows "
                        f"(every shard fills at least one row of each batch): lower --data_shards or raise "
                        f"the batch size")


def shard_slots(num_shards: int, global_batch_size: int) -> np.ndarray:
    """Rows of each global batch filled from each shard: slot j reads shard floor(j * S / G)."""
    bounds = -(-np.arange(num_shards + 1) * global_batch_size // num_shards)  # first slot of each shard
    return np.diff(bounds)


def empty_rows(count: int, max_seq_length: int, pad_id: int, nsp: bool) -> dict[str, np.ndarray]:
    """Rows of padding only (segment 0): they carry no tokens, no loss and no masks."""
    rows = {"input_ids": np.full((count, max_seq_length), pad_id, np.int32),
            "segment_ids": np.zeros((count, max_seq_length), np.int32),
            "word_starts": np.zeros((count, max_seq_length), bool)}
    if nsp:
        rows["token_type_ids"] = np.zeros((count, max_seq_length), np.int32)
        rows["next_sentence_label"] = np.zeros(count, np.int32)
    return rows


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(f"global batch size {global_batch_size} does not split over {process_count} processes: "
                        f"use a per-device batch size that gives a multiple of {process_count}")
    return global_batch_size // process_count


ROW_LOG_VARIABLE = "FLAX_BERT_LOG_ROWS"


def row_log_path(process_index: int) -> str | None:
    """Opt-in debug record (tests of multi-process runs): with FLAX_BERT_LOG_ROWS=PREFIX every batch
    appends the [shard, row] pairs (a mixture: [source, shard, row]) this process read to
    PREFIX.process<N>.jsonl, so a test can prove each process touched only its own share."""
    prefix = os.environ.get(ROW_LOG_VARIABLE)
    return f"{prefix}.process{process_index}.jsonl" if prefix else None


class ShardedBatchIterator:
    """Endless iterator over this process's rows of each global batch, read from its own shards."""

    def __init__(self, rows, global_batch_size: int | Callable[[int], int], *, seed: int = 0, shuffle: bool = True):
        """`global_batch_size`: rows per global batch, or batch index -> rows (a batch-size warmup)."""
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.batch_size_at = global_batch_size if callable(global_batch_size) else lambda _: global_batch_size
        self._layouts: dict[int, tuple[int, np.ndarray]] = {}  # global batch -> (local batch, rows from each shard)
        num_shards = rows.num_shards
        self.layout(self.batch_size_at(0))  # a batch that does not split fails here, before any work
        self.own = owned_shards(num_shards, rows.process_index, rows.process_count)
        empty = [s for s in self.own if s not in rows.shards]
        if empty:
            raise DataError(f"data shard {empty[0]} of {num_shards} has no rows (the corpus has fewer documents than "
                            f"shards): add text or lower --data_shards")
        self.batches, self.positions = 0, np.zeros(num_shards, np.int64)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}
        self._row_log = row_log_path(rows.process_index)

    def layout(self, global_batch_size: int) -> tuple[int, np.ndarray]:
        """(this process's rows, rows from each shard) of a global batch of this size."""
        if global_batch_size not in self._layouts:
            local = _local_batch_size(global_batch_size, self.rows.process_count)
            check_data_shards(self.rows.num_shards, self.rows.process_count, global_batch_size)
            self._layouts[global_batch_size] = local, shard_slots(self.rows.num_shards, global_batch_size)
        return self._layouts[global_batch_size]

    def state_dict(self) -> dict:
        return {"data_shards": int(self.rows.num_shards), "batches": int(self.batches),
                "shard_positions": [int(q) for q in self.positions]}

    def load_state_dict(self, state: dict) -> None:
        saved = int(state.get("data_shards", 0))
        if not saved or len(state.get("shard_positions", ())) != saved:
            raise DataError(f"the checkpoint's data position {state} is not one of logical shards: resume it with "
                            f"the flax-bert version that wrote it, or start a fresh --output_dir")
        if saved != self.rows.num_shards:
            raise DataError(f"the checkpoint's data was read in {saved} shards, this run has "
                            f"{self.rows.num_shards}: resume with --data_shards {saved}")
        self.batches, self.positions = int(state["batches"]), np.asarray(state["shard_positions"], np.int64)

    def epoch_order(self, shard: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(shard)
        if cached is None or cached[0] != epoch:
            count = len(self.rows.shards[shard])
            order = (np.random.default_rng([self.seed, shard, epoch]).permutation(count) if self.shuffle
                     else np.arange(count))
            self._orders[shard] = cached = (epoch, order)
        return cached[1]

    def take(self, shard: int, start: int, count: int) -> np.ndarray:
        """Row indices ``start .. start + count`` of the shard's endless sequence of epochs."""
        size, picked = len(self.rows.shards[shard]), []
        while count:
            epoch, offset = divmod(start, size)
            part = self.epoch_order(shard, epoch)[offset : offset + count]
            picked.append(part)
            start, count = start + len(part), count - len(part)
        return np.concatenate(picked) if picked else np.zeros(0, np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts, read = [], []
        _, slots = self.layout(self.batch_size_at(self.batches))
        for shard in self.own:
            indices = self.take(shard, int(self.positions[shard]), int(slots[shard]))
            parts.append(self.rows.shards[shard].gather(indices))
            read.extend([shard, int(i)] for i in indices)
        if self._row_log:
            with open(self._row_log, "a") as log:
                log.write(json.dumps({"batch": self.batches, "rows": read}) + "\n")
        self.positions += slots
        self.batches += 1
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


_END = object()


class Prefetcher:
    """Runs an iterator in a background thread, ``depth`` batches ahead. ``wait_seconds`` adds up the
    time the consumer spent blocked on input (``last_wait_seconds``: the latest ``next``);
    ``state_dict()`` is the wrapped iterator's state after the last batch handed out, so a checkpoint
    never skips the batches still sitting in the queue. Restore the iterator before wrapping it."""

    def __init__(self, iterator, depth: int = 2, transform=None):
        # `transform(batch)` runs in the background thread too: the loop's per-batch host work (token
        # counts, copies to the devices) then overlaps the step instead of preceding it
        self._transform = transform or (lambda batch: batch)
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
                if not self._put((self._transform(batch), self._iterator.state_dict())):
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
