"""`flax-bert prepare`: tokenize and pack a run's training and validation data into the cache before
the run, with worker processes, so that `train` with the same data flags starts at once.

Each process of a multi-host job prepares only the logical shards it owns (the same ones `train`
will read); within a process, `--preprocessing_num_workers` worker processes split those shards
between them. A worker reads the document stream and tokenizes only its shards' documents (document
i belongs to shard i % S), with the Rust tokenizer on one thread, so N workers use N cores. Workers
are spawned, never forked: the parent may already hold JAX's threads.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import time

import numpy as np

from flax_bert.data.iterators import owned_shards
from flax_bert.data.sources import DataArgs, DataError, document_streams

log = logging.getLogger("flax_bert")


@dataclasses.dataclass
class PreparedSplit:
    split: str
    shards: int
    tokens: int  # packed non-padding tokens of this process's shards
    tokenized_tokens: int  # of those, the ones tokenized now (0: all were in the cache already)
    seconds: float
    workers: int
    worker_pids: tuple[int, ...] = ()
    cpu_seconds: float = 0.0  # the workers' own CPU time: what a core delivers, whatever else the host runs

    def describe(self) -> str:
        if not self.tokenized_tokens:
            return f"{self.split}: {self.shards} shards already prepared ({self.tokens:,} tokens)"
        rate = self.tokenized_tokens / max(self.seconds, 1e-9)
        per_core = self.tokenized_tokens / max(self.cpu_seconds, 1e-9)
        return (f"{self.split}: {self.shards} shards, {self.tokenized_tokens:,} tokens tokenized and packed in "
                f"{self.seconds:.1f} s by {self.workers} worker process{'es' if self.workers > 1 else ''}: "
                f"{rate:,.0f} tokens/s, {per_core:,.0f} tokens/s per core ({self.cpu_seconds:.1f} CPU s)")


def _prepare_shards(args: DataArgs, tokenizer, info, seed: int, split: str, shards: list[int], num_shards: int,
                    process_index: int, process_count: int) -> tuple[int, int, int, float]:
    """In a worker: build `shards` of `split` into the cache; (packed tokens, tokens tokenized now, pid,
    CPU seconds).
    `tokenizer` may be None when `info` carries the Rust backend (a worker then never imports transformers)."""
    from flax_bert.data.pipeline import _materialize

    cpu_start = time.process_time()
    train_stream, eval_stream = document_streams(args)
    stream = train_stream if split == "train" else eval_stream
    before = _cached_tokens(stream, info, args, seed, shards, num_shards)
    rows = _materialize(stream, tokenizer, info, args, seed, split, num_shards, process_index, process_count,
                        only_shards=shards)
    total = rows.num_tokens if rows is not None else 0
    return total, total - before, os.getpid(), time.process_time() - cpu_start


def _cached_tokens(stream, info, args: DataArgs, seed: int, shards: list[int], num_shards: int) -> int:
    """Tokens of the shards whose packed rows are in the cache already."""
    from flax_bert.data.pipeline import _packed_cache_key, resolve_cache_dir
    from flax_bert.data.tokenize import tokenized_cache_key

    total = 0
    for shard in shards:
        key = tokenized_cache_key(info, stream, args.objective == "mlm+nsp", shard, num_shards)
        folder = resolve_cache_dir(args) / "packed" / _packed_cache_key(key, args, seed)
        meta = folder / "meta.json"
        if not args.overwrite_cache and meta.is_file() and json.loads(meta.read_text())["rows"]:
            total += int(np.count_nonzero(np.load(folder / "segment_ids.npy", mmap_mode="r")))
    return total


@contextlib.contextmanager
def _stopped_at_once_on_a_signal(pool):
    """A signal (ctrl-C, SIGTERM) while workers tokenize stops them now instead of after their shards: every shard
    already in the cache was published whole (renamed into place), so the same command prepares the rest."""
    try:
        yield
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in list((getattr(pool, "_processes", None) or {}).values()):  # CPython's worker table
                worker.terminate()
        raise


def prepare_data(args: DataArgs, tokenizer, seed: int, process_index: int, process_count: int,
                 workers: int | None = None) -> list[PreparedSplit]:
    """This process's shards of the training and validation splits, tokenized and packed into the cache."""
    if args.streaming:
        raise DataError("--streaming tokenizes on the fly and caches nothing: drop --streaming to prepare the data")
    workers = max(1, workers or os.cpu_count() or 1)
    from flax_bert.data.pipeline import tokenizer_info, validation_shards

    shard_counts = {"train": args.data_shards or 1, "validation": validation_shards(process_count)}
    single_threaded = dataclasses.replace(args, preprocessing_num_workers=1)  # one core per worker
    _, eval_stream = document_streams(args)  # checks the sources before any worker starts
    splits = ["train"] + (["validation"] if eval_stream is not None else [])
    info = tokenizer_info(tokenizer)
    shipped = None if info.backend is not None else tokenizer  # the Rust backend is all a worker needs
    results = []
    owned = {split: owned_shards(shard_counts[split], process_index, process_count) for split in splits}
    pool_size = min(workers, max(len(shards) for shards in owned.values()))
    spawn = multiprocessing.get_context("spawn")
    with (concurrent.futures.ProcessPoolExecutor(pool_size, mp_context=spawn) if pool_size > 1
          else contextlib.nullcontext()) as pool, _stopped_at_once_on_a_signal(pool):
        for split in splits:
            start = time.perf_counter()
            shards, num_shards = owned[split], shard_counts[split]
            groups = [shards[i::pool_size] for i in range(min(pool_size, len(shards)))]
            jobs = [(single_threaded, shipped, info, seed, split, group, num_shards, process_index, process_count)
                    for group in groups]
            if pool is None:
                outcomes = [_prepare_shards(*job) for job in jobs]
            else:
                outcomes = [future.result() for future in [pool.submit(_prepare_shards, *job) for job in jobs]]
            result = PreparedSplit(split, len(shards), sum(o[0] for o in outcomes), sum(o[1] for o in outcomes),
                                   time.perf_counter() - start, len(groups), tuple(o[2] for o in outcomes),
                                   sum(o[3] for o in outcomes))
            log.info("prepared %s", result.describe())
            results.append(result)
    return results
