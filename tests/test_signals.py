"""The ctrl-C contract through the real command: SIGINT and SIGTERM stop a run the same way before the train
loop (exit 0, one line saying to rerun) and in it (the step is saved, exit 0); a further ctrl-C while the
finished run shuts down exits at once without a traceback."""
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.xla_env import one_device_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--intermediate_size", "64",
        "--max_position_embeddings", "34", "--max_seq_length", "32", "--tokenizer_vocab_size", "500",
        "--per_device_train_batch_size", "4", "--max_train_samples", "400", "--max_eval_samples", "50",
        "--progress_bar", "false", "--logging_steps", "1", "--save_steps", "0"]


def start(out: pathlib.Path, log: pathlib.Path, *extra: str) -> subprocess.Popen:
    env = one_device_env()  # one CPU device: a quick compile
    env.update(HF_HUB_OFFLINE="1", FLAX_BERT_HUGEPAGES="0", FLAX_BERT_CACHE=str(out.parent / "cache"))
    return subprocess.Popen([sys.executable, "-m", "flax_bert.cli", "train", *TINY, "--output_dir", str(out), *extra],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(text: str, process: subprocess.Popen, log: pathlib.Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None, f"ended before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_before_the_train_loop_stops_with_status_0_and_the_rerun_hint(signum, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    process = start(out, log, "--max_steps", "5")
    wait_for("training a 500-token bpe tokenizer", process, log)  # before the loop: the tokenizer
    process.send_signal(signum)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert f"stopped by {signum.name} outside the train loop" in output and "rerun the same command" in output
    assert "Traceback" not in output and "interrupted" not in output


def test_ctrl_c_in_the_loop_saves_and_a_second_one_while_shutting_down_prints_no_traceback(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    process = start(out, log, "--max_steps", "100000")
    wait_for("first step (compile included)", process, log)
    process.send_signal(signal.SIGINT)
    wait_for("checkpoint saved — rerun the same command to resume", process, log, timeout=120)
    time.sleep(0.2)
    if process.poll() is None:  # still shutting down (Orbax's and JAX's exit hooks)
        process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert "SIGINT received: finishing this step, saving a checkpoint" in output
    assert "Traceback" not in output and "Exception ignored" not in output, output[-3000:]
    assert any(p.name.isdigit() for p in (out / "checkpoints").iterdir())
