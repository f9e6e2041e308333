"""Training phases and the batch-size warmup: the plan of every step (phase, global batch, tokens), the phases'
learning-rate schedule, one-line refusals, and a tiny ModernBERT recipe trained end to end through two phases
(context extension with a new RoPE theta, a lower mask rate, a growing batch) whose SIGKILLed and resumed run
ends bit-identical to the uninterrupted one, and whose export transformers reads at the new length."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from flax_bert.run.config import parse_run_config
from flax_bert.training.phases import BatchWarmup, PhaseError, make_plan, parse_phases
from tests.test_resume import ROOT, assert_same_parameters, complete_checkpoints, new_workspace, wait_until

COMMON = dict(max_seq_length=32, mlm_probability=0.3)


# ----------------------------------------------------------------------------- the plan
def test_phases_inherit_settings_and_end_where_asked():
    phases = parse_phases([{"until_step": 3, "global_rope_theta": 10000, "name": "short"},
                           {"until_tokens": 1000, "max_seq_length": 64, "mlm_probability": 0.15},
                           {"until_step": 10, "global_rope_theta": 160000}], **COMMON)
    assert [(p.max_seq_length, p.mlm_probability, p.global_rope_theta) for p in phases] == [
        (32, 0.3, 10000), (64, 0.15, 10000), (64, 0.15, 160000)]
    plan = make_plan(phases, 4, None, **COMMON)
    # phase 0: 3 steps of 4 x 32 = 384 tokens; phase 1 runs until 1000 tokens: 3 steps of 4 x 64 (1152)
    assert [plan.phase_at(s).index for s in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert plan.tokens_until(3) == 384 and plan.tokens_until(6) == 384 + 3 * 256
    assert plan.total_steps == 10 and plan.tokens_until(10) == 384 + 7 * 256
    assert plan.rows_start(2) == 0 and plan.rows_start(4) == 3 and plan.rows_start(8) == 3  # 64 tokens from step 3


def test_a_batch_warmup_grows_in_few_sizes_of_whole_data_parallel_units():
    warmup = BatchWarmup.checked(8, 512, tokens=100_000, unit=8)
    sizes = warmup.sizes()
    assert len(sizes) <= 8 and sizes[0] == 8 and sizes[-1] == 512 and all(s % 8 == 0 for s in sizes)
    plan = make_plan(None, 512, warmup, total_steps=200, **COMMON)
    batches = [plan.global_batch_at(s) for s in range(200)]
    assert batches == sorted(batches) and set(batches) == set(sizes)  # each size compiles once
    assert plan.tokens_until(200) == sum(b * 32 for b in batches)
    assert plan.global_batch_at(199) == 512
    with pytest.raises(PhaseError, match="not a multiple of the data-parallel width 8 .*use 8 or 16"):
        BatchWarmup.checked(12, 512, 1000, 8)


def test_the_phases_schedule_warms_up_holds_and_decays():
    phases = parse_phases([{"until_step": 10, "schedule": "warmup"}, {"until_step": 20, "schedule": "stable"},
                           {"until_step": 30, "schedule": "decay", "decay_shape": "1-sqrt"},
                           {"until_step": 40, "schedule": "decay", "decay_shape": "linear"}], **COMMON)
    schedule = make_plan(phases, 4, None, **COMMON).learning_rate_schedule(1.0)
    rates = [float(schedule(np.float32(step))) for step in (0, 5, 10, 15, 20, 24, 30, 35)]
    np.testing.assert_allclose(rates, [0.0, 0.5, 1.0, 1.0, 1.0, 1 - 0.4 ** 0.5, 1.0, 0.5], atol=1e-6)
    assert make_plan(parse_phases([{"until_step": 5}], **COMMON), 4, None, **COMMON).learning_rate_schedule(1.0) is None


@pytest.mark.parametrize("phases, message", [
    ("[{max_seq_length: 64}]", "phases[0]: give exactly one of until_step and until_tokens"),
    ("[{until_step: 5, max_len: 64}]", "phases[0]: unknown key(s) max_len"),
    ("[{until_step: 5, mlm_probability: 3}]", "phases[0]: mlm_probability must be between 0 and 1"),
    ("[{until_step: 5, schedule: warmup}, {until_step: 9}]", "phases[1] has no schedule while other phases"),
    ("[{until_step: 5, schedule: cosine}]", "schedule must be one of warmup, stable, decay"),
    ("[{until_step: 5, mixture: {wiki: 1}}]", "a phase sets mixture weights, but the run has no train_sources"),
])
def test_bad_phases_are_refused_in_one_line(phases, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_run_config(["--output_dir", "x", "--phases", phases])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error


def test_phases_that_end_before_they_start_and_their_options_elsewhere_are_refused():
    with pytest.raises(PhaseError, match=r"phases\[1\] ends \(until_step 3\) before it starts \(step 5"):
        make_plan(parse_phases([{"until_step": 5}, {"until_step": 3}], **COMMON), 4, None, **COMMON)
    with pytest.raises(SystemExit):
        parse_run_config(["--output_dir", "x", "--phases", "[{until_step: 5}]", "--max_steps", "9"])
    with pytest.raises(SystemExit):
        parse_run_config(["--output_dir", "x", "--phases", "[{until_step: 5}]", "--num_train_epochs", "2"])
    with pytest.raises(SystemExit):
        parse_run_config(["--output_dir", "x", "--batch_size_warmup_tokens", "100"])


def test_a_rope_theta_is_refused_for_bert_and_roberta():
    from flax_bert.models.config import ModelConfig
    from flax_bert.run.build import decide_phases

    run = parse_run_config(["--output_dir", "x", "--max_seq_length", "32",
                            "--phases", "[{until_step: 5, global_rope_theta: 160000}]"])
    with pytest.raises(PhaseError, match=r"phases\[0\] sets global_rope_theta, which only ModernBERT has"):
        decide_phases(run, ModelConfig.for_family("roberta"))
    long = parse_run_config(["--output_dir", "x", "--max_seq_length", "32", "--phases", "[{until_step: 5, max_seq_length: 2048}]"])
    with pytest.raises(PhaseError, match="exceeds the 512 positions"):
        decide_phases(long, ModelConfig.for_family("bert"))


# ----------------------------------------------------------------------------- a tiny recipe, end to end


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    workspace = new_workspace(tmp_path_factory.mktemp("phases"))

    def command(out, *extra):  # the shipped tiny recipe as it is, with the workspace's tokenizer and data cache
        return [sys.executable, str(ROOT / "run_mlm_flax.py"), "modernbert-tiny-recipe", "--progress_bar", "false",
                "--tokenizer_name",
                str(workspace.tokenizer), "--cache_dir", str(workspace.cache), "--output_dir", str(out), *extra]

    reference = workspace.root / "uninterrupted"
    result = subprocess.run(command(reference), capture_output=True, text=True, timeout=600, env=workspace.env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return workspace, command, reference, result.stderr


def test_the_recipe_moves_through_its_phases_and_says_so(recipe):
    _, _, reference, log = recipe
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "train_loss" in row]
    assert {row["phase"] for row in train} == {0, 1}
    for row in train:
        assert (row["max_seq_length"], row["mlm_probability"]) == ((32, 0.3) if row["phase"] == 0 else (64, 0.15))
    batches = [row["global_batch_size"] for row in train]
    assert batches[0] == 2 and batches[-1] == 4 and batches == sorted(batches)  # the warmup: 2 rows, then 3, then 4
    tokens = [row["tokens"] for row in train]
    assert tokens == sorted(tokens) and train[-1]["step"] == 24
    first_long = min(row["step"] for row in train if row["phase"] == 1)
    assert next(row["tokens"] for row in train if row["phase"] == 0 and row["step"] == first_long - 1) >= 1200
    assert "entering phase 1 'long'" in log and "batch-size warmup: global batch 2 -> 3 -> 4 rows" in log
    assert "phase 0 'short': until 1,200 tokens" in log


def test_a_resume_in_the_second_phase_ends_bit_identical(recipe, tmp_path):
    workspace, command, reference, _ = recipe
    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command(out), stdout=handle, stderr=subprocess.STDOUT, env=workspace.env, cwd=ROOT)
    wait_until(lambda: any(step >= 20 for step in complete_checkpoints(out)), process, log, "a checkpoint in phase 1")
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    saved = max(complete_checkpoints(out))
    assert saved < 24, "the run ended before it could be killed"
    result = subprocess.run(command(out), capture_output=True, text=True, timeout=600, env=workspace.env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(step {saved})" in result.stderr
    assert_same_parameters(out, reference)


def test_phases_added_on_resume_continue_at_the_boundary_as_if_planned(recipe, tmp_path):
    """A run given only the first phase ends at its last step; the same run resumed with the second phase added
    (a new length: rows re-packed at the boundary step itself) trains the steps the run planned whole trains."""
    workspace, command, reference, _ = recipe
    out = tmp_path / "extended"
    first_only = "[{name: short, until_tokens: 1200, global_rope_theta: 10000, mlm_probability: 0.3, schedule: warmup}]"
    result = subprocess.run(command(out, "--phases", first_only), capture_output=True, text=True, timeout=600,
                            env=workspace.env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    boundary = max(complete_checkpoints(out))
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert boundary == max(row["step"] for row in rows if row.get("phase") == 0)  # the first phase's last step
    result = subprocess.run(command(out), capture_output=True, text=True, timeout=600, env=workspace.env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(step {boundary})" in result.stderr
    resumed = {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "train_loss" in row}
    planned = {row["step"]: row for row in rows if "train_loss" in row}
    assert sorted(resumed) == sorted(planned)
    for step, row in planned.items():  # the same phase, batch, length and mask rate at every step
        assert [resumed[step][k] for k in ("phase", "global_batch_size", "max_seq_length", "mlm_probability",
                                            "tokens")] == [row[k] for k in ("phase", "global_batch_size",
                                                                            "max_seq_length", "mlm_probability",
                                                                            "tokens")], step
    assert_same_parameters(out, reference)  # bit-identical: a phase's learning rates do not depend on later phases


def test_eval_of_a_phased_run_scores_its_last_phase_as_the_run_did(recipe, tmp_path):
    """`flax-bert eval RUN` of a run that ended in its 64-token phase evaluates 64-token rows: the loss the run's
    own final evaluation recorded."""
    import shutil

    workspace, _, reference, _ = recipe
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    recorded = json.loads((run / "eval_results.json").read_text())
    (run / "eval_results.json").unlink()
    result = subprocess.run([sys.executable, "-m", "flax_bert.cli", "eval", str(run), "--cache_dir",
                             str(workspace.cache)], capture_output=True, text=True, timeout=600, env=workspace.env,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((run / "eval_results.json").read_text())
    assert evaluated["step"] == recorded["step"] == 24
    assert evaluated["eval_loss"] == pytest.approx(recorded["eval_loss"], rel=1e-5)


def test_the_export_after_context_extension_is_read_by_transformers_at_the_new_length(recipe):
    import jax.numpy as jnp
    import torch
    import transformers

    from flax_bert.models.convert import load_hf

    _, _, reference, _ = recipe
    config = json.loads((reference / "config.json").read_text())
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 160000  # the last phase's, not the first's
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000
    assert config["max_position_embeddings"] >= 64
    ids = np.random.default_rng(0).integers(5, 1000, (2, 64))
    ours = np.asarray(load_hf(reference)(jnp.asarray(ids)).logits)
    theirs = transformers.ModernBertForMaskedLM.from_pretrained(str(reference), attn_implementation="eager").eval()
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
    card = (reference / "README.md").read_text()
    assert "sequences of 64 tokens" in card


def test_phases_may_change_on_resume_only_in_steps_still_to_come():
    first = make_plan(parse_phases([{"until_step": 10}], **COMMON), 4, None, **COMMON)
    trained = first.trained(8)  # what a checkpoint at step 8 keeps
    extended = make_plan(parse_phases([{"until_step": 10}, {"until_step": 20, "max_seq_length": 64}], **COMMON), 4,
                         None, **COMMON)
    extended.check_continues(trained, 8)  # a phase added after the steps trained: accepted
    shorter = make_plan(parse_phases([{"until_step": 5}, {"until_step": 20, "max_seq_length": 64}], **COMMON), 4,
                        None, **COMMON)
    with pytest.raises(PhaseError, match="change steps already trained \\(from step 0: the checkpoint trained them in "
                                         "phase 0 with 4 rows of 32 tokens\\): keep them as they were up to step 8"):
        shorter.check_continues(trained, 8)


def test_the_shipped_modernbert_base_recipe_lays_out_the_published_phases():
    from flax_bert.run.config import CONFIGS_DIR

    run = parse_run_config([str(CONFIGS_DIR / "modernbert-base-recipe.yaml")])
    phases = parse_phases(run.phases, max_seq_length=run.max_seq_length, mlm_probability=run.mlm_probability)
    chips = 4  # the v5e:2x2 it is sized for
    warmup = BatchWarmup.checked(run.batch_size_warmup_start, 8 * chips * 144, run.batch_size_warmup_tokens, chips * 144)
    plan = make_plan(phases, lambda p: (p.per_device_train_batch_size or 8) * chips * 144, warmup,
                     max_seq_length=run.max_seq_length, mlm_probability=run.mlm_probability)
    assert [p.name for p in phases] == ["warmup", "stable", "context-extension", "decay"]
    ends = [plan.tokens_until(plan.phase_end(p.index)) for p in phases]
    for end, published in zip(ends, [3e9, 1.7e12, 1.95e12, 2.0e12]):  # each ends within one step of its budget
        assert published <= end < published + 4608 * 1024 + 576 * 8192
    assert [(p.max_seq_length, p.global_rope_theta) for p in phases] == [
        (1024, 10000), (1024, 10000), (8192, 160000), (8192, 160000)]
    assert plan.distinct_batches() == [576, 1152, 1728, 2304, 2880, 3456, 4032, 4608]
    schedule = plan.learning_rate_schedule(run.learning_rate)
    stable, extension, last = (plan.phase_start(i) + 1 for i in (1, 2, 3))
    assert float(schedule(stable)) == pytest.approx(8e-4) and float(schedule(extension)) == pytest.approx(3e-4)
    assert float(schedule(plan.total_steps - 1)) < 0.1 * 3e-4 < float(schedule(last))


def test_prepare_packs_the_rows_of_every_phase_length(recipe, tmp_path):
    """`flax-bert prepare` of a phased config packs every phase's max_seq_length into the logical shards train
    uses (the batch-size warmup's smallest batch decides them), so train tokenizes nothing."""
    workspace, command, _, _ = recipe
    cache = tmp_path / "cache"
    argv = command(tmp_path / "run", "--cache_dir", str(cache))
    result = subprocess.run([sys.executable, "-m", "flax_bert.cli", "prepare", *argv[2:]], capture_output=True,
                            text=True, timeout=600, env=workspace.env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    packed = [json.loads(meta.read_text()) for meta in (cache / "packed").glob("*/meta.json")]
    assert {meta["length"] for meta in packed} == {32, 64}
    assert "1 logical shards (smallest global batch 2" in result.stderr


def test_a_phase_mixture_must_name_the_runs_sources(capsys):
    with pytest.raises(SystemExit):
        parse_run_config(["--output_dir", "x", "--train_sources", "[{name: wiki, train_file: a.txt}]",
                          "--phases", "[{until_step: 5, mixture: {web: 1}}]"])
    assert "phases[0]'s mixture names 'web', which is no train_sources entry (they are wiki)" in capsys.readouterr().err
