"""The host data pipeline: packing, order, shares, resume, caching, prefetch, NSP pairs, bad input."""

import json
import time

import numpy as np
import pytest

from flax_bert.data import tokenize as data_tokenize
from flax_bert.data.pipeline import (DataArgs, DataError, PackedRows, Prefetcher, ShardedRows, build_datasets,
                            check_tokenizer_fits, make_global_batch, resolve_data_shards, tokenizer_info)
from flax_bert.data.sentence_pairs import build_nsp_rows
from flax_bert.data.packing import segment_positions
from flax_bert.data.sources import DataFileNotFoundError, document_streams
from flax_bert.data.tokenize import TokenizedCorpus
from flax_bert.data.tokenizer_training import train_tokenizer


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def corpus_texts(cache_root):
    from flax_bert.data import corpus
    return corpus.load_builtin_corpus(cache_root)


@pytest.fixture(scope="module")
def bpe(corpus_texts, tmp_path_factory):
    return train_tokenizer(corpus_texts[::4], kind="bpe", vocab_size=2000,
                           output_dir=tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture(scope="module")
def wordpiece(corpus_texts, tmp_path_factory):
    return train_tokenizer(corpus_texts[::4], kind="wordpiece", vocab_size=2000,
                           output_dir=tmp_path_factory.mktemp("tok") / "wordpiece")


@pytest.fixture(scope="module")
def builtin_rows(bpe, cache_root):
    args = DataArgs(cache_dir=str(cache_root), max_seq_length=64)
    train, evaluation = build_datasets(args, bpe)
    return args, train, evaluation


@pytest.fixture(scope="module")
def small_txt(corpus_texts, tmp_path_factory):
    """The first 300 corpus documents as a WikiText-style file: quick enough to stream many times."""
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text("\n\n".join(text.replace("\n\n", "\n") for text in corpus_texts[:300]) + "\n", encoding="utf-8")
    return path


def single(rows: ShardedRows) -> PackedRows:
    """The rows of a split built in one shard (build_datasets' default)."""
    assert rows.num_shards == 1 and list(rows.shards) == [0]
    return rows.shards[0]


def first_epoch(rows, global_batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of the first (shuffled) epoch: the first len(rows) rows of the endless iterator of a
    one-shard split, or every batch of one streamed epoch."""
    if isinstance(rows, ShardedRows):
        iterator = rows.iterator(global_batch_size, seed=seed)
        count = len(single(rows))
        batches = stacked([next(iterator) for _ in range(-(-count // global_batch_size))])
        return {key: value[:count] for key, value in batches.items()}
    return stacked(list(rows.iterator(global_batch_size, seed=seed, num_epochs=1)))


def stacked(batches):
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def documents_of(args):
    return [text for batch in document_streams(args)[0].batches() for text in batch]


def wrapped_token_stream(tokenizer, texts):
    """The tokenizer's own encoding of every document, with its special tokens, end to end."""
    return np.concatenate([np.asarray(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]])


# ---------------------------------------------------------------- packing

def test_one_epoch_holds_every_token_exactly_once(builtin_rows, bpe):
    args, train, evaluation = builtin_rows
    expected = wrapped_token_stream(bpe, documents_of(args))
    assert train.num_tokens == len(expected) and evaluation is not None and evaluation.local_rows > 0
    in_order = stacked(list(train.eval_batches(24)))
    assert in_order["input_ids"].shape[1] == 64
    assert len(in_order["input_ids"]) == -(-train.local_rows // 24) * 24  # last batch filled with empty rows
    np.testing.assert_array_equal(in_order["input_ids"][in_order["segment_ids"] > 0], expected)
    shuffled = first_epoch(train, 24, seed=5)
    real = shuffled["input_ids"][shuffled["segment_ids"] > 0]
    assert len(real) == len(expected)
    np.testing.assert_array_equal(np.bincount(real, minlength=2000), np.bincount(expected, minlength=2000))
    assert not np.array_equal(real, expected)  # ... and really shuffled


def test_segment_ids_follow_documents(builtin_rows, bpe):
    train = single(builtin_rows[1])
    ids, seg = np.asarray(train.arrays["input_ids"]), np.asarray(train.arrays["segment_ids"])
    bos, eos, pad = bpe.cls_token_id, bpe.sep_token_id, bpe.pad_token_id
    assert ids.shape == (len(train), 64) and seg.dtype == np.int32
    assert (seg[:-1] > 0).all()  # only the last row has padding
    assert (ids[seg == 0] == pad).all()
    for row in range(len(train)):
        real = seg[row][seg[row] > 0]
        assert real[0] == 1 and set(np.diff(real)) <= {0, 1}  # 1, 1, ..., 2, 2, ..., n
        starts = np.flatnonzero(np.diff(seg[row]) == 1) + 1
        assert (ids[row, starts] == bos).all() and (ids[row, starts - 1] == eos).all()
        previous_ended = row == 0 or ids[row - 1, -1] == eos
        assert (ids[row, 0] == bos) == previous_ended  # a cut document continues as a new segment
    # positions restart at every segment (the model adds RoBERTa's padding_idx + 1 to these)
    positions = segment_positions(seg)
    assert (positions[seg == 0] == 0).all()
    new_segment = np.ones_like(seg, bool)
    new_segment[:, 1:] = seg[:, 1:] != seg[:, :-1]
    assert (positions[new_segment & (seg > 0)] == 0).all()
    inside = ~new_segment & (seg > 0)
    assert (positions[:, 1:][inside[:, 1:]] == positions[:, :-1][inside[:, 1:]] + 1).all()


def test_line_by_line_one_document_per_row(bpe, cache_root):
    args = DataArgs(cache_dir=str(cache_root), max_seq_length=32, line_by_line=True, validation_split_percentage=0)
    train, evaluation = build_datasets(args, bpe)
    train = single(train)
    assert evaluation is None
    encoded = bpe(documents_of(args), add_special_tokens=True)["input_ids"]
    assert len(train) == len(encoded)
    ids, seg = np.asarray(train.arrays["input_ids"]), np.asarray(train.arrays["segment_ids"])
    for row in range(0, len(train), 37):
        want = encoded[row][:31] + [bpe.sep_token_id] if len(encoded[row]) > 32 else encoded[row]
        assert ids[row, : len(want)].tolist() == want
        assert (seg[row, : len(want)] == 1).all() and (seg[row, len(want) :] == 0).all()


def test_word_starts_for_byte_level_bpe_and_wordpiece(bpe, wordpiece, tmp_path):
    text = "The lobster swims quickly, unbelievably far. It eats 3 crabs."
    source = tmp_path / "words.txt"
    source.write_text(text + "\n")
    for tokenizer in (bpe, wordpiece):
        args = DataArgs(train_file=str(source), cache_dir=str(tmp_path / "c"), max_seq_length=40,
                        line_by_line=True, validation_split_percentage=0)
        rows = single(build_datasets(args, tokenizer)[0])
        ids = rows.arrays["input_ids"][0][rows.arrays["segment_ids"][0] > 0]
        starts = rows.arrays["word_starts"][0][rows.arrays["segment_ids"][0] > 0]
        words = np.split(ids, np.flatnonzero(starts)[1:])
        decoded = [tokenizer.decode(word).strip() for word in words]
        if tokenizer is bpe:  # byte-level: words are what whitespace separates; punctuation sticks
            assert decoded == ["<s>", *text.split(), "</s>"]
        else:  # WordPiece: the pre-tokenizer's words ("##" pieces joined), punctuation on its own
            normalized = tokenizer.backend_tokenizer.normalizer.normalize_str(text)
            pre = [w for w, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]
            assert decoded == ["[CLS]", *pre, "[SEP]"]
    newline = tokenizer_info(bpe)
    assert newline.breaks_word[bpe.convert_tokens_to_ids("Ċ")]  # "a\nword": "word" has no "Ġ" but starts a word
    # a document cut by a row boundary starts a new word at the top of the next row
    args = DataArgs(train_file=str(source), cache_dir=str(tmp_path / "c"), max_seq_length=7,
                    validation_split_percentage=0)
    rows = single(build_datasets(args, wordpiece)[0])
    assert rows.arrays["word_starts"][:, 0].all()
    assert not (rows.arrays["word_starts"] & (rows.arrays["segment_ids"] == 0)).any()


def test_wikitext_rows(gpt2_bpe_dir, shared_dir, tmp_path):
    from transformers import RobertaTokenizer

    tokenizer = RobertaTokenizer(vocab=str(gpt2_bpe_dir / "vocab.json"), merges=str(gpt2_bpe_dir / "merges.txt"))
    assert len(tokenizer) == 50262  # GPT-2's 50257 + <s> <pad> </s> <unk> <mask>: the vocab really loaded
    args = DataArgs(train_file=str(shared_dir / "data/wikitext-2-raw/wiki.valid.raw"), cache_dir=str(tmp_path),
                    max_seq_length=128)
    train, evaluation = build_datasets(args, tokenizer)
    expected = wrapped_token_stream(tokenizer, documents_of(args))
    rows = first_epoch(train, 64, seed=1)
    assert rows["input_ids"].shape[1] == 128
    real = rows["input_ids"][rows["segment_ids"] > 0]
    np.testing.assert_array_equal(np.bincount(real, minlength=len(tokenizer)),
                                  np.bincount(expected, minlength=len(tokenizer)))
    assert 0.04 < evaluation.local_rows / (train.local_rows + evaluation.local_rows) < 0.06  # 5% carved out


# ---------------------------------------------------------------- order, shares, resume

def tagged(rows: ShardedRows) -> ShardedRows:
    """The same rows with a "row" feature naming each one (shard * 1e6 + row + 1; 0 marks empty rows)."""
    shards = {shard: PackedRows({**part.arrays, "row": shard * 1_000_000 + np.arange(1, len(part) + 1)[:, None]},
                                part.pad_id) for shard, part in rows.shards.items()}
    return ShardedRows(shards, rows.num_shards, rows.process_index, rows.process_count, rows.max_seq_length,
                       rows.pad_id, rows.nsp)


def processes(args, tokenizer, process_count):
    """Every process's training rows of a ``process_count``-process run, built in turn."""
    return [tagged(build_datasets(args, tokenizer, process_index=p, process_count=process_count)[0])
            for p in range(process_count)]


def global_batches(shares, global_batch_size, steps, seed=2, state=None):
    """``steps`` global batches (the processes' local batches in process order) and the state after them."""
    iterators = [rows.iterator(global_batch_size, seed=seed) for rows in shares]
    for iterator in iterators:
        if state is not None:
            iterator.load_state_dict(json.loads(json.dumps(state)))  # small and serializable
    batches = [stacked([next(iterator) for iterator in iterators]) for _ in range(steps)]
    states = [iterator.state_dict() for iterator in iterators]
    assert all(state == states[0] for state in states)  # one state, whatever the process
    return batches, states[0]


def test_each_process_tokenizes_only_its_own_shards(bpe, small_txt, tmp_path, monkeypatch):
    documents = documents_of(DataArgs(train_file=str(small_txt), validation_split_percentage=0))
    encoded = []
    real_encode = data_tokenize.encode_texts
    monkeypatch.setattr(data_tokenize, "encode_texts",
                        lambda backend, texts: encoded.extend(texts) or real_encode(backend, texts))
    for process in (0, 1):  # two hosts without a shared disk: each has its own cache
        encoded.clear()
        args = DataArgs(train_file=str(small_txt), cache_dir=str(tmp_path / f"host{process}"), max_seq_length=64,
                        validation_split_percentage=0, data_shards=4)
        rows, _ = build_datasets(args, bpe, process_index=process, process_count=2)
        own = [2 * process, 2 * process + 1]
        assert sorted(rows.shards) == own
        assert sorted(encoded) == sorted(d for i, d in enumerate(documents) if i % 4 in own)
        assert len(list((tmp_path / f"host{process}" / "tokenized").iterdir())) == 2
        assert rows.num_tokens == wrapped_token_stream(bpe, [d for i, d in enumerate(documents) if i % 4 in own]).size


def test_batches_are_the_same_for_any_number_of_processes(bpe, small_txt, tmp_path):
    args = DataArgs(train_file=str(small_txt), cache_dir=str(tmp_path), max_seq_length=64, data_shards=4)
    one = processes(args, bpe, 1)
    steps = max(len(part) for part in one[0].shards.values())  # 2 rows per shard per batch: every shard wraps
    whole, _ = global_batches(one, 8, steps)

    def warmup(index):  # a batch-size warmup: 4 rows, then 8
        return 4 if index < 3 else 8

    growing, _ = global_batches(one, warmup, 6)
    assert [len(batch["row"]) for batch in growing] == [4, 4, 4, 8, 8, 8]
    for process_count in (2, 4):
        batches, _ = global_batches(processes(args, bpe, process_count), 8, steps)
        for want, got in zip(whole, batches):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
        for want, got in zip(growing, global_batches(processes(args, bpe, process_count), warmup, 6)[0]):
            np.testing.assert_array_equal(got["row"], want["row"])
    # slot j of a batch comes from shard j * 4 // 8; each shard is read in whole epochs, each reshuffled
    rows = np.stack([batch["row"][:, 0] for batch in whole])  # [steps, 8]
    for shard, part in one[0].shards.items():
        sequence = rows[:, 2 * shard : 2 * shard + 2].reshape(-1)
        assert (sequence // 1_000_000 == shard).all()
        count = len(part)
        epochs = [sequence[e * count : (e + 1) * count] for e in range(len(sequence) // count)]
        assert len(epochs) >= 2
        for order in epochs:
            assert sorted(order % 1_000_000) == list(range(1, count + 1))
        assert not np.array_equal(epochs[0], epochs[1])


def test_restored_state_continues_on_any_number_of_processes(bpe, small_txt, tmp_path):
    args = DataArgs(train_file=str(small_txt), cache_dir=str(tmp_path), max_seq_length=64, data_shards=4)
    two = processes(args, bpe, 2)
    steps = max(len(part) for part in two[0].shards.values()) // 2 + 3  # some shards into their 2nd epoch
    _, state = global_batches(two, 8, steps)
    expected, _ = global_batches(two, 8, 4, state=state)
    for process_count in (1, 2, 4):
        got, _ = global_batches(processes(args, bpe, process_count), 8, 4, state=state)
        for want, batch in zip(expected, got):
            np.testing.assert_array_equal(batch["row"], want["row"])
    # a bigger batch picks up every shard where the smaller one stopped
    bigger, _ = global_batches(two, 16, 2, state=state)
    for shard in range(4):
        continued = np.concatenate([b["row"][2 * shard : 2 * shard + 2, 0] for b in expected])
        np.testing.assert_array_equal(np.concatenate([b["row"][4 * shard : 4 * shard + 4, 0] for b in bigger]),
                                      continued)
    with pytest.raises(ValueError, match="read in 4 shards, this run has 2: resume with --data_shards 4"):
        other = build_datasets(DataArgs(train_file=str(small_txt), cache_dir=str(tmp_path), max_seq_length=64,
                                        data_shards=2), bpe, process_index=0, process_count=1)[0]
        other.iterator(8).load_state_dict(state)


def test_evaluation_reads_each_process_rows_once_padding_only_the_last_batch(bpe, small_txt, tmp_path):
    args = DataArgs(train_file=str(small_txt), cache_dir=str(tmp_path), max_seq_length=64, data_shards=4)
    for process in (0, 1):
        rows = build_datasets(args, bpe, process_index=process, process_count=2)[1]
        batches = list(rows.eval_batches(16))
        assert len(batches) == -(-rows.local_rows // 8) and all(len(b["input_ids"]) == 8 for b in batches)
        empty = [int((b["segment_ids"] == 0).all(axis=1).sum()) for b in batches]
        assert sum(empty) == len(batches) * 8 - rows.local_rows and not any(empty[:-1])
        expected = np.concatenate([part.arrays["input_ids"][part.arrays["segment_ids"] > 0]
                                   for _, part in sorted(rows.shards.items())])
        got = stacked(batches)
        np.testing.assert_array_equal(got["input_ids"][got["segment_ids"] > 0], expected)


def _build_in_another_process(tokenizer_dir: str, train_file: str, cache_dir: str) -> list[int]:
    """Runs in a spawned process: builds 4 shards into ``cache_dir``; returns each shard's token count."""
    from transformers import AutoTokenizer

    args = DataArgs(train_file=train_file, cache_dir=cache_dir, max_seq_length=64, data_shards=4)
    rows, _ = build_datasets(args, AutoTokenizer.from_pretrained(tokenizer_dir), process_index=0, process_count=1)
    return [rows.shards[s].num_tokens for s in range(4)]


def test_a_growing_batch_is_the_same_for_any_number_of_processes_and_resumes_exactly(bpe, small_txt, tmp_path):
    """A batch-size warmup: the global batch is a function of the batch index (4, 4, 8, 8, 12 ...)."""
    args = DataArgs(train_file=str(small_txt), cache_dir=str(tmp_path), max_seq_length=64, data_shards=4)
    sizes = lambda b: min(4 * (1 + b // 2), 16)  # noqa: E731
    one = processes(args, bpe, 1)
    whole, _ = global_batches(one, sizes, 9)
    assert [len(batch["row"]) for batch in whole] == [4, 4, 8, 8, 12, 12, 16, 16, 16]
    two, _ = global_batches(processes(args, bpe, 2), sizes, 9)
    for want, got in zip(whole, two):
        np.testing.assert_array_equal(got["row"], want["row"])
    _, state = global_batches(one, sizes, 5)  # stopped in the middle of the warmup
    resumed, _ = global_batches(processes(args, bpe, 2), sizes, 4, state=state)
    for want, got in zip(whole[5:], resumed):
        np.testing.assert_array_equal(got["row"], want["row"])
    # every shard is read in order without a row skipped or repeated while the batch grows
    for shard in range(4):
        read = np.concatenate([batch["row"][np.asarray(batch["row"])[:, 0] // 1_000_000 == shard, 0] for batch in whole])
        count = len(one[0].shards[shard])
        assert len(set(read[:count].tolist())) == min(len(read), count)


def test_processes_sharing_a_cold_cache_agree(bpe, small_txt, tmp_path):
    import concurrent.futures
    import multiprocessing

    bpe.save_pretrained(tmp_path / "tokenizer")
    cache = tmp_path / "shared-cache"
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_build_in_another_process, *zip(*[(str(tmp_path / "tokenizer"), str(small_txt),
                                                                    str(cache))] * 3)))
    assert results[0] == results[1] == results[2] and all(results[0])
    assert len(list((cache / "tokenized").glob("*/meta.json"))) == 20  # 4 train + 16 validation shards, once
    assert not list(cache.rglob(".tmp-*"))  # the copies that lost the race are gone


def test_data_shard_count_rules(bpe, tmp_path):
    assert resolve_data_shards(None, 1, 16) == resolve_data_shards(None, 2, 16) == resolve_data_shards(None, 8, 64) == 16
    assert resolve_data_shards(None, 3, 48) == 48 and resolve_data_shards(None, 64, 512) == 64
    assert resolve_data_shards(None, 1, 8) == 1 and resolve_data_shards(None, 2, 8) == 2  # small batches
    assert resolve_data_shards(6, 3, 6) == 6
    with pytest.raises(DataError, match="--data_shards=6 does not split over 4 processes: use a multiple of 4"):
        resolve_data_shards(6, 4, 16)
    with pytest.raises(DataError, match="--data_shards=32 is more than the global batch of 16 rows"):
        resolve_data_shards(32, 1, 16)
    (tmp_path / "two.txt").write_text("first document\n\nsecond document\n")
    with pytest.raises(DataError, match="shard 2 of 4\\) has no text: add text or lower --data_shards"):
        _build(tmp_path, bpe, train_file=str(tmp_path / "two.txt"), validation_split_percentage=0, data_shards=4)
    assert _nothing_written(tmp_path)  # not even the shards 0 and 1 that had text


def test_epochs_reshuffle_from_the_seed(builtin_rows):
    _, train, _ = builtin_rows
    iterator = train.iterator(8, seed=7)
    np.testing.assert_array_equal(iterator.epoch_order(0, 0), train.iterator(8, seed=7).epoch_order(0, 0))
    assert not np.array_equal(iterator.epoch_order(0, 0), iterator.epoch_order(0, 1))
    assert sorted(iterator.epoch_order(0, 1)) == list(range(train.local_rows))


def test_prefetcher_state_counts_only_consumed_batches(builtin_rows):
    _, train, _ = builtin_rows
    with Prefetcher(train.iterator(8, seed=4), depth=3) as batches:
        consumed = [next(batches) for _ in range(4)]
        time.sleep(0.1)  # let the thread run ahead
        state = batches.state_dict()
    assert state == {"data_shards": 1, "batches": 4, "shard_positions": [32]}
    plain = train.iterator(8, seed=4)
    for want in consumed:
        np.testing.assert_array_equal(next(plain)["input_ids"], want["input_ids"])
    restored = train.iterator(8, seed=4)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(next(restored)["input_ids"], next(plain)["input_ids"])


def test_prefetcher_reports_waiting_and_errors():
    class Slow:
        def __init__(self, fail_at=None):
            self.count, self.fail_at = 0, fail_at

        def state_dict(self):
            return {"epoch": 0, "position": self.count}

        def __iter__(self):
            return self

        def __next__(self):
            time.sleep(0.05)
            if self.count == 3:
                raise StopIteration
            if self.count == self.fail_at:
                raise RuntimeError("broken source")
            self.count += 1
            return {"x": np.array([self.count])}

    batches = Prefetcher(Slow())
    assert [int(b["x"][0]) for b in batches] == [1, 2, 3]
    assert batches.wait_seconds > 0.05 and batches.state_dict() == {"epoch": 0, "position": 3}
    failing = Prefetcher(Slow(fail_at=1))
    next(failing)
    with pytest.raises(RuntimeError, match="broken source"):
        next(failing)


def test_make_global_batch_assembles_sharded_arrays(builtin_rows):
    import jax
    from jax.sharding import PartitionSpec

    _, train, _ = builtin_rows
    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("data",))
    local = next(train.iterator(2 * devices, seed=0))
    local["next_sentence_label"] = np.arange(2 * devices, dtype=np.int32)
    batch = make_global_batch(local, mesh, PartitionSpec("data"))
    assert batch["input_ids"].shape == (2 * devices, 64)
    assert batch["input_ids"].sharding.spec == PartitionSpec("data")
    assert len(batch["input_ids"].addressable_shards) == devices
    for key in local:
        np.testing.assert_array_equal(np.asarray(batch[key]), local[key])


# ---------------------------------------------------------------- cache and streaming

def test_second_run_reads_the_cache(bpe, small_txt, tmp_path, monkeypatch):
    args = DataArgs(train_file=str(small_txt), cache_dir=str(tmp_path), max_seq_length=64)
    first, _ = build_datasets(args, bpe)

    def no_tokenizing(*_, **__):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_tokenize, "encode_texts", no_tokenizing)
    again, _ = build_datasets(args, bpe)
    for key in single(first).arrays:
        np.testing.assert_array_equal(single(again).arrays[key], single(first).arrays[key])
    longer, _ = build_datasets(DataArgs(train_file=str(small_txt), cache_dir=str(tmp_path), max_seq_length=96), bpe)
    assert longer.num_tokens == first.num_tokens  # repacked from the tokenized cache
    with pytest.raises(AssertionError, match="tokenized again"):
        build_datasets(DataArgs(train_file=str(small_txt), cache_dir=str(tmp_path), overwrite_cache=True), bpe)


def test_streaming_matches_the_cached_pipeline_and_resumes(bpe, small_txt, tmp_path):
    cached_args = DataArgs(train_file=str(small_txt), cache_dir=str(tmp_path), max_seq_length=64)
    cached = single(build_datasets(cached_args, bpe)[0])
    stream_args = DataArgs(train_file=str(small_txt), cache_dir=str(tmp_path), max_seq_length=64, streaming=True,
                           shuffle_buffer_size=50)
    stream, stream_eval = build_datasets(stream_args, bpe)
    assert stream_eval is not None
    streamed = first_epoch(stream, 8, seed=1)
    real = streamed["input_ids"][streamed["segment_ids"] > 0]
    np.testing.assert_array_equal(np.sort(real), np.sort(cached.arrays["input_ids"][cached.arrays["segment_ids"] > 0]))
    # two processes: each tokenizes every other document, and nothing else
    documents = documents_of(cached_args)
    for process in (0, 1):
        share = build_datasets(stream_args, bpe, process_index=process, process_count=2)[0]
        rows = first_epoch(share, 8, seed=1)
        mine = wrapped_token_stream(bpe, documents[process::2])
        np.testing.assert_array_equal(np.sort(rows["input_ids"][rows["segment_ids"] > 0]), np.sort(mine))
    iterator = share.iterator(8, seed=1)
    for _ in range(4):
        next(iterator)
    state, expected = iterator.state_dict(), [next(iterator)["input_ids"] for _ in range(2)]
    fresh = share.iterator(8, seed=1)
    fresh.load_state_dict(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["input_ids"], want)
    with pytest.raises(ValueError, match="read by 2 processes, this run has 1"):
        stream.iterator(8).load_state_dict(state)


def test_streamed_dataset_of_several_files_gives_each_process_its_own_files(bpe, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    texts = {part: [f"Part {part}, document {i}: lobsters and crabs." for i in range(25)] for part in range(4)}
    for part, documents in texts.items():
        (folder / f"part{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    args = DataArgs(dataset_name=str(folder), streaming=True, validation_split_percentage=0,
                    cache_dir=str(tmp_path / "cache"), max_seq_length=32)

    def tokens_of(rows):
        batches = stacked(list(rows.eval_batches(4 * rows.process_count)))
        return np.sort(batches["input_ids"][batches["segment_ids"] > 0])

    everything = [t for part in range(4) for t in texts[part]]
    for process in (0, 1):  # 4 files over 2 processes: files `process` and `process + 2`
        rows, _ = build_datasets(args, bpe, process_index=process, process_count=2)
        mine = texts[process] + texts[process + 2]
        np.testing.assert_array_equal(tokens_of(rows), np.sort(wrapped_token_stream(bpe, mine)))
    # 3 processes do not divide 4 files: each reads everything and keeps every third document
    shares = [tokens_of(build_datasets(args, bpe, process_index=p, process_count=3)[0]) for p in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.sort(wrapped_token_stream(bpe, everything)))


def test_table_formats_and_text_column(bpe, tmp_path):
    import pyarrow
    import pyarrow.parquet

    texts = ["First document about lobsters.", "Second one, about crabs and shrimp.", "Third: krill."] * 20
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    (tmp_path / "d.csv").write_text("body,n\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(texts)))
    pyarrow.parquet.write_table(pyarrow.table({"body": texts}), tmp_path / "d.parquet")
    expected = wrapped_token_stream(bpe, texts)
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        for streaming in (False, True):
            args = DataArgs(train_file=str(tmp_path / name), text_column="body", cache_dir=str(tmp_path / "c"),
                            max_seq_length=16, validation_split_percentage=0, streaming=streaming)
            rows, _ = build_datasets(args, bpe)
            batch = stacked(list(rows.eval_batches(4)))
            np.testing.assert_array_equal(batch["input_ids"][batch["segment_ids"] > 0], expected, err_msg=name)


# ---------------------------------------------------------------- bad input

def _build(tmp_path, tokenizer, **kwargs):
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return build_datasets(DataArgs(**kwargs), tokenizer)


def _nothing_written(tmp_path):
    return not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_missing_empty_and_blank_files(bpe, tmp_path):
    with pytest.raises(DataFileNotFoundError, match="does not exist: check --train_file") as error:
        _build(tmp_path, bpe, train_file=str(tmp_path / "nope.txt"))
    assert isinstance(error.value, FileNotFoundError)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty.txt is empty"):
        _build(tmp_path, bpe, train_file=str(tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    with pytest.raises(DataError, match="has no text"):
        _build(tmp_path, bpe, train_file=str(tmp_path / "blank.txt"))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported extension '.xml'"):
        _build(tmp_path, bpe, train_file=str(tmp_path / "data.xml"))
    assert _nothing_written(tmp_path)


def test_invalid_utf8_names_file_and_offset_or_is_skipped(bpe, tmp_path, caplog):
    raw = ("good line\n\n" + "lobster " * 40 + "\n").encode() + b"bad \xff byte " + ("crab " * 40).encode() + b"\n"
    for name, body in (("bad.txt", raw), ("bad.jsonl", b'{"text": "ok"}\n{"text": "bad \xff"}\n')):
        (tmp_path / name).write_bytes(body)
        offset = body.index(0xFF)
        message = f"{name} is not valid UTF-8 \\(byte offset {offset}\\).*--skip_invalid_utf8"
        with pytest.raises(DataError, match=message):
            _build(tmp_path, bpe, train_file=str(tmp_path / name), max_seq_length=8)
    assert _nothing_written(tmp_path)
    with caplog.at_level("WARNING"):
        rows, _ = _build(tmp_path, bpe, train_file=str(tmp_path / "bad.txt"), skip_invalid_utf8=True,
                         validation_split_percentage=0, max_seq_length=16)
    assert "skipped 1 invalid UTF-8 bytes" in caplog.text
    assert rows.num_tokens == wrapped_token_stream(bpe, documents_of(DataArgs(
        train_file=str(tmp_path / "bad.txt"), skip_invalid_utf8=True, validation_split_percentage=0))).size


def test_a_utf8_cleaning_cut_short_leaves_no_truncated_copy_to_resume_from(tmp_path, monkeypatch):
    """--skip_invalid_utf8 reads a json file through a cleaned copy, and a resumed stream reads that copy
    as the data. A write cut short (a kill, a full disk) must leave no part of it under the copy's name:
    the resumed stream then reads every document, not the first half."""
    import pathlib

    from flax_bert.data import sources

    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(b'{"text": "document %d \xff %s"}\n' % (i, b"words " * 20) for i in range(200)))
    args = DataArgs(train_file=str(path), skip_invalid_utf8=True, streaming=True, cache_dir=str(tmp_path / "cache"))
    stream = sources.file_documents(path, args)
    cleaned = sources._cleaned_copy_path(path, sources.resolve_cache_dir(args))
    write_text = pathlib.Path.write_text

    def cut_short(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", cut_short)
    with pytest.raises(OSError, match="No space left"):
        next(stream.cursor())
    monkeypatch.undo()
    assert not cleaned.exists() and not list(cleaned.parent.iterdir())  # nothing half-written, no temporary left
    resumed = list(stream.cursor({"dataset": None, "rows": 0}))
    assert len(resumed) == 200 and resumed[-1].startswith("document 199 ") and "\ufffd" not in resumed[-1]
    assert cleaned.is_file()


def test_missing_text_column(bpe, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"content": "a document"}\n')
    with pytest.raises(DataError, match="has no column 'text' \\(columns: content\\): pass --text_column"):
        _build(tmp_path, bpe, train_file=str(tmp_path / "d.jsonl"))
    assert _nothing_written(tmp_path)


def test_corpus_shorter_than_one_row(bpe, tmp_path):
    (tmp_path / "tiny.txt").write_text("just a few words\n")
    with pytest.raises(DataError, match="less than one row of max_seq_length=128: add text or lower --max_seq_length"):
        _build(tmp_path, bpe, train_file=str(tmp_path / "tiny.txt"), validation_split_percentage=0)
    assert _nothing_written(tmp_path)


def test_hub_dataset_without_network(bpe, tmp_path):
    with pytest.raises(DataError, match="there is no network.*--train_file"):
        _build(tmp_path, bpe, dataset_name="wikitext", dataset_config_name="wikitext-2-raw-v1")


def test_check_tokenizer_fits(bpe):
    check_tokenizer_fits(bpe, model_vocab_size=2000, max_position_embeddings=514, max_seq_length=512,
                         model_type="roberta")
    with pytest.raises(DataError, match="tokenizer has 2000 tokens but the model's vocab_size is 1999"):
        check_tokenizer_fits(bpe, 1999, 514, 128, "roberta")
    with pytest.raises(DataError, match="max_seq_length=513 exceeds the 512 positions roberta can use"):
        check_tokenizer_fits(bpe, 2000, 514, 513, "roberta")  # positions start at pad_token_id + 1 = 2
    check_tokenizer_fits(bpe, 2000, 512, 512, "bert")
    with pytest.raises(DataError, match="exceeds the 512 positions bert"):
        check_tokenizer_fits(bpe, 2000, 512, 513, "bert")


# ---------------------------------------------------------------- next-sentence prediction

def test_nsp_rows_from_the_corpus(wordpiece, cache_root):
    args = DataArgs(cache_dir=str(cache_root), max_seq_length=64, objective="mlm+nsp")
    train = single(build_datasets(args, wordpiece)[0])
    a = {key: np.asarray(value) for key, value in train.arrays.items()}
    assert len(train) >= 2000
    assert abs(a["next_sentence_label"].mean() - 0.5) <= 0.02
    cls, sep = wordpiece.cls_token_id, wordpiece.sep_token_id
    for row in range(len(train)):
        n = int((a["segment_ids"][row] > 0).sum())
        ids, types = a["input_ids"][row], a["token_type_ids"][row]
        assert (a["segment_ids"][row][:n] == 1).all() and (a["segment_ids"][row][n:] == 0).all()
        seps = np.flatnonzero(ids[:n] == sep)
        assert ids[0] == cls and len(seps) == 2 and seps[1] == n - 1 and seps[0] >= 2 and n <= 64
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : n] == 1).all() and (types[n:] == 0).all()


def test_nsp_pairs_are_true_next_half_the_time():
    """Synthetic corpus: token id = 10 + global position, so a pair's origin can be read off its ids."""
    rng = np.random.default_rng(0)
    sentence_lengths = rng.integers(3, 30, size=12_000)
    sentences_per_doc = rng.integers(1, 12, size=2_000)
    sentences_per_doc[-1] += len(sentence_lengths) - sentences_per_doc.sum()
    assert sentences_per_doc[-1] > 0
    unit_offsets = np.concatenate([[0], np.cumsum(sentence_lengths)])
    doc_units = np.concatenate([[0], np.cumsum(sentences_per_doc)])
    corpus = TokenizedCorpus(np.arange(unit_offsets[-1], dtype=np.int32) + 10, unit_offsets, doc_units)
    size = int(unit_offsets[-1]) + 10
    info = data_tokenize.TokenizerInfo("fake", size, 0, (2,), (3,), 2, 3, (0, 1, 2, 3),
                                       np.ones(size, bool), np.zeros(size, bool), "every-token")
    rows = build_nsp_rows(corpus, info, max_seq_length=48, seed=1)
    labels = rows["next_sentence_label"]
    assert len(labels) > 3000 and abs(labels.mean() - 0.5) <= 0.02
    doc_of_token = np.repeat(np.arange(len(sentences_per_doc)), np.add.reduceat(sentence_lengths, doc_units[:-1]))
    for ids, types, label in zip(rows["input_ids"], rows["token_type_ids"], labels):
        real = ids[ids >= 10]
        a, b = real[types[ids >= 10] == 0] - 10, real[types[ids >= 10] == 1] - 10
        assert len(a) and len(b) and len(set(doc_of_token[a])) == 1 and len(set(doc_of_token[b])) == 1
        if label == 0:  # B follows A in the same document
            assert doc_of_token[a[0]] == doc_of_token[b[0]] and a.max() < b.min()
        else:
            assert doc_of_token[a[0]] != doc_of_token[b[0]]


def test_nsp_needs_sentence_pairs_tokenizer(bpe, tmp_path):
    (tmp_path / "one.txt").write_text("A single document. With two sentences.\n")
    with pytest.raises(DataError, match="at least 2 documents"):
        _build(tmp_path, bpe, train_file=str(tmp_path / "one.txt"), objective="mlm+nsp", validation_split_percentage=0)
    assert _nothing_written(tmp_path)
    with pytest.raises(DataError, match="drop --streaming"):
        _build(tmp_path, bpe, train_file=str(tmp_path / "one.txt"), objective="mlm+nsp", streaming=True)


def test_tokenizer_info_knows_the_layout(bpe, wordpiece):
    roberta, bert = tokenizer_info(bpe), tokenizer_info(wordpiece)
    assert (roberta.prefix, roberta.suffix, roberta.pad_id, roberta.word_rule) == ((0,), (2,), 1, "byte-level")
    assert (bert.prefix, bert.suffix, bert.pad_id, bert.word_rule) == ((2,), (3,), 0, "wordpiece")
    assert isinstance(PackedRows({"input_ids": np.zeros((1, 4), np.int32)}, 0), PackedRows)
