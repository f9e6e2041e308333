"""Paths that are URLs (flax_bert.storage): the storage layer on fsspec's in-process memory filesystem, the
output-directory guard on it, and one run end to end with --output_dir, --train_file, --validation_file and
--cache_dir on file:// URLs (fsspec's LocalFileSystem: the nearest to a bucket that needs no network)."""
import builtins
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import threading
import uuid

import jax
import numpy as np
import pytest

from flax_bert import storage
from flax_bert.errors import InputError, MissingDependencyError
from tests.xla_env import one_device_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--model_type", "roberta", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--intermediate_size", "64", "--max_position_embeddings", "34", "--max_seq_length", "32",
        "--tokenizer_vocab_size", "500", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--save_steps", "2", "--logging_steps", "2", "--do_train", "--do_eval", "--progress_bar", "false"]


@pytest.fixture(autouse=True)
def local_cache(monkeypatch, tmp_path) -> pathlib.Path:
    """Local mirrors and staging folders in the test's own folder, never in ~/.cache."""
    monkeypatch.setenv("FLAX_BERT_CACHE", str(tmp_path / "flax_bert_cache"))
    return tmp_path / "flax_bert_cache"


@pytest.fixture
def memory_root():
    root = f"memory://flax-bert-test-{uuid.uuid4().hex[:8]}"
    yield root
    if storage.exists(root):
        storage.remove(root)


@pytest.fixture
def no_local_disk(monkeypatch):
    """Any attempt to open, create, list or delete a local file fails the test."""
    import fsspec

    fsspec.filesystem("memory")  # imported before the local disk is closed

    def refuse(*args, **kwargs):
        raise AssertionError(f"a memory:// operation reached the local disk: {args!r}")

    for module, names in ((builtins, ("open",)), (os, ("open", "stat", "listdir", "scandir", "mkdir", "makedirs",
                                                        "remove", "unlink", "rmdir", "rename", "replace"))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)


def test_storage_on_memory_never_touches_the_local_disk(memory_root, no_local_disk):
    run = storage.join(memory_root, "run")
    assert run == f"{memory_root}/run" and storage.name(run) == "run" and storage.parent(run) == memory_root
    assert not storage.exists(run) and storage.listdir(run) == []
    storage.makedirs(storage.join(run, "sub"))
    storage.write_text(storage.join(run, "sub", "a.txt"), "héllo\n")
    storage.write_atomic(storage.join(run, "run_config.json"), '{"seed": 1}\n')
    storage.write_bytes(storage.join(run, "b.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(run, "sub", "a.txt")) == "héllo\n"
    assert json.loads(storage.read_text(storage.join(run, "run_config.json"))) == {"seed": 1}
    assert storage.listdir(run) == ["b.bin", "run_config.json", "sub"]
    assert storage.isdir(storage.join(run, "sub")) and not storage.isfile(storage.join(run, "sub"))
    assert storage.isfile(storage.join(run, "b.bin")) and storage.suffix(storage.join(run, "b.bin")) == ".bin"
    assert storage.stat(storage.join(run, "sub", "a.txt"))[0] == len("héllo\n".encode())
    with storage.open(storage.join(run, "sub", "a.txt"), "rb") as f:  # streaming reads
        assert f.readline() == "héllo\n".encode()
    storage.remove(storage.join(run, "sub"))  # a whole folder
    storage.remove(storage.join(run, "b.bin"))
    assert storage.listdir(run) == ["run_config.json"]


def test_folders_go_up_and_come_back(memory_root, tmp_path, local_cache):
    local = tmp_path / "tokenizer"
    (local / "nested").mkdir(parents=True)
    (local / "tokenizer_config.json").write_text("{}")
    (local / "vocab.json").write_text('{"a": 0}')
    (local / "nested" / "x.bin").write_bytes(b"123")
    uploaded = storage.upload(local, storage.join(memory_root, "tokenizer"), last=("tokenizer_config.json",))
    assert uploaded[-1] == "tokenizer_config.json" and sorted(uploaded) == ["nested/x.bin", "tokenizer_config.json",
                                                                            "vocab.json"]
    copy = storage.fetch_folder(storage.join(memory_root, "tokenizer"))
    assert copy.is_relative_to(local_cache / "remote")
    assert (copy / "nested" / "x.bin").read_bytes() == b"123" and (copy / "vocab.json").read_text() == '{"a": 0}'


def _copies_paced_by(monkeypatch, before=None, after=None):
    """The memory filesystem's file copy (what every download makes) calls before[thread name]() and
    after[thread name]() around each copy: two downloaders interleave exactly as a test lays out."""
    import fsspec.implementations.memory as memory

    copy = memory.MemoryFileSystem.get_file

    def paced(self, *args, **kwargs):
        name = threading.current_thread().name
        (before or {}).get(name, lambda: None)()
        copy(self, *args, **kwargs)
        (after or {}).get(name, lambda: None)()

    monkeypatch.setattr(memory.MemoryFileSystem, "get_file", paced)


def _in_threads(first, second, second_may_start: threading.Event, finished: dict[str, threading.Event]) -> dict:
    """Runs first() and second() (the second once `second_may_start` is set) in threads of those names;
    returns name -> result or the exception raised."""
    results = {}

    def run(name, work):
        try:
            results[name] = work()
        except Exception as err:  # reported by the test, not lost in the thread
            results[name] = err
        finally:
            finished[name].set()

    threads = [threading.Thread(target=run, args=("first", first), name="first")]
    threads[0].start()
    assert second_may_start.wait(30)
    threads.append(threading.Thread(target=run, args=("second", second), name="second"))
    threads[1].start()
    for thread in threads:
        thread.join(60)
    return results


def test_two_downloaders_of_one_folder_never_delete_each_others_files(memory_root, monkeypatch, local_cache):
    """Two processes of one host fetch the same remote folder; the second starts while the first has
    copied one of three files. Each gets the whole folder, and one copy is left."""
    url = storage.join(memory_root, "tokenizer")
    files = {f"file{i}.json": f'{{"n": {i}}}' for i in range(3)}
    for name, text in files.items():
        storage.write_text(storage.join(url, name), text)
    first_copied_one, second_copying = threading.Event(), threading.Event()
    finished = {"first": threading.Event(), "second": threading.Event()}

    def first_pauses():  # after its first file, until the second has begun copying
        if not first_copied_one.is_set():
            first_copied_one.set()
            assert second_copying.wait(30)

    def second_waits():  # the second copies only once the first has read its folder
        second_copying.set()
        assert finished["first"].wait(30)

    _copies_paced_by(monkeypatch, before={"second": second_waits}, after={"first": first_pauses})

    def fetch_and_read():
        folder = storage.fetch_folder(url)
        return folder, {name: (folder / name).read_text() for name in files}

    results = _in_threads(fetch_and_read, fetch_and_read, first_copied_one, finished)
    for name in ("first", "second"):
        assert not isinstance(results[name], Exception), f"{name}: {results[name]!r}"
        assert results[name][1] == files, name
    assert results["first"][0] == results["second"][0]  # the same version: one copy on disk
    assert [p.name for p in results["first"][0].parent.iterdir()] == [results["first"][0].name]
    # a new version of the folder replaces the old copy
    storage.write_text(storage.join(url, "file0.json"), '{"n": 10}')
    monkeypatch.undo()
    again = storage.fetch_folder(url)
    assert (again / "file0.json").read_text() == '{"n": 10}'
    assert [p.name for p in again.parent.iterdir()] == [again.name]


def test_two_downloaders_of_one_file_use_their_own_temporaries(memory_root, monkeypatch, tmp_path):
    """local_copy from two processes at once: the first pauses between copying and renaming while the
    second copies and renames; neither loses its temporary file to the other."""
    url = storage.join(memory_root, "data.jsonl")
    storage.write_text(url, '{"text": "a document"}\n' * 100)
    first_copied, finished = threading.Event(), {"first": threading.Event(), "second": threading.Event()}

    def first_pauses():
        first_copied.set()
        assert finished["second"].wait(30)

    _copies_paced_by(monkeypatch, after={"first": first_pauses})
    results = _in_threads(lambda: storage.local_copy(url, tmp_path / "downloads"),
                          lambda: storage.local_copy(url, tmp_path / "downloads"), first_copied, finished)
    for name in ("first", "second"):
        assert not isinstance(results[name], Exception), f"{name}: {results[name]!r}"
        assert results[name].read_text() == storage.read_text(url)
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == [results["first"].name]  # no temporaries left


def test_a_remote_key_that_leaves_the_folder_is_refused(memory_root, tmp_path):
    """An object key such as run/tokenizer/../../../x would be written outside the local folder: refused in
    one line, before any file is copied."""
    url = storage.join(memory_root, "run", "tokenizer")
    storage.write_text(storage.join(url, "tokenizer_config.json"), "{}")
    storage.write_text(f"{url}/../../../escaped.txt", "not yours")
    fs, root = storage._fs(url)
    assert f"{root}/../../../escaped.txt" in fs.find(root)  # the store keeps the key as written
    local = tmp_path / "a" / "b" / "c"
    for fetch in (lambda: storage.download(url, local), lambda: storage.fetch_folder(url),
                  lambda: storage.download(url, local, names=["/tmp/escaped.txt"])):
        with pytest.raises(InputError, match=r"escaped.txt'?, which would be written outside .*: refusing") as err:
            fetch()
        assert "\n" not in str(err.value)
    assert not list(tmp_path.rglob("escaped.txt")) and not list(local.rglob("*"))


def test_where_checkpoints_go_and_url_errors(tmp_path):
    assert str(storage.checkpoint_path(f"file://{tmp_path}/run")) == f"{tmp_path}/run"  # file:// is its local path
    assert str(storage.checkpoint_path("gs://bucket/run")) == "gs://bucket/run"  # Orbax writes gs:// itself
    with pytest.raises(InputError, match=r"memory://x/run: checkpoints cannot be written to memory:// .*gs://"):
        storage.checkpoint_path("memory://x/run")
    with pytest.raises(InputError, match="fsspec knows no nosuch:// filesystem"):
        storage.exists("nosuch://x/run")
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(MissingDependencyError, match=r"^gs:// paths need gcsfs: pip install gcsfs \(reading gs://bucket/run/run_config.json\)$"):
            storage.isfile("gs://bucket/run/run_config.json")


def test_output_dir_guard_on_memory(memory_root):
    from flax_bert.run.start import WRITTEN_RECORD, OutputDirError, check_output_dir, claim_written

    run = storage.join(memory_root, "run")
    check_output_dir(run, False, {"seed": 1, "model_type": "roberta"})
    assert json.loads(storage.read_text(storage.join(run, "run_config.json")))["seed"] == 1
    assert "run_config.json" in json.loads(storage.read_text(storage.join(run, WRITTEN_RECORD)))["written"]
    claim_written(run, "metrics.jsonl")  # as a run records each name it writes
    storage.write_text(storage.join(run, "metrics.jsonl"), "{}\n")
    storage.write_text(storage.join(run, "notes.txt"), "mine")
    with pytest.raises(OutputDirError, match="holds a different run .*seed"):
        check_output_dir(run, False, {"seed": 2, "model_type": "roberta"})
    deleted = check_output_dir(run, True, {"seed": 2, "model_type": "roberta"})
    assert "metrics.jsonl" in deleted and "notes.txt" not in deleted
    assert storage.read_text(storage.join(run, "notes.txt")) == "mine"  # not ours: kept
    assert json.loads(storage.read_text(storage.join(run, "run_config.json")))["seed"] == 2


def test_unsupported_output_dir_is_a_one_line_error(memory_root, capsys):
    from flax_bert.cli import main

    assert main(["train", "--output_dir", storage.join(memory_root, "run"), "--max_steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "checkpoints cannot be written to memory://" in err[-1]
    assert not storage.exists(storage.join(memory_root, "run"))  # refused before anything was written


# ----------------------------------------------------------------------------- end to end on file:// URLs
def _run(workdir: pathlib.Path, host_cache: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    env = one_device_env()  # one CPU device: faster compiles
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               FLAX_BERT_CACHE=str(host_cache), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "run_mlm_flax.py"), *TINY, *extra], capture_output=True,
                          text=True, timeout=600, env=env, cwd=workdir, check=False)


@pytest.fixture(scope="module")
def url_runs(tmp_path_factory):
    """A run on file:// URLs, then the same command with more steps on a "second host" (an empty local cache)."""
    from flax_bert.data.corpus import load_builtin_corpus

    root = tmp_path_factory.mktemp("fsspec")
    workdir = root / "cwd"
    workdir.mkdir()
    texts = [" ".join(t.split()) for t in load_builtin_corpus(root / "corpus")[:300]]
    (root / "train.txt").write_text("\n".join(texts[:250]) + "\n")
    (root / "valid.txt").write_text("\n".join(texts[250:]) + "\n")
    flags = ["--output_dir", f"file://{root}/run", "--train_file", f"file://{root}/train.txt",
             "--validation_file", f"file://{root}/valid.txt", "--cache_dir", f"file://{root}/shared"]
    first = _run(workdir, root / "host_a", *flags, "--max_steps", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(workdir, root / "host_b", *flags, "--max_steps", "6")
    assert second.returncode == 0, second.stderr[-3000:]
    return root, workdir, first, second


def test_url_run_trains_checkpoints_resumes_and_exports(url_runs):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    root, workdir, first, second = url_runs
    run = root / "run"
    assert not any(p.name.startswith("file:") for p in list(workdir.iterdir()) + list(ROOT.iterdir()))
    assert "starting fresh" in first.stderr and "resuming from checkpoint" in second.stderr
    assert f"{run}/checkpoints/4 (step 4)" in second.stderr  # continued from step 4, not from 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert "uploaded the export" in second.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 2 in steps and 6 in steps  # the resumed run appended to the first run's metrics
    assert list((run / "tensorboard").iterdir())
    assert json.loads((run / "eval_results.json").read_text())["step"] == 6
    assert json.loads((run / "run_config.json").read_text())["output_dir"] == f"file://{root}/run"
    assert "run_config.json" in json.loads((run / ".flax-bert-written.json").read_text())["written"]
    for host in ("host_a", "host_b"):  # local staging folders are removed once uploaded
        assert not list((root / host / "remote").glob(".stage-*"))
    model = AutoModelForMaskedLM.from_pretrained(str(run)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run))
    import torch

    with torch.no_grad():
        logits = model(**tokenizer("def open(path): return the file", return_tensors="pt")).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_url_inputs_and_shared_cache(url_runs):
    root, _, first, second = url_runs
    assert f"file://{root}/train.txt (all): 250 documents" in first.stderr
    # train: 1 shard (a batch of 4), validation: always 16; tokenized and packed folders of each
    assert "uploaded 2 cache folders to the shared --cache_dir" in first.stderr
    assert "uploaded 32 cache folders to the shared --cache_dir" in first.stderr
    shared = root / "shared"
    assert len(list((shared / "packed").iterdir())) == 17 and len(list((shared / "tokenized").iterdir())) == 17
    assert "downloaded 1 cache folder (packed/" in second.stderr and "nothing to tokenize" in second.stderr
    assert "cache folders to the shared" not in second.stderr  # nothing new to upload
    assert not list((root / "host_b" / "remote").glob("*-shared/tokenized"))  # the second host tokenized nothing
    mirrors = list((root / "host_b" / "remote").glob("*-shared/packed/*/meta.json"))
    assert len(mirrors) == 17 and all(json.loads(m.read_text())["rows"] > 0 for m in mirrors)


def test_url_run_reads_back_and_plots(url_runs):
    from flax_bert.plot import plot_run
    from flax_bert.run.directory import load_run_model

    root = url_runs[0]
    model, tokenizer, run, step = load_run_model(f"file://{root}/run")
    from flax import nnx

    assert step == 6 and run["max_steps"] == 6 and len(tokenizer) <= model.config.vocab_size
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert plot_run(f"file://{root}/run") == f"file://{root}/run/curves.png"
    assert (root / "run" / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_export_command_writes_to_a_url_and_fill_mask_reads_it(url_runs, monkeypatch):
    from flax_bert.errors import InputFileExistsError
    from flax_bert.run.export import write_model_folder
    from flax_bert.fill_mask import fill_mask, load_for_inference
    from flax_bert.run.directory import load_run_model

    root = url_runs[0]
    model, tokenizer, run, step = load_run_model(f"file://{root}/run/checkpoints/4")
    target = f"file://{root}/exported"
    assert write_model_folder(model, target, tokenizer, run, step, 4, None, overwrite=False) == target
    assert (root / "exported" / "model.safetensors").is_file() and (root / "exported" / "config.json").is_file()
    assert f"from_pretrained(\"{target}\")" in (root / "exported" / "README.md").read_text()
    with pytest.raises(InputFileExistsError, match="already holds a model"):
        write_model_folder(model, target, tokenizer, run, step, 4, None, overwrite=False)
    from fsspec.implementations.local import LocalFileSystem

    upload_file = LocalFileSystem.put_file

    def interrupted(self, source, destination, **kwargs):
        if destination.endswith("model.safetensors"):
            raise OSError("connection lost")
        return upload_file(self, source, destination, **kwargs)

    # an export cut off halfway never looks finished: the old config.json went first, the new one comes last
    with monkeypatch.context() as patch, pytest.raises(OSError, match="connection lost"):
        patch.setattr(LocalFileSystem, "put_file", interrupted)
        write_model_folder(model, target, tokenizer, run, step, 4, None, overwrite=True)
    assert not (root / "exported" / "config.json").exists()
    write_model_folder(model, target, tokenizer, run, step, 4, None, overwrite=True)
    loaded, loaded_tokenizer = load_for_inference(target)
    (predictions,) = fill_mask(loaded, loaded_tokenizer, f"def open{loaded_tokenizer.mask_token} return the file")
    assert len(predictions) == 5 and all(0 <= p <= 1 for _, p in predictions)


def test_data_files_on_a_url(memory_root, tmp_path):
    from flax_bert.data.sources import (
        DataArgs,
        DataError,
        DataFileNotFoundError,
        file_documents,
    )

    args = DataArgs(validation_split_percentage=0, cache_dir=str(tmp_path))
    text = storage.join(memory_root, "corpus.txt")
    storage.write_text(text, "first document\n\nsecond document\n")
    stream = file_documents(text, args)
    assert stream.name == text and [d for batch in stream.batches() for d in batch] == ["first document",
                                                                                        "second document"]
    fingerprint = stream.fingerprint
    storage.write_text(text, "first document\n\nsecond document, changed\n")
    assert file_documents(text, args).fingerprint != fingerprint  # a new object: tokenized again
    table = storage.join(memory_root, "rows.jsonl")
    storage.write_text(table, '{"text": "a row"}\n{"text": "another row"}\n')
    assert [d for batch in file_documents(table, args).batches() for d in batch] == ["a row", "another row"]
    assert len(list((tmp_path / "downloads").glob("*.jsonl"))) == 1  # read by datasets from a local copy
    storage.write_bytes(storage.join(memory_root, "bad.txt"), b"fine\nbad \xff byte\n")
    with pytest.raises(DataError, match=rf"{memory_root}/bad.txt is not valid UTF-8 \(byte offset 9\)"):
        list(file_documents(storage.join(memory_root, "bad.txt"), args).batches())
    with pytest.raises(DataFileNotFoundError, match=rf"data file {memory_root}/missing.txt does not exist"):
        file_documents(storage.join(memory_root, "missing.txt"), args)


def test_shared_cache_folders_on_a_url(memory_root, tmp_path):
    from flax_bert.data import shared_cache
    here, there = tmp_path / "host_a", tmp_path / "host_b"
    built = here / "packed" / "key1"
    built.mkdir(parents=True)
    (built / "input_ids.npy").write_bytes(b"rows")
    (built / "meta.json").write_text('{"rows": 1}')
    unfinished = here / "packed" / "key2"  # no meta.json: still being written
    unfinished.mkdir()
    (unfinished / "input_ids.npy").write_bytes(b"half")
    assert shared_cache.publish(memory_root, here, [built, unfinished]) == [built]
    assert shared_cache.publish(memory_root, here, [built]) == []  # already there
    storage.write_bytes(storage.join(memory_root, "packed", "key3", "input_ids.npy"), b"no marker")
    wanted = [there / "packed" / "key1", there / "packed" / "key2", there / "packed" / "key3"]
    assert shared_cache.fetch(memory_root, there, wanted) == [wanted[0]]  # only complete folders come down
    assert (wanted[0] / "input_ids.npy").read_bytes() == b"rows" and not wanted[1].exists()
    assert not list((there / "packed").glob(".download-*"))
    (built / "input_ids.npy").write_bytes(b"rows, rebuilt")  # --overwrite_cache replaces the shared copy
    assert shared_cache.publish(memory_root, here, [built], replace=True) == [built]
    assert storage.read_bytes(storage.join(memory_root, "packed", "key1", "input_ids.npy")) == b"rows, rebuilt"
