"""Resuming end to end, through run_mlm_flax.py in subprocesses: a run killed (SIGKILL) after a save or
stopped (SIGTERM) mid-run and then rerun ends bit-for-bit where the uninterrupted run ends; a damaged latest
checkpoint falls back to the previous one; a diverging run stops naming the step with its last checkpoint
intact; an output_dir holding another run's files is refused.

The runs share one tokenizer, one data cache and one JAX compilation cache: every run of the same command
then loads the train step the first run compiled instead of compiling it again (XLA compiles the same
program to the same code, so this saves minutes without changing any number)."""
import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.xla_env import one_device_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_STEPS, SAVE_STEPS, LOGGING_STEPS = 64, 8, 4  # ~50 steps after the first save: time to kill
TINY_RUN = ["--model_type", "roberta", "--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "2",
            "--intermediate_size", "128", "--max_position_embeddings", "66", "--max_seq_length", "64",
            "--tokenizer_vocab_size", "1000", "--per_device_train_batch_size", "4", "--learning_rate", "2e-3",
            "--warmup_steps", "4", "--max_train_samples", "400", "--max_steps", str(MAX_STEPS),
            "--save_steps", str(SAVE_STEPS), "--logging_steps", str(LOGGING_STEPS), "--do_train", "--do_eval", "false",
            "--progress_bar", "false", "--weight_decay", "0.01", "--adam_beta2", "0.98", "--adam_epsilon", "1e-6", "--max_grad_norm", "1.0",]
RUN_TIMEOUT = 300


class Workspace:
    """What every run shares, and how to start one."""

    def __init__(self, root: pathlib.Path):
        self.root, self.cache, self.tokenizer = root, root / "cache", root / "tokenizer"
        self.env = one_device_env()  # one CPU device: faster compiles
        self.env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        FLAX_BERT_CACHE=str(self.cache))  # the XLA cache: the test run's own (conftest)

    def command(self, out: pathlib.Path, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "run_mlm_flax.py"), *TINY_RUN, "--tokenizer_name", str(self.tokenizer),
                "--cache_dir", str(self.cache), "--output_dir", str(out), *extra]  # later flags override earlier

    def run(self, out: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(out, *extra), capture_output=True, text=True, timeout=RUN_TIMEOUT,
                              env=self.env, cwd=ROOT)

    def start(self, out: pathlib.Path, *extra: str) -> tuple[subprocess.Popen, pathlib.Path]:
        """A run in the background, stdout and stderr into a log file (a pipe nobody reads could block it)."""
        log = out.parent / f"{out.name}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen(self.command(out, *extra), stdout=handle, stderr=subprocess.STDOUT,
                                       env=self.env, cwd=ROOT)
        return process, log


def new_workspace(root: pathlib.Path) -> Workspace:
    """A 1000-token BPE tokenizer trained once on the built-in corpus (each run would otherwise train its own)."""
    from flax_bert.data.sources import DataArgs, training_documents
    from flax_bert.data.tokenizer_training import train_tokenizer

    ws = Workspace(root)
    documents = training_documents(DataArgs(cache_dir=str(ws.cache), max_train_samples=400))
    train_tokenizer((text for batch in documents.batches() for text in batch), kind="bpe", vocab_size=1000,
                    output_dir=ws.tokenizer, model_max_length=64)
    return ws


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return new_workspace(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def reference(workspace) -> pathlib.Path:
    """The uninterrupted run (never modified: tests that damage a run work on a copy)."""
    out = workspace.root / "uninterrupted"
    result = workspace.run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    kept = [MAX_STEPS - 2 * SAVE_STEPS, MAX_STEPS - SAVE_STEPS, MAX_STEPS]  # --save_total_limit 3
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == kept
    return out


# ----------------------------------------------------------------------------- helpers
def complete_checkpoints(out: pathlib.Path) -> list[int]:
    """Steps whose bundle finished writing: Orbax names a bundle by its bare step only once it is whole."""
    folder = out / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def wait_until(condition, process: subprocess.Popen, log: pathlib.Path, what: str, timeout: float = RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run exited ({process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)  # steps take ~20 ms here: poll faster than that


def exported_tensors(out: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(out / "model.safetensors"))


def assert_same_parameters(out: pathlib.Path, reference: pathlib.Path) -> None:
    ours, theirs = exported_tensors(out), exported_tensors(reference)
    assert sorted(ours) == sorted(theirs) and ours
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert ours[name].tobytes() == tensor.tobytes(), f"{name} differs from the uninterrupted run"


def train_losses(out: pathlib.Path) -> dict[int, list[float]]:
    """{step: every train_loss logged at it}; a resumed run appends to metrics.jsonl, so a step logged before
    the interruption and again after the resume appears twice."""
    losses: dict[int, list[float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train_loss" in record:
            losses.setdefault(record["step"], []).append(record["train_loss"])
    return losses


def resumed_from(output: str, out: pathlib.Path, step: int) -> bool:
    return f"resuming from checkpoint {out / 'checkpoints' / str(step)} (step {step})" in output


# ----------------------------------------------------------------------------- interruptions
def test_sigkill_after_a_save_then_rerun_matches_the_uninterrupted_run(workspace, reference, tmp_path):
    out = tmp_path / "run"
    process, log = workspace.start(out)
    wait_until(lambda: complete_checkpoints(out), process, log, "a complete checkpoint")
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended on its own before it could be killed"
    saved = complete_checkpoints(out)[-1]  # newer ones may have been half written: their tmp folders stay
    assert SAVE_STEPS <= saved < MAX_STEPS and not (out / "model.safetensors").exists()

    result = workspace.run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert resumed_from(result.stderr, out, saved), result.stderr[-3000:]
    assert_same_parameters(out, reference)
    expected, logged = train_losses(reference), train_losses(out)
    assert list(expected) == list(range(LOGGING_STEPS, MAX_STEPS + 1, LOGGING_STEPS))
    assert sorted(logged) == sorted(expected)
    for step, losses in logged.items():  # before the kill and after the resume alike
        assert losses == expected[step] * len(losses), f"step {step}: {losses} vs {expected[step]}"
    assert len(logged[MAX_STEPS]) == 1 and len(logged[LOGGING_STEPS]) == 1


def test_sigterm_saves_the_current_step_exits_0_and_the_rerun_matches(workspace, reference, tmp_path):
    out = tmp_path / "run"
    process, log = workspace.start(out)
    # the guard is up once the loop runs; the first step's log line says it has (and ~60 steps remain)
    wait_until(lambda: "first step (compile included)" in log.read_text(), process, log, "the first step")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert "SIGTERM received" in output
    match = re.search(r"stopped at step (\d+) by a signal; checkpoint saved", output)
    assert match, output[-3000:]
    stopped = int(match[1])
    assert 1 <= stopped < MAX_STEPS
    assert complete_checkpoints(out)[-1] == stopped  # saved at the step it stopped, not only at --save_steps
    assert not (out / "model.safetensors").exists()  # a stopped run does not export a half-trained model

    result = workspace.run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert resumed_from(result.stderr, out, stopped), result.stderr[-3000:]
    assert_same_parameters(out, reference)


def test_a_truncated_latest_checkpoint_is_named_and_the_previous_one_used(workspace, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "model.safetensors").unlink()  # so the export below is the rerun's
    latest, previous = complete_checkpoints(out)[-1], complete_checkpoints(out)[-2]
    damaged = out / "checkpoints" / str(latest)
    biggest = max((p for p in (damaged / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as handle:  # the parameters' bytes: cut in half, as a full disk would leave them
        handle.truncate(biggest.stat().st_size // 2)

    result = workspace.run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {damaged} is damaged" in result.stderr, result.stderr[-3000:]
    assert f"restored step {previous}" in result.stderr
    assert (out / "checkpoints_damaged" / str(latest)).is_dir()  # set aside for inspection, not deleted
    assert complete_checkpoints(out)[-1] == MAX_STEPS  # the rerun trained past it again
    assert_same_parameters(out, reference)


def test_a_diverging_run_stops_naming_the_step_with_its_last_checkpoint_intact(workspace, tmp_path):
    import jax

    from flax_bert.run.checkpoint import Checkpointer

    out = tmp_path / "run"
    # AdamW moves every weight by ~lr per step whatever the gradient: at 1e6 the logits overflow in a few steps
    result = workspace.run(out, "--learning_rate", "1e6", "--warmup_steps", "0", "--max_steps", "12",
                           "--save_steps", "1", "--logging_steps", "1")
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: (loss|gradient norm) is (nan|inf|-inf) at step (\d+): .*", last_line)
    assert match, result.stderr[-3000:]
    bad_step = int(match[3])
    assert 1 < bad_step < 12
    assert "Traceback" not in result.stderr
    assert complete_checkpoints(out)[-1] == bad_step - 1  # saved every step until the bad one, not at it

    checkpoints = Checkpointer.for_path(out)
    params, _, step = checkpoints.restore_params()
    assert step == bad_step - 1 and not checkpoints.damaged
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- someone else's output_dir
@pytest.mark.parametrize("whose", ["another seed's run", "an unrelated file"])
def test_an_output_dir_of_something_else_is_refused_and_kept(whose, workspace, reference, tmp_path, capsys):
    from flax_bert.cli import run_mlm_flax_main

    out = tmp_path / "run"
    if whose == "another seed's run":
        shutil.copytree(reference, out)
        expected = "--seed 7 differs from the run's 42"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("my notes\n")
        expected = "holds files flax-bert did not write (notes.txt)"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = workspace.command(out, "--seed", "7")[2:]  # the flags, without python and the script
    code = run_mlm_flax_main(argv)  # in-process: the refusal comes before any compiling
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0
    assert error.startswith("error: ") and expected in error and "--overwrite_output_dir" in error, error
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing deleted or changed
