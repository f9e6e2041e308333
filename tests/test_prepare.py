"""`flax-bert prepare`: worker processes fill the cache with this process's shards; a later `train`
with the same data flags finds them, says so, and starts without tokenizing."""
import os
import pathlib
import subprocess
import sys

import pytest

from flax_bert.data import tokenize as data_tokenize
from flax_bert.data.pipeline import build_datasets
from flax_bert.data.prepare import prepare_data
from flax_bert.data.sources import DataArgs, training_documents
from flax_bert.data.tokenizer_training import train_tokenizer
from tests.xla_env import one_device_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA_FLAGS = ["--max_seq_length", "64", "--max_train_samples", "300", "--validation_split_percentage", "10",
              "--per_device_train_batch_size", "4", "--data_shards", "4", "--seed", "3"]
TINY_MODEL = ["--model_type", "roberta", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
              "--intermediate_size", "64", "--max_position_embeddings", "66", "--learning_rate", "1e-3",
              "--warmup_steps", "0", "--max_grad_norm", "1.0", "--do_eval", "false", "--progress_bar", "false"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    documents = training_documents(DataArgs(cache_dir=str(root / "cache"), max_train_samples=300))
    train_tokenizer((text for batch in documents.batches() for text in batch), kind="bpe", vocab_size=800,
                    output_dir=root / "tokenizer", model_max_length=64)
    return root


def test_workers_are_separate_processes_and_a_second_build_tokenizes_nothing(workspace, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(workspace / "tokenizer"))
    args = DataArgs(cache_dir=str(workspace / "unit-cache"), max_seq_length=64, max_train_samples=300,
                    validation_split_percentage=10, data_shards=4)
    train, validation = prepare_data(args, tokenizer, seed=0, process_index=0, process_count=1, workers=2)
    assert train.workers == 2 and len(set(train.worker_pids)) == 2 and os.getpid() not in train.worker_pids
    assert train.tokens == train.tokenized_tokens > 0 and validation.tokenized_tokens > 0
    assert "tokens/s per core" in train.describe()

    again, _ = prepare_data(args, tokenizer, seed=0, process_index=0, process_count=1, workers=2)
    assert again.tokenized_tokens == 0 and again.tokens == train.tokens  # found, not redone

    def never(*a, **k):
        raise AssertionError("tokenized although the data was prepared")

    monkeypatch.setattr(data_tokenize, "encode_group", never)
    monkeypatch.setattr("flax_bert.data.pipeline.tokenize_shards_to_cache", never)
    rows, _ = build_datasets(args, tokenizer, process_index=0, process_count=1)
    assert rows.num_tokens == train.tokens


def test_prepare_then_train_starts_without_tokenizing(workspace):
    env = {k: v for k, v in one_device_env().items() if k != "GLIBC_TUNABLES"}  # one CPU device
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    common = [*TINY_MODEL, *DATA_FLAGS, "--tokenizer_name", str(workspace / "tokenizer"),
              "--cache_dir", str(workspace / "cli-cache"), "--output_dir", str(workspace / "run")]
    prepared = subprocess.run([sys.executable, "-m", "flax_bert.cli", "prepare", *common,
                               "--preprocessing_num_workers", "2"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "prepared train: 4 shards" in prepared.stdout and "by 2 worker processes" in prepared.stdout
    assert "tokens/s per core" in prepared.stdout and "prepared validation" in prepared.stdout
    packed = sorted((workspace / "cli-cache" / "packed").iterdir())
    stamps = {folder: folder.stat().st_mtime_ns for folder in packed}

    trained = subprocess.run([sys.executable, str(ROOT / "run_mlm_flax.py"), *common, "--max_steps", "1"], env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert trained.returncode == 0, trained.stderr[-2000:]
    log = trained.stderr
    assert "found the prepared train data" in log and "found the prepared validation data" in log
    assert "first step (compile included)" in log
    assert sorted((workspace / "cli-cache" / "packed").iterdir()) == packed  # nothing new was built
    assert all(folder.stat().st_mtime_ns == stamps[folder] for folder in packed)
    assert "malloc huge pages" in log  # the decision is logged (on, or why not)

    # prepare for the existing run by its directory alone: the run's stored options, as train takes them
    again = subprocess.run([sys.executable, "-m", "flax_bert.cli", "prepare", "--output_dir", str(workspace / "run"),
                            "--cache_dir", str(workspace / "cli-cache")], env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "prepared train: 4 shards" in again.stdout
    assert sorted((workspace / "cli-cache" / "packed").iterdir()) == packed  # the same rows: found, none built


def test_each_host_prepares_only_its_own_shards(workspace, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(workspace / "tokenizer"))
    args = DataArgs(cache_dir=str(workspace / "host-cache"), max_seq_length=64, max_train_samples=300,
                    validation_split_percentage=0, data_shards=4)
    train, = prepare_data(args, tokenizer, seed=0, process_index=1, process_count=2, workers=1)
    assert train.shards == 2 and train.tokenized_tokens > 0  # shards 2 and 3 of 4
    monkeypatch.setattr("flax_bert.data.pipeline.tokenize_shards_to_cache",
                        lambda *a, **k: pytest.fail("process 1 tokenized although its shards were prepared"))
    rows, _ = build_datasets(args, tokenizer, process_index=1, process_count=2)
    assert sorted(rows.shards) == [2, 3] and rows.num_tokens == train.tokens
    with pytest.raises(pytest.fail.Exception):  # process 0's shards were not prepared by process 1
        build_datasets(args, tokenizer, process_index=0, process_count=2)


# in the parent process, the signal arrives while the workers tokenize: when it first waits for one of them
SIGNAL_WHILE_WORKERS_RUN = """
import concurrent.futures, os, signal, sys
real = concurrent.futures.Future.result
def first_wait_sends(self, *args, **kwargs):
    if not getattr(first_wait_sends, "sent", False):
        first_wait_sends.sent = True
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real(self, *args, **kwargs)
concurrent.futures.Future.result = first_wait_sends
from flax_bert.cli import main
sys.exit(main(["prepare", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_prepare_with_exit_0_and_the_same_command_goes_on(workspace, signal_name):
    """As train: both signals stop it where it is, exit 0 and say what to do; the rerun prepares the rest."""
    env = {k: v for k, v in one_device_env().items() if k != "GLIBC_TUNABLES"}
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    cache = workspace / f"stopped-{signal_name}"
    flags = [*TINY_MODEL, *DATA_FLAGS, "--tokenizer_name", str(workspace / "tokenizer"), "--cache_dir", str(cache),
             "--output_dir", str(workspace / f"run-{signal_name}"), "--preprocessing_num_workers", "2"]
    stopped = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_WORKERS_RUN, signal_name, *flags], env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert f"stopped by {signal_name}: the shards prepared so far are whole in the cache — rerun the same command" \
        in stopped.stderr
    assert "Traceback" not in stopped.stderr
    again = subprocess.run([sys.executable, "-m", "flax_bert.cli", "prepare", *flags], env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert again.returncode == 0 and "prepared train: 4 shards" in again.stdout, again.stderr[-2000:]
