"""A streamed run resumes from its saved position: the state handed out with each batch restores a new
iterator bit for bit (text file, jsonl through datasets, the built-in corpus; packed and line by line; one
and two processes; across epochs), and the resumed iterator reads no document before that position."""

import json
import logging
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from flax_bert.data import corpus

from flax_bert.data import streaming as data_streaming
from flax_bert.data.pipeline import DataArgs, DataError, build_datasets
from flax_bert.data.cursors import DatasetCursor, LineFileCursor
from flax_bert.data.tokenizer_training import train_tokenizer
from tests.xla_env import one_device_env

GROUP_DOCS = 10  # tiny tokenizer groups, so that a run of ~200 batches has dozens of them to resume into
BUFFER = 20


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return corpus.load_builtin_corpus(tmp_path_factory.mktemp("cache"))[:160]


@pytest.fixture(scope="module")
def tokenizer(texts, tmp_path_factory):
    return train_tokenizer(texts, kind="bpe", vocab_size=600, output_dir=tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture(scope="module")
def files(texts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    (folder / "docs.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in texts), encoding="utf-8")
    (folder / "blocks.txt").write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts) + "\n", encoding="utf-8")
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    (folder / "parts").mkdir()  # a dataset of 4 files: each of 2 processes reads its own 2
    for part in range(4):
        (folder / "parts" / f"part{part}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts[part::4]), encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    monkeypatch.setattr(data_streaming, "GROUP_CHUNK", GROUP_DOCS)
    monkeypatch.setattr(data_streaming, "GROUP_CHARS", 1)


@pytest.fixture
def reads(monkeypatch):
    """Every document the sources hand out: (text, place after it): byte offset or datasets row number."""
    log = []

    def recording(original, where):
        def documents(self):
            for text in original(self):
                log.append((text, where(self)))
                yield text
        return documents

    monkeypatch.setattr(LineFileCursor, "_documents",
                        recording(LineFileCursor._documents, lambda cursor: cursor._position["offset"]))
    monkeypatch.setattr(DatasetCursor, "_documents", recording(DatasetCursor._documents, lambda cursor: cursor._rows))
    return log


def innermost(position: dict) -> dict:
    while "inner" in position:
        position = position["inner"]
    return position


CASES = {  # name: (DataArgs overrides, process_index, process_count, batch size, epochs)
    "text-packed": ({"train_file": "docs.txt"}, 0, 1, 4),
    "text-blocks-line-by-line-2-processes": ({"train_file": "blocks.txt", "line_by_line": True,
                                              "blank_line_documents": True}, 1, 2, 8),
    "jsonl-datasets-packed": ({"train_file": "docs.jsonl"}, 0, 1, 4),
    "jsonl-datasets-2-processes": ({"train_file": "docs.jsonl"}, 0, 2, 8),
    "builtin-corpus": ({"max_train_samples": 150}, 0, 1, 4),
    "dataset-of-4-files-2-processes": ({"dataset_name": "parts", "validation_split_percentage": 0}, 1, 2, 8),
}


def _rows(files, tokenizer, overrides, process, count, cache, max_seq_length=32):
    overrides = dict(overrides)
    for name in ("train_file", "dataset_name"):
        if name in overrides:
            overrides[name] = str(files / overrides[name])
    overrides.setdefault("validation_split_percentage", 5)
    overrides.setdefault("shuffle_buffer_size", BUFFER)
    args = DataArgs(cache_dir=str(cache), max_seq_length=max_seq_length, streaming=True, **overrides)
    return build_datasets(args, tokenizer, process_index=process, process_count=count)


@pytest.mark.parametrize("case", CASES)
def test_a_resumed_stream_continues_bit_identically_from_its_position(case, files, tokenizer, reads, tmp_path, caplog):
    overrides, process, count, batch = CASES[case]
    train = _rows(files, tokenizer, overrides, process, count, tmp_path)[0]
    iterator = train.iterator(batch, seed=5)
    total = 200
    batches, states, read_so_far = [], [], []
    for _ in range(total):
        batches.append(next(iterator))
        states.append(iterator.state_dict())
        read_so_far.append(len(reads))
    places = sorted({place for _, place in reads})  # where documents end (the same in every epoch)
    epochs = {state["snapshot"]["epoch"] for state in states}
    assert len(epochs) >= 3, f"{case}: the run should cross epochs, saw {epochs}"
    assert len({id(state["snapshot"]) for state in states}) > 20  # many groups: resumes land inside them

    # a resume reads at most the groups of its next batch: its share of them (2 processes), plus a refill of
    # the buffer when the snapshot opened an epoch; the uninterrupted run had read far more by then
    budget = count * (BUFFER + 3 * GROUP_DOCS)
    epoch_starts = [k for k in range(1, total) if states[k]["snapshot"]["epoch"] != states[k - 1]["snapshot"]["epoch"]]
    for k in sorted({3, 37, 101, 160, *epoch_starts[:2], epoch_starts[0] - 1}):
        state = json.loads(json.dumps(states[k - 1]))  # as a checkpoint stores it
        reads.clear()
        caplog.clear()
        resumed = train.iterator(batch, seed=5)
        with caplog.at_level(logging.INFO, logger="flax_bert.data.streaming"):
            resumed.load_state_dict(state)
        assert "no replay" in caplog.text
        got = [next(resumed)]
        first = list(reads)
        got += [next(resumed) for _ in range(11)]
        for index, (ours, want) in enumerate(zip(got, batches[k : k + 12], strict=True)):
            assert ours.keys() == want.keys()
            for name in want:
                assert ours[name].tobytes() == want[name].tobytes(), f"{case}: batch {k + index}, {name}"

        saved = innermost(state["snapshot"]["source"])
        saved = saved["offset"] if "offset" in saved else saved["rows"]
        assert len(first) <= budget, f"{case}: resuming at batch {k} read {len(first)} documents"
        if k >= 101:  # a replay would have read everything the uninterrupted run read up to there
            assert len(first) < read_so_far[k - 1] / 2
        if not first:
            continue
        this_epoch = [first[0]]  # a new epoch starts reading the source again from its start
        for previous, current in zip(first, first[1:], strict=False):
            if current[1] <= previous[1]:
                break
            this_epoch.append(current)
        expected_first = places[0] if state["snapshot"]["exhausted"] else min(p for p in places if p > saved)
        assert this_epoch[0][1] == expected_first, f"{case}: batch {k} resumed reading at {first[0][1]}, not {saved}"


def test_a_checkpoint_with_a_batch_count_only_replays_and_says_so(files, tokenizer, tmp_path, caplog):
    train = _rows(files, tokenizer, {"train_file": "docs.txt"}, 0, 1, tmp_path)[0]
    iterator = train.iterator(4, seed=2)
    expected = [next(iterator) for _ in range(30)]
    old = train.iterator(4, seed=2)
    with caplog.at_level(logging.WARNING, logger="flax_bert.data.streaming"):
        old.load_state_dict({"batches": 20, "process_count": 1})  # what earlier versions saved
    assert "holds a batch count only" in caplog.text and "replaying 20 batches" in caplog.text
    for want in expected[20:]:
        np.testing.assert_array_equal(next(old)["input_ids"], want["input_ids"])


def test_another_process_state_replays_and_a_new_batch_size_continues_at_the_same_row(files, tokenizer, tmp_path,
                                                                                     caplog):
    shares = [_rows(files, tokenizer, {"train_file": "docs.txt"}, p, 2, tmp_path)[0] for p in (0, 1)]
    first = shares[0].iterator(8, seed=1)
    for _ in range(9):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    plain = shares[1].iterator(8, seed=1)
    expected = [next(plain) for _ in range(12)]
    other = shares[1].iterator(8, seed=1)
    with caplog.at_level(logging.WARNING, logger="flax_bert.data.streaming"):
        other.load_state_dict(state)  # only the first process's state is in a checkpoint
    assert "another process's stream position" in caplog.text
    np.testing.assert_array_equal(next(other)["input_ids"], expected[9]["input_ids"])

    # the local batch of 4 rows becomes 8 (global 16 over 2 processes): the next rows are the same rows
    wider = shares[0].iterator(16, seed=1)
    wider.load_state_dict(state)
    rows_after = np.concatenate([b["input_ids"] for b in [next(first) for _ in range(4)]])
    np.testing.assert_array_equal(np.concatenate([next(wider)["input_ids"] for _ in range(2)]), rows_after)


GATHER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from flax_bert.data.streaming import states_of_every_process
p = jax.process_index()
state = {"batches": 7, "process_count": 2, "process_index": p, "rows_since_snapshot": p,
         "snapshot": {"buffer": ["\u00e9 process %d" % p] * (1 + 500 * p)}}
print("GATHERED " + json.dumps(states_of_every_process(state)))
"""


def test_every_process_state_is_gathered_for_the_checkpoint_and_each_resumes_from_its_own(files, tokenizer, tmp_path,
                                                                                          caplog):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    env = one_device_env()
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(pathlib.Path(__file__).resolve().parent.parent))
    processes = [subprocess.Popen([sys.executable, "-c", GATHER, address, str(p)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env) for p in (0, 1)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    gathered = [json.loads(line.split(" ", 1)[1]) for out in outputs for line in out.splitlines()
                if line.startswith("GATHERED ")]
    assert len(gathered) == 2 and gathered[0] == gathered[1], outputs
    assert [state["process_index"] for state in gathered[0]["processes"]] == [0, 1]
    assert len(gathered[0]["processes"][1]["snapshot"]["buffer"]) == 501  # states of different sizes, whole

    # a checkpoint holding both processes' states: each resumes from its own, without replay
    shares = [_rows(files, tokenizer, {"train_file": "docs.txt"}, p, 2, tmp_path)[0] for p in (0, 1)]
    iterators = [share.iterator(8, seed=4) for share in shares]
    for _ in range(15):
        for iterator in iterators:
            next(iterator)
    saved = json.loads(json.dumps({"batches": 15, "process_count": 2,
                                   "processes": [iterator.state_dict() for iterator in iterators]}))
    for share, iterator in zip(shares, iterators, strict=True):
        resumed = share.iterator(8, seed=4)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flax_bert.data.streaming"):
            resumed.load_state_dict(saved)
        assert "no replay" in caplog.text and "replaying" not in caplog.text
        for _ in range(5):
            np.testing.assert_array_equal(next(resumed)["input_ids"], next(iterator)["input_ids"])


def test_a_changed_shuffle_buffer_on_resume_loses_and_repeats_no_document(files, tokenizer, tmp_path):
    def real_tokens(batches):
        return np.sort(np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in batches]))

    for size in (1, 5, 40):  # no shuffling (the saved buffer comes out first), a smaller and a larger buffer
        shuffled = _rows(files, tokenizer, {"train_file": "docs.txt"}, 0, 1, tmp_path)[0]
        iterator = shuffled.iterator(4, seed=3, num_epochs=1)
        before = [next(iterator) for _ in range(10)]
        state = json.loads(json.dumps(iterator.state_dict()))
        whole_epoch = real_tokens(before + list(iterator))
        assert state["snapshot"]["buffer"]  # the saved buffer holds documents not yet handed out
        changed = _rows(files, tokenizer, {"train_file": "docs.txt", "shuffle_buffer_size": size}, 0, 1, tmp_path)[0]
        resumed = changed.iterator(4, seed=3, num_epochs=1)
        resumed.load_state_dict(state)
        np.testing.assert_array_equal(real_tokens(before + list(resumed)), whole_epoch, err_msg=f"buffer {size}")


def test_a_text_file_changed_since_the_checkpoint_is_refused_with_one_line(files, tokenizer, tmp_path):
    shutil.copy(files / "docs.txt", tmp_path / "docs.txt")
    train = _rows(tmp_path, tokenizer, {"train_file": "docs.txt"}, 0, 1, tmp_path / "cache")[0]
    iterator = train.iterator(4, seed=1)
    for _ in range(30):
        next(iterator)
    state = json.loads(json.dumps(iterator.state_dict()))
    with open(tmp_path / "docs.txt", "a", encoding="utf-8") as more:
        more.write("A document added after the checkpoint.\n")
    resumed = train.iterator(4, seed=1)
    resumed.load_state_dict(state)
    with pytest.raises(DataError, match=r"docs.txt has changed since the checkpoint was saved \(\d+ bytes then, "
                                        r"\d+ now\): restore the file"):
        next(resumed)


def test_a_finite_evaluation_stream_resumes_through_its_filled_last_batch(files, tokenizer, tmp_path):
    evaluation = _rows(files, tokenizer, {"train_file": "docs.txt", "validation_split_percentage": 50}, 0, 1,
                       tmp_path)[1]
    iterator = evaluation.iterator(4, shuffle=False, num_epochs=2)
    batches, states = [], []
    for batch in iterator:
        batches.append(batch)
        states.append(iterator.state_dict())
    assert (batches[-1]["segment_ids"] == 0).any()  # the last batch is filled with empty rows
    for k in (1, len(batches) // 2, len(batches) - 1, len(batches)):
        resumed = evaluation.iterator(4, shuffle=False, num_epochs=2)
        resumed.load_state_dict(json.loads(json.dumps(states[k - 1])))
        rest = list(resumed)
        assert len(rest) == len(batches) - k
        for got, want in zip(rest, batches[k:], strict=True):
            np.testing.assert_array_equal(got["input_ids"], want["input_ids"])


def test_a_stream_at_a_new_length_reads_on_after_the_previous_phases_documents(files, tokenizer, tmp_path, caplog):
    """A phase that packs the stream at a new length reads on after the documents the previous phase's stream
    read (a stream is not started over): unshuffled, its rows are a fresh 64-token stream's over the documents
    after the group the previous phase's last batch came from; a resume inside the new phase continues it."""
    unshuffled = {"train_file": "docs.txt", "shuffle_buffer_size": 0, "validation_split_percentage": 0}
    short = _rows(files, tokenizer, unshuffled, 0, 1, tmp_path / "short")[0].iterator(4, seed=0)
    for _ in range(7):
        next(short)
    boundary = json.loads(json.dumps(short.state_dict()))  # as the checkpoint at the phase's last step holds it
    read_on = boundary["snapshot"]["documents"] + GROUP_DOCS  # documents read up to the end of that group

    long_rows = _rows(files, tokenizer, unshuffled, 0, 1, tmp_path / "long", max_seq_length=64)[0]
    long = long_rows.iterator(4, seed=1)
    with caplog.at_level(logging.INFO, logger="flax_bert.data.streaming"):
        long.continue_after(boundary)
    assert "reads on after the previous phase's documents, packed at 64 tokens" in caplog.text
    got = [next(long) for _ in range(6)]
    (files / "rest.txt").write_text("".join((files / "docs.txt").read_text(encoding="utf-8").splitlines(True)[read_on:]),
                                    encoding="utf-8")
    fresh = _rows(files, tokenizer, {**unshuffled, "train_file": "rest.txt"}, 0, 1, tmp_path / "rest",
                  max_seq_length=64)[0].iterator(4, seed=1)
    for ours in got:
        want = next(fresh)
        assert ours["input_ids"].shape == (4, 64)
        for key in want:
            np.testing.assert_array_equal(ours[key], want[key])

    inside = json.loads(json.dumps(long.state_dict()))  # a checkpoint inside the new phase
    resumed = long_rows.iterator(4, seed=1)
    resumed.load_state_dict(inside)
    for _ in range(3):
        np.testing.assert_array_equal(next(resumed)["input_ids"], next(long)["input_ids"])


def test_a_streamed_run_resumed_from_its_checkpoint_ends_like_the_uninterrupted_one(tmp_path_factory):
    """Through run_mlm_flax.py, a streamed run of two phases (32 tokens to step 8, then 64: the stream re-packed,
    read on after the first phase's documents) keeps checkpoints 8, 16 and 24. Copies cut back to step 8 (the
    phase boundary) and to step 16 (inside the second phase) resume there, say so without replay, and export the
    same bytes."""
    from tests.test_resume import assert_same_parameters, complete_checkpoints, new_workspace, resumed_from

    workspace = new_workspace(tmp_path_factory.mktemp("stream-resume"))
    streamed = ["--streaming", "--shuffle_buffer_size", "64", "--max_steps", "-1", "--save_steps", "8",
                "--warmup_steps", "2", "--phases", "[{until_step: 8, max_seq_length: 32}, {until_step: 24, max_seq_length: 64}]"]
    reference = workspace.root / "uninterrupted"
    result = workspace.run(reference, *streamed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert complete_checkpoints(reference) == [8, 16, 24]
    assert "reads on after the previous phase's documents, packed at 64 tokens" in result.stderr
    saved = json.loads((reference / "checkpoints" / "8" / "data" / "metadata").read_text())
    assert saved["batches"] == 8 and saved["snapshot"]["source"] is not None
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert {(row["phase"], row["max_seq_length"]) for row in rows if "train_loss" in row} == {(0, 32), (1, 64)}

    for step, says in ((8, "reads on after the previous phase's documents"), (16, "streaming resumes at")):
        out = workspace.root / f"resumed-{step}"
        shutil.copytree(reference, out)
        (out / "model.safetensors").unlink()
        for later in (16, 24)[(step == 16):]:
            shutil.rmtree(out / "checkpoints" / str(later))
        result = workspace.run(out, *streamed)
        assert result.returncode == 0, result.stderr[-3000:]
        assert resumed_from(result.stderr, out, step), result.stderr[-3000:]
        assert says in result.stderr and "replaying" not in result.stderr, result.stderr[-3000:]
        assert_same_parameters(out, reference)
