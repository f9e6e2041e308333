"""A training mixture of several sources (``train_sources``): each source tokenized and packed into its
own cached logical shards, and every global batch drawn from them in proportion to their probabilities.

    specs = parse_sources(run.train_sources)                      # checked, one-line errors
    train, evaluation = build_mixture(specs, data_args, tokenizer, seed=seed)
    probabilities = mixture_probabilities(weights, temperature)   # p_i ∝ w_i ** (1 / T)
    batches = train.iterator(global_batch_size, seed=seed, weights=weights, temperature=temperature)
    batches.set_weights({"wiki": 1.0}, at_batch=1000)             # from batch 1000 on; part of the state

Weights: given per source, else each source's size in tokens (the caller sums them over processes). The
temperature T re-weights them, p_i ∝ w_i ** (1/T): T = 1 keeps them, a large T goes towards uniform.

Batch b, decided identically on every process (all of it in ``MixtureBatchIterator._allocate``):
  1. rows per source: c_i = the apportionment of G rows to the wanted ``G * p_i + carry_i`` (largest
     remainders), carry_i = wanted - c_i (|carry_i| < 1): after n batches source i has given
     n * G * p_i rows to within one row, so the long-run proportions are exact.
  2. rows per source and logical shard: every source has the same S logical shards (document j of a
     source -> shard j % S), and shard s fills the same ``shard_slots(S, G)[s]`` slots of every batch as
     with one source. Shard s's slots go to the sources by the same apportionment, of the wanted
     ``c_i * slots_s / G`` plus a carry per (source, shard), within the rows still left to each source.
     So the counts add up to c_i per source and slots_s per shard, and in the long run every shard of a
     source is read at the same rate (its documents are seen equally often).
The global batch lists shard 0's rows (source by source), then shard 1's, ...: process p, which owns
shards [p*S/P, (p+1)*S/P) of every source, holds exactly the slots [p*G/P, (p+1)*G/P) and reads only its
own shards; the batches are the same for any number of processes. Each source keeps its own read
position per shard (``ShardedBatchIterator``'s epochs and order), so a resume continues exactly.

State (``state_dict``, the same on every process): batches, every source's shard positions, the carries,
the weights in force and the temperature, rows drawn per source and tokens drawn per source. Tokens are
this process's real tokens times the process count (exact on one process, an estimate on several, as the
run's throughput count).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import zlib
from collections.abc import Callable

import numpy as np

from flax_bert.data.iterators import ShardedBatchIterator, row_log_path
from flax_bert.data.sources import DataArgs, DataError

logger = logging.getLogger(__name__)

SOURCE_OPTIONS = ("train_file", "validation_file", "dataset_name", "dataset_config_name", "text_column",
                  "max_train_samples", "max_eval_samples")
SOURCE_KEYS = ("name", "weight", *SOURCE_OPTIONS)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of ``train_sources``: its name, its weight (None: its size in tokens) and its data options."""

    name: str
    weight: float | None
    options: dict

    def data_args(self, base: DataArgs) -> DataArgs:
        """The run's data options with this source's text in place of the run's own."""
        cleared = dict(train_file=None, validation_file=None, dataset_name=None, dataset_config_name=None)
        return dataclasses.replace(base, **{**cleared, **self.options})


def parse_sources(entries) -> list[SourceSpec]:
    """The checked ``train_sources`` entries; a DataError of one line naming the entry and the fix."""
    if not isinstance(entries, list) or not entries:
        raise DataError("train_sources must be a list of sources, e.g. [{name: wiki, train_file: wiki.txt}]")
    specs, seen = [], set()
    for index, entry in enumerate(entries):
        where = f"train_sources entry {index + 1}"
        if not isinstance(entry, dict):
            raise DataError(f"{where} must be a mapping such as {{name: wiki, train_file: wiki.txt}}, got {entry!r}")
        name = entry.get("name")
        if name is None:
            raise DataError(f"{where} has no name: add name: SOME_NAME (letters, digits and _)")
        if not isinstance(name, str) or not _NAME.match(name):
            raise DataError(f"{where}: name {name!r} is not a simple identifier: use letters, digits and _ "
                            f"(e.g. {re.sub(r'[^A-Za-z0-9_]', '_', str(name)) or 'web'})")
        where = f"train_sources entry {name!r}"
        if name in seen:
            raise DataError(f"{where} appears twice: give every source its own name")
        seen.add(name)
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise DataError(f"{where}: unknown key {unknown[0]!r}; a source takes {', '.join(SOURCE_KEYS)}")
        if bool(entry.get("train_file")) == bool(entry.get("dataset_name")):
            raise DataError(f"{where} needs exactly one text source: give it train_file: PATH or dataset_name: NAME")
        weight = entry.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0
                                   or weight != weight):
            raise DataError(f"{where}: weight {weight!r} must be a number >= 0 (or leave it out to weigh by size)")
        for key in ("max_train_samples", "max_eval_samples"):
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DataError(f"{where}: {key} must be a positive integer, got {value!r}")
        specs.append(SourceSpec(name, None if weight is None else float(weight),
                                {k: entry[k] for k in SOURCE_OPTIONS if entry.get(k) is not None}))
    if len({spec.weight is None for spec in specs}) > 1:
        raise DataError("train_sources: some sources have a weight and others not: give every source a weight, or "
                        "none to weigh them by their size in tokens")
    if specs[0].weight is not None and not any(spec.weight for spec in specs):
        raise DataError("train_sources: every weight is 0: give at least one source a positive weight")
    return specs


def mixture_probabilities(weights: dict[str, float], temperature: float = 1.0) -> dict[str, float]:
    """p_i ∝ w_i ** (1 / temperature): 1 keeps the weights, a large temperature goes towards uniform."""
    if not temperature > 0:
        raise DataError(f"mixture_temperature {temperature!r} must be positive, e.g. 1.0")
    scaled = {name: float(weight) ** (1.0 / temperature) if weight > 0 else 0.0 for name, weight in weights.items()}
    total = sum(scaled.values())
    if not total > 0:
        raise DataError(f"the mixture weights {weights} are all 0: give at least one source a positive weight")
    return {name: value / total for name, value in scaled.items()}


def apportion(wanted: np.ndarray, total: int, cap: np.ndarray | None = None) -> np.ndarray:
    """Integers adding up to ``total``, each as close to ``wanted`` as largest remainders make it and at most
    ``cap`` (whose sum must reach ``total``); ties go to the first."""
    cap = np.full(len(wanted), total, np.int64) if cap is None else np.asarray(cap, np.int64)
    given = np.minimum(np.floor(np.maximum(wanted, 0.0)), cap).astype(np.int64)
    while given.sum() > total:  # floors of clipped negatives went over: take back from the most over-served
        given[np.argmin(np.where(given > 0, wanted - given, np.inf))] -= 1
    while given.sum() < total:
        given[np.argmax(np.where(given < cap, wanted - given, -np.inf))] += 1
    return given


class SourceRows:
    """One source's rows of a mixture as evaluation reads them: ``row_ids`` made unique over the mixture
    (id * K + k for source k of K), so that every row keeps a mask of its own."""

    def __init__(self, rows, index: int, count: int):
        self.rows, self.index, self.count = rows, index, count

    def _renumber(self, batch: dict) -> dict:
        ids = batch["row_ids"]
        return {**batch, "row_ids": np.where(ids >= 0, ids * self.count + self.index, -1).astype(np.int32)}

    def eval_batches(self, global_batch_size: int):
        for batch in self.rows.eval_batches(global_batch_size):
            yield self._renumber(batch)

    def empty_batch(self, global_batch_size: int) -> dict:
        return self.rows.empty_batch(global_batch_size)


class MixtureRows:
    """The ``ShardedRows`` of several named sources (one split), in ``train_sources`` order."""

    def __init__(self, sources: dict):
        self.sources = dict(sources)
        first = next(iter(self.sources.values()))
        self.process_index, self.process_count = first.process_index, first.process_count

    @property
    def local_rows(self) -> int:
        return sum(rows.local_rows for rows in self.sources.values())

    @property
    def num_tokens(self) -> int:
        return sum(rows.num_tokens for rows in self.sources.values())

    @property
    def shards(self) -> dict:
        """Every source's shards of this process, keyed (source, shard)."""
        return {(name, s): part for name, rows in self.sources.items() for s, part in rows.shards.items()}

    def local_tokens(self) -> dict[str, int]:
        """Real tokens of each source in this process's shards (sum them over processes for the sizes)."""
        return {name: rows.num_tokens for name, rows in self.sources.items()}

    def parts(self) -> list[tuple[str, SourceRows]]:
        """(name, rows) of every source, their ``row_ids`` unique over the mixture."""
        return [(name, SourceRows(rows, k, len(self.sources))) for k, (name, rows) in enumerate(self.sources.items())]

    def eval_batches(self, global_batch_size: int):
        for _, rows in self.parts():
            yield from rows.eval_batches(global_batch_size)

    def empty_batch(self, global_batch_size: int) -> dict:
        return next(iter(self.sources.values())).empty_batch(global_batch_size)

    def iterator(self, global_batch_size, *, seed: int = 0, shuffle: bool = True, weights: dict | None = None,
                 temperature: float = 1.0) -> MixtureBatchIterator:
        """Endless training batches; ``weights`` default to each source's local rows (give the summed sizes)."""
        weights = weights or {name: float(rows.local_rows) for name, rows in self.sources.items()}
        return MixtureBatchIterator(self, global_batch_size, weights, temperature=temperature, seed=seed,
                                    shuffle=shuffle)


def checked_weights(weights: dict, names: list[str], full: bool = False) -> dict[str, float]:
    """Mixture weights as floats, each naming a source (`full`: one for every source) and each a number >= 0."""
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise DataError(f"no source named {unknown[0]!r} in the mixture: its sources are {', '.join(names)}")
    if full and set(weights) != set(names):
        raise DataError(f"weights for {sorted(weights)}: give one for each of {', '.join(names)}")
    bad = {name: w for name, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0}
    if bad:
        raise DataError(f"mixture weights must be numbers >= 0, got {bad}")
    return {name: float(w) for name, w in weights.items()}


class MixtureBatchIterator:
    """Endless iterator over this process's rows of each global batch of a mixture (see the module's docstring)."""

    def __init__(self, rows: MixtureRows, global_batch_size: int | Callable[[int], int], weights: dict[str, float], *,
                 temperature: float = 1.0, seed: int = 0, shuffle: bool = True):
        """`global_batch_size`: rows per global batch, or batch index -> rows (a batch-size warmup)."""
        self.rows, self.names = rows, list(rows.sources)
        self.batch_size_at = global_batch_size if callable(global_batch_size) else lambda _: global_batch_size
        self.readers = [self._reader(name, seed, shuffle) for name in self.names]
        counts = {reader.rows.num_shards for reader in self.readers}
        if len(counts) != 1:
            raise DataError(f"the sources have different numbers of logical shards ({sorted(counts)}): build them "
                            "with the same --data_shards")
        self.num_shards = self.readers[0].rows.num_shards
        self.own = self.readers[0].own
        self.configured = checked_weights(weights, self.names, full=True), float(temperature)
        self.weights, self.temperature = dict(self.configured[0]), float(temperature)
        self.probabilities = self._probabilities()
        k, s = len(self.names), self.num_shards
        self.batches, self.carry, self.shard_carry = 0, np.zeros(k), np.zeros((k, s))
        self.rows_drawn, self.tokens_drawn = np.zeros(k, np.int64), np.zeros(k, np.int64)
        self._row_log = row_log_path(rows.process_index)  # FLAX_BERT_LOG_ROWS: [source, shard, row] per batch
        self.pending: dict[int, tuple[dict, float | None]] = {}  # batch -> (weights, temperature) set from it on
        self._lock = threading.Lock()  # set_weights may come from another thread than the one making batches

    def _reader(self, name: str, seed: int, shuffle: bool) -> ShardedBatchIterator:
        """The source's own positions and epoch orders (its seed mixes in its name)."""
        try:
            return ShardedBatchIterator(self.rows.sources[name], self.batch_size_at, shuffle=shuffle,
                                        seed=seed * 2**32 + zlib.crc32(name.encode()))
        except DataError as err:
            raise DataError(f"train_sources entry {name!r}: {err}") from None

    def _probabilities(self) -> np.ndarray:
        probabilities = mixture_probabilities(self.weights, self.temperature)
        return np.array([probabilities[name] for name in self.names])

    def set_weights(self, weights: dict[str, float], temperature: float | None = None, *,
                    at_batch: int | None = None) -> dict[str, float]:
        """New weights for the sources named (the others keep theirs), the temperature applied again; returns the
        probabilities they give. ``at_batch`` N: from batch N on (0-based; the run trains on batch N at step
        N + 1), whatever the prefetch thread has made ahead: the change is then the same in every run. Without
        it, from the next batch this iterator makes (behind a ``Prefetcher``: a timing-dependent one). The
        weights in force and the changes still to come are part of the state: a resume is exact."""
        checked = checked_weights(weights, self.names)
        temperature = None if temperature is None else float(temperature)
        with self._lock:
            future = {**self.weights, **checked}, self.temperature if temperature is None else temperature
            probabilities = mixture_probabilities(*future)  # refuses all-zero weights now, not batches later
            if at_batch is None or at_batch == self.batches:
                self._apply(checked, temperature)
            elif at_batch < self.batches:
                raise DataError(f"batch {at_batch} of the mixture has been made already (the next is batch "
                                f"{self.batches}): change the weights at a later batch")
            else:
                self.pending[int(at_batch)] = (checked, temperature)
        return dict(probabilities)

    def _apply(self, weights: dict[str, float], temperature: float | None) -> None:
        self.weights = {**self.weights, **weights}
        self.temperature = self.temperature if temperature is None else temperature
        self.probabilities = self._probabilities()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        with self._lock:
            return self._state()

    def _state(self) -> dict:
        return {"mixture": list(self.names), "batches": int(self.batches),
                "sources": {name: reader.state_dict() for name, reader in zip(self.names, self.readers)},
                "weights": dict(self.weights), "temperature": self.temperature,
                "configured_weights": dict(self.configured[0]), "configured_temperature": self.configured[1],
                "carry": [float(c) for c in self.carry], "shard_carry": [[float(c) for c in row] for row in self.shard_carry],
                "rows": dict(zip(self.names, map(int, self.rows_drawn))),
                "tokens": dict(zip(self.names, map(int, self.tokens_drawn))),
                "pending": [[batch, weights, temperature] for batch, (weights, temperature) in sorted(self.pending.items())]}

    def load_state_dict(self, state: dict) -> None:
        """Restores every source's position, the carries and the weights in force. Weights or a temperature
        the run configures anew (changed on resume) take over from the saved ones; positions stay."""
        if "mixture" not in state:
            raise DataError("the checkpoint's data position is of one source, this run reads train_sources: resume "
                            "it without train_sources, or start a fresh --output_dir")
        if list(state["mixture"]) != self.names:
            raise DataError(f"the checkpoint's data mixes the sources {', '.join(state['mixture'])}, this run "
                            f"{', '.join(self.names)}: resume with the same train_sources (their weights may change)")
        for name, reader in zip(self.names, self.readers):
            reader.load_state_dict(state["sources"][name])
        self.batches = int(state["batches"])
        self.carry = np.asarray(state["carry"], float)
        self.shard_carry = np.asarray(state["shard_carry"], float).reshape(len(self.names), self.num_shards)
        self.rows_drawn = np.array([state["rows"][n] for n in self.names], np.int64)
        self.tokens_drawn = np.array([state["tokens"][n] for n in self.names], np.int64)
        self.pending = {int(batch): (dict(weights), temperature) for batch, weights, temperature in state["pending"]}
        saved = dict(state["configured_weights"]), float(state["configured_temperature"])
        if saved == self.configured:  # the same configuration: the weights in force then (a phase may have set them)
            self.weights, self.temperature = dict(state["weights"]), float(state["temperature"])
            if (self.weights, self.temperature) != saved:
                logger.info("the checkpoint's mixture weights are in force: %s (temperature %g)", self.weights,
                            self.temperature)
        else:
            logger.info("mixture weights changed on resume: %s (temperature %g) -> %s (temperature %g)",
                        saved[0], saved[1], self.configured[0], self.configured[1])
        self.probabilities = self._probabilities()

    # ------------------------------------------------------------------ batches
    def _allocate(self) -> np.ndarray:
        """[sources, shards] rows of the next batch, the same on every process (the module's docstring)."""
        size = self.batch_size_at(self.batches)
        _, shard_slots = self.readers[0].layout(size)
        wanted = self.carry + size * self.probabilities
        per_source = apportion(wanted, size)
        self.carry = wanted - per_source
        target = self.shard_carry + per_source[:, None] * shard_slots[None, :] / size
        counts, left = np.zeros_like(self.shard_carry, np.int64), per_source.copy()
        for shard, slots in enumerate(shard_slots):
            counts[:, shard] = apportion(target[:, shard], int(slots), left)
            left -= counts[:, shard]
        self.shard_carry = target - counts
        return counts

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self.batches in self.pending:
                self._apply(*self.pending.pop(self.batches))
            counts = self._allocate()
        parts, tokens, read = [], np.zeros(len(self.names), np.int64), []
        for shard in self.own:
            for k, reader in enumerate(self.readers):
                if counts[k, shard]:
                    rows = reader.take(shard, int(reader.positions[shard]), int(counts[k, shard]))
                    part = reader.rows.shards[shard].gather(rows)
                    tokens[k] += np.count_nonzero(part["segment_ids"])
                    parts.append(part)
                    read.extend([self.names[k], shard, int(i)] for i in rows)
        if self._row_log:
            with open(self._row_log, "a") as log:
                log.write(json.dumps({"batch": self.batches, "rows": read}) + "\n")
        for k, reader in enumerate(self.readers):
            reader.positions += counts[k]
            reader.batches += 1
        self.rows_drawn += counts.sum(axis=1)
        self.tokens_drawn += tokens * self.rows.process_count
        self.batches += 1
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def build_mixture(specs: list[SourceSpec], args: DataArgs, tokenizer, seed: int = 0, process_index: int | None = None,
                  process_count: int | None = None, splits: tuple[str, ...] = ("train", "validation")):
    """(training MixtureRows or None, validation MixtureRows or None): every source built by
    ``pipeline.build_datasets`` with its own options (its own cache keys). Only sources with validation data
    (their validation_file or the held-out --validation_split_percentage) are in the validation rows."""
    from flax_bert.data.pipeline import build_datasets

    if args.streaming:
        raise DataError("train_sources cannot be streamed yet: drop --streaming (each source is cached)")
    train, evaluation = {}, {}
    for spec in specs:
        try:
            rows, held_out = build_datasets(spec.data_args(args), tokenizer, seed=seed, process_index=process_index,
                                            process_count=process_count, splits=splits)
        except DataError as err:
            raise DataError(f"train_sources entry {spec.name!r}: {err}") from None
        if rows is not None:
            train[spec.name] = rows
        if held_out is not None:
            evaluation[spec.name] = held_out
    return MixtureRows(train) if train else None, MixtureRows(evaluation) if evaluation else None
