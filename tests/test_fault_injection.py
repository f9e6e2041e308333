"""A run interrupted again and again ends exactly where the uninterrupted run ends: SIGTERM in each phase
(data preparation, compile, training, final evaluation, export) exits 0 and the same command goes on, and so
does SIGKILL; the training steps at which it is interrupted are drawn from a fixed seed; the last rerun's
export is bit-identical to the uninterrupted run's and no checkpoint was lost or moved aside.

A phase is hit exactly by a small launcher that makes the process send itself SIGTERM when it enters the
function that starts that phase, then runs the real command line. The runs share a tokenizer, a data cache
and a JAX compilation cache (as in test_resume.py)."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.test_resume import ROOT, Workspace, assert_same_parameters, complete_checkpoints, new_workspace

STEPS, LOGGING = 48, 4
FAST = ["--max_steps", str(STEPS), "--save_steps", "4", "--logging_steps", str(LOGGING), "--do_eval",
        "--max_eval_samples", "40", "--validation_split_percentage", "5"]
# where each phase starts: (module, dotted name inside it), patched to send SIGTERM on its first call. Training
# itself is interrupted by the SIGTERM at a random step below.
PHASES = {
    "data preparation": ("flax_bert.run.build", "build_datasets"),
    "compile": ("flax_bert.run.pretrain", "Run._global"),           # the first batch goes to the first (compiling) step
    "evaluation": ("flax_bert.run.pretrain", "Run.evaluate"),        # the final one: --eval_steps is unset
    "export": ("flax_bert.run.export", "write_model_folder"),
}
LAUNCHER = """
import importlib, os, signal, sys
module_name, dotted = sys.argv[1], sys.argv[2]
owner = importlib.import_module(module_name)
*path, name = dotted.split(".")
for part in path:
    owner = getattr(owner, part)
real = getattr(owner, name)
calls = []
def first_call_sends_sigterm(*args, **kwargs):
    if not calls:
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
setattr(owner, name, first_call_sends_sigterm)
from flax_bert.cli import run_mlm_flax_main
sys.exit(run_mlm_flax_main(sys.argv[3:]))
"""

ERROR_AFTER_SAVE = """
import sys
from flax_bert.data.sources import DataError
from flax_bert.run import pretrain
real = pretrain.Run._save
def save_then_fail(self, step, *args, **kwargs):
    real(self, step, *args, **kwargs)
    if step == int(sys.argv[1]):
        raise DataError(f"bad data met right after the save of step {step} began")
pretrain.Run._save = save_then_fail
from flax_bert.cli import run_mlm_flax_main
sys.exit(run_mlm_flax_main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return new_workspace(tmp_path_factory.mktemp("faults"))


def sigterm_in(workspace: Workspace, out, phase: str) -> subprocess.CompletedProcess:
    module, attribute = PHASES[phase]
    command = workspace.command(out, *FAST)
    return subprocess.run([sys.executable, "-c", LAUNCHER, module, attribute, *command[2:]], capture_output=True,
                          text=True, timeout=300, env=workspace.env, cwd=ROOT)


def interrupted_at_random(workspace: Workspace, out, how: signal.Signals, after_step: int, delay: float) -> None:
    """Start the run, and once its log shows step `after_step` (or later) send `how` `delay` seconds later:
    within a step, a save or a log write, wherever it falls."""
    process, log = workspace.start(out, *FAST)
    deadline = time.monotonic() + 300
    while not any(int(step) >= after_step for step in re.findall(r"step (\d+): ", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run ended or stalled before step {after_step}:\n{log.read_text()[-3000:]}")
        time.sleep(0.002)
    time.sleep(delay)
    process.send_signal(how)
    code = process.wait(timeout=300)
    assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL), log.read_text()[-3000:]
    if how == signal.SIGTERM:  # in the loop: the step in progress is finished and saved
        assert re.search(r"stopped at step \d+ by a signal; checkpoint saved", log.read_text()), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def reference(workspace):
    out = workspace.root / "uninterrupted"
    result = workspace.run(out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_interrupted_in_every_phase_and_at_random_moments_ends_like_the_uninterrupted_run(workspace, reference,
                                                                                          tmp_path):
    out = tmp_path / "run"
    moments = random.Random(13)
    steps = sorted(moments.sample(range(LOGGING, STEPS // 2 + 1, LOGGING), 3))
    random_interruptions = [(how, step, moments.uniform(0.0, 0.05))
                            for how, step in zip((signal.SIGKILL, signal.SIGTERM, signal.SIGKILL), steps)]

    for phase in PHASES:
        if phase == "evaluation":  # training, between compile and the final evaluation: the random moments
            for how, step, delay in random_interruptions:
                interrupted_at_random(workspace, out, how, step, delay)
        result = sigterm_in(workspace, out, phase)
        assert result.returncode == 0, f"{phase}: exit {result.returncode}\n{result.stderr[-3000:]}"
        assert "SIGTERM" in result.stderr, f"{phase}:\n{result.stderr[-3000:]}"
        if phase == "data preparation":
            assert not complete_checkpoints(out)
        if phase == "compile":  # stopped in the loop: the step being compiled is finished and saved
            assert "checkpoint saved" in result.stdout and complete_checkpoints(out)[-1] < STEPS, result.stderr[-3000:]
        if phase in ("evaluation", "export"):  # training had ended: its last step is saved, nothing exported yet
            assert complete_checkpoints(out)[-1] == STEPS and not (out / "model.safetensors").exists()

    result = workspace.run(out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_parameters(out, reference)
    assert complete_checkpoints(out)[-1] == STEPS
    assert not (out / "checkpoints_damaged").exists() and not (out / "checkpoints_superseded").exists()
    assert not [name for name in os.listdir(out / "checkpoints") if "tmp" in name]  # unfinished saves cleared


def test_a_checkpoint_of_another_optimizer_layout_stops_the_run_or_resets_the_optimizer(workspace, reference,
                                                                                        tmp_path):
    """Saved with clipping, resumed without: one line and nothing moved; with --reset_optimizer the run goes
    on from the checkpoint's step with its parameters and a fresh optimizer state."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    longer = [*FAST, "--max_steps", str(STEPS + 4), "--max_grad_norm", "0"]
    result = workspace.run(out, *longer)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    # the stored run's options are compared before anything is built, so the clipping switch is named there
    # (the restore's own check of the saved arrays is tested in test_resilience.py)
    assert last.startswith("error: --max_grad_norm 0.0 differs from the run's 1.0"), last
    assert "--reset_optimizer" in last, last
    assert complete_checkpoints(out)[-1] == STEPS and not (out / "checkpoints_damaged").exists()

    result = workspace.run(out, *longer, "--reset_optimizer")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"restored step {STEPS}" in result.stderr and "started a fresh optimizer state" in result.stderr
    assert complete_checkpoints(out)[-1] == STEPS + 4
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train_loss" in r][-1] == STEPS + 4


def test_an_error_in_the_loop_ends_with_one_line_after_the_checkpoint_being_written_is_complete(workspace, tmp_path):
    """Bad data met mid-run, just after the save of step 8 went to the background writer: exit 1 with one line,
    no traceback from the writer, checkpoint 8 complete; the same command resumes from it."""
    out = tmp_path / "run"
    command = workspace.command(out, *FAST)
    result = subprocess.run([sys.executable, "-c", ERROR_AFTER_SAVE, "8", *command[2:]], capture_output=True,
                            text=True, timeout=300, env=workspace.env, cwd=ROOT)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "error: bad data met right after the save of step 8 began"
    assert "Traceback" not in result.stderr and "Failed to run" not in result.stderr, result.stderr[-3000:]
    assert complete_checkpoints(out) == [4, 8]
    result = workspace.run(out, *FAST, "--max_steps", "12")
    assert result.returncode == 0 and "(step 8)" in result.stderr, result.stderr[-3000:]
