"""What the commands say: one-line errors that name the real problem and a fix that works when typed, help
texts, and outputs that keep their information (fill-mask for every mask, file modes, the final evaluation in
eval_results.json and the model card, the logged learning rate, plain progress lines in a log)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from flax_bert import cli
from tests.xla_env import one_device_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--intermediate_size", "64",
        "--max_position_embeddings", "34", "--max_seq_length", "32", "--tokenizer_vocab_size", "500",
        "--per_device_train_batch_size", "4", "--max_train_samples", "400", "--max_eval_samples", "50",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "5", "--save_steps", "0"]


def command(*args, cwd=ROOT, umask=0o027, timeout=600):
    """`flax-bert ARGS` in a child process whose stderr is a pipe (not a terminal)."""
    env = one_device_env()
    env.update(HF_HUB_OFFLINE="1", FLAX_BERT_HUGEPAGES="0")
    return subprocess.run([sys.executable, "-m", "flax_bert.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=lambda: os.umask(umask))


def one_line_error(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- input errors, in-process
def test_malformed_yaml_is_one_line_with_file_and_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("max_steps: 5\nmodel_type: [roberta\n")
    with pytest.raises(SystemExit):
        cli.train_main([str(tmp_path / "bad.yaml")], prog="flax-bert train")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'bad.yaml'}:2: not valid YAML" in err, err


def test_yaml_numbers_in_exponent_form_and_unknown_keys(tmp_path):
    from flax_bert.run.config import RunConfigError, load_yaml

    (tmp_path / "run.yaml").write_text("max_steps: 1e3\nlearning_rate: 2e-3\n")
    assert load_yaml(tmp_path / "run.yaml") == {"max_steps": 1000, "learning_rate": 0.002}
    (tmp_path / "run.yaml").write_text("max_steps: 1.5\n")
    with pytest.raises(RunConfigError, match="max_steps must be an integer, got 1.5"):
        load_yaml(tmp_path / "run.yaml")
    from flax_bert.run.config import parse_run_config

    assert parse_run_config(["--max_steps", "1e3", "--output_dir", "x"]).max_steps == 1000  # the flag alike


def test_an_unknown_yaml_key_names_help_once(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("max_step: 3\n")
    with pytest.raises(SystemExit):
        cli.train_main([str(tmp_path / "run.yaml")])
    assert capsys.readouterr().err.count("--help") == 1


def test_a_broken_config_json_and_a_missing_model_folder_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "roberta",\n  "hidden_size": }\n')
    err = one_line_error(capsys, ["train", "--model_name_or_path", "model", "--output_dir", "out"])
    assert "model/config.json:2: not valid JSON" in err
    err = one_line_error(capsys, ["train", "--model_name_or_path", "./no-such-model", "--output_dir", "out"])
    assert "no model folder at ./no-such-model" in err and "--tokenizer_name" not in err
    assert not (tmp_path / "out").exists()  # refused before anything is written: the corrected command runs


def test_eval_without_a_run_and_with_a_missing_one(capsys, tmp_path):
    err = one_line_error(capsys, ["eval"])
    assert "nothing to evaluate" in err and "flax-bert eval runs/tiny" in err and "--output_dir is required" not in err
    err = one_line_error(capsys, ["eval", str(tmp_path / "does-not-exist")])
    assert "no run directory" in err and "YAML" not in err


def test_an_internal_failure_says_resume_only_where_a_run_resumes(capsys):
    def broken(argv):
        raise RuntimeError("boom")

    assert cli.run_command(broken, []) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "internal failure" in last and "resume" not in last
    assert cli.run_command(broken, [], resumes=True) == 1
    assert "the same command resumes the run" in capsys.readouterr().err


def test_a_step_too_large_for_memory_names_what_shrinks_it_and_that_works(capsys, monkeypatch, tmp_path):
    """XLA's RESOURCE_EXHAUSTED (here a real one: a 4 TiB allocation on the CPU) in the train step is the user's one
    line, with the rows per device and the flags that shrink the step; the same command with them then trains in
    the same --output_dir (nothing was saved that pins the batch). Evaluating the run alike, with the eval flag."""
    import jax
    import jax.numpy as jnp

    from flax_bert.run import pretrain

    build_trainer = pretrain.build_trainer

    def too_large(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.train_step = lambda state, batch: (state, {"loss": jax.jit(lambda: jnp.zeros(2 ** 40))()})
        return trainer

    argv = ["train", *TINY, "--max_steps", "2", "--output_dir", str(tmp_path / "run"),
            "--cache_dir", str(tmp_path / "cache"), "--do_eval", "false"]
    monkeypatch.setattr(pretrain, "build_trainer", too_large)
    err = one_line_error(capsys, argv)
    assert err.startswith("error: the train step does not fit the cpu's memory (an allocation of 4096.00 GiB failed; "
                          "4 rows x 32 tokens per device, remat none, float32): lower --per_device_train_batch_size "
                          "(4 now) and raise --gradient_accumulation_steps (1 now) to keep the global batch, set "
                          "--remat_policy full"), err
    assert "internal failure" not in err and "shorten --max_seq_length (32 now" in err
    monkeypatch.setattr(pretrain, "build_trainer", build_trainer)
    assert cli.main([*argv, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                     "--remat_policy", "full"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()

    evaluate_rows = pretrain.evaluate_rows  # evaluating only: the eval step's own flag
    monkeypatch.setattr(pretrain, "evaluate_rows", lambda *args: jax.jit(lambda: jnp.zeros(2 ** 40))().block_until_ready())
    evaluation = ["eval", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache")]
    capsys.readouterr()  # the training's progress lines
    err = one_line_error(capsys, evaluation)
    assert err == ("error: the eval step does not fit the cpu's memory (an allocation of 4096.00 GiB failed; 8 rows x 32 "
                   "tokens per device, float32): lower --per_device_eval_batch_size (8 now)"), err
    monkeypatch.setattr(pretrain, "evaluate_rows", evaluate_rows)
    assert cli.main([*evaluation, "--per_device_eval_batch_size", "2"]) == 0


@pytest.mark.parametrize("text, said", [
    ("RESOURCE_EXHAUSTED: Out of memory allocating 34503644496 bytes.", "an allocation of 32.13 GiB failed"),  # CPU
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34503644496 bytes.", "an allocation of 32.13 GiB failed"),
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (111.87G) exceeds "
     "available HBM (15.75G).", "it needs 111.87G of the 15.75G HBM"),  # libtpu's compiler, as it printed it
    ("RESOURCE_EXHAUSTED: out of memory somewhere new", ""),
])
def test_the_size_an_out_of_memory_error_names(text, said):
    from flax_bert.run.out_of_memory import is_out_of_memory, what_was_asked

    assert is_out_of_memory(RuntimeError(text)) and what_was_asked(RuntimeError(text)) == said
    assert not is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: too many open files"))


def test_an_out_of_memory_in_a_phase_names_the_phase_settings_that_shrink_it():
    """A phase that sets its own rows is shrunk there (the flag would not reach it); its row length is the phase's
    (which may change on resume until the phase has trained); on a TPU with the xla attention splash is named too."""
    from types import SimpleNamespace

    from flax_bert.run.out_of_memory import train_step_error
    from flax_bert.training.phases import Phase

    error = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                         "(21.28G) exceeds available HBM (15.75G).")
    step = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=64, max_seq_length=8192,
                           remat_policy="none", dtype="bfloat16", attention="xla")
    long = Phase(index=1, name="long", until_step=10, until_tokens=None, max_seq_length=8192, mlm_probability=0.3,
                 per_device_train_batch_size=2)
    message = str(train_step_error(error, step, "tpu", phase=long))
    assert message == ("the train step does not fit the tpu's memory (it needs 21.28G of the 15.75G HBM; 2 rows x 8192 "
                       "tokens per device, remat none, bfloat16): lower phases[1]'s per_device_train_batch_size (2 now) "
                       "and raise phases[1]'s gradient_accumulation_steps (64 now) to keep the global batch, set "
                       "--remat_policy full (none now: the backward pass keeps more activations), use --attention "
                       "splash (xla materializes the attention scores), or shorten phases[1]'s max_seq_length (8192 "
                       "now)")
    one_row = SimpleNamespace(**{**vars(step), "per_device_train_batch_size": 1, "remat_policy": "full"})
    assert str(train_step_error(error, one_row, "gpu")).endswith(": shorten --max_seq_length (8192 now; a run "
                                                                "directory keeps its length: use another --output_dir)")


def test_version_and_help_texts(capsys):
    from flax_bert import __version__

    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"flax-bert {__version__}"
    for command, expected, absent in [("prepare", "Tokenize and pack", "As in the old script"),
                                      ("eval", "RUN_DIR", "config_file"),
                                      ("train", "BERT, RoBERTa or ModernBERT", "BERT/RoBERTa "),
                                      ("import", "ModernBERT", "BERT/RoBERTa ")]:
        with pytest.raises(SystemExit):
            cli.COMMANDS[command](["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert expected in text and absent not in text, (command, text[:500])


def test_a_config_by_bare_name_works_for_every_command():
    from flax_bert.run.config import parse_run_config

    assert parse_run_config(["tiny"]).output_dir == "runs/tiny"
    assert parse_run_config(["roberta-base.yaml", "--output_dir", "x"]).hidden_size == 768
    with pytest.raises(SystemExit):
        parse_run_config(["no-such-config"])


def test_exporting_over_a_model_names_exports_own_flag(tmp_path):
    from flax_bert.models import create_model
    from flax_bert.models.config import ModelConfig
    from flax_bert.models.convert import save_hf

    model = create_model(ModelConfig.for_family("roberta", vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32))
    save_hf(model, tmp_path)
    with pytest.raises(FileExistsError, match="--overwrite\\)") as error:
        save_hf(model, tmp_path)
    assert "--overwrite_output_dir" not in str(error.value)


# ----------------------------------------------------------------------------- a real run, through the command
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    done = command("train", *TINY, "--max_steps", "10", "--output_dir", "run", "--cache_dir", str(root / "cache"),
                   cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run", done


def test_the_logged_learning_rate_is_the_rate_at_the_logged_step(run_dir):
    out, _ = run_dir
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["learning_rate"] for r in records if "learning_rate" in r}
    # linear decay from 1e-3 over 10 steps, step k updating with the rate of count k - 1 (not the window's mean)
    assert rates[5] == pytest.approx(1e-3 * (1 - 4 / 10)) and rates[10] == pytest.approx(1e-3 * (1 - 9 / 10))


def test_a_log_that_is_no_terminal_gets_plain_progress_lines_and_tokens_as_text(run_dir):
    _, done = run_dir
    assert "\r" not in done.stderr
    assert "train: step 10/10 (100%)" in done.stderr
    assert "most frequent token '\\n'" in done.stderr and "Ċ" not in done.stderr


def test_the_export_respects_the_umask_and_its_card_has_the_final_evaluation(run_dir):
    out, _ = run_dir
    exported = out.parent / "exported"
    done = command("export", str(out), "--to", str(exported), umask=0o027)
    assert done.returncode == 0, done.stderr[-3000:]
    modes = {p.name: p.stat().st_mode & 0o777 for p in exported.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o640}, modes
    card = (exported / "README.md").read_text()
    assert "not evaluated" not in card and "- eval_accuracy:" in card


def test_a_failed_upload_names_a_command_that_runs(run_dir):
    out, _ = run_dir
    target = out.parent / "exported-hub"
    done = command("export", str(out), "--to", str(target), "--push_to_hub", "--hub_model_id", "someone/tiny")
    assert done.returncode == 1
    retry = done.stderr.strip().splitlines()[-1].split("then run: ")[1]
    assert retry == f"flax-bert export {out} --to {target} --overwrite --push_to_hub --hub_model_id someone/tiny"
    # the retry parses, exports again over the folder, and only the (offline) upload fails again
    again = command(*retry.split()[1:])
    assert again.returncode == 1 and "then run: " + retry in again.stderr


def test_eval_of_a_run_keeps_the_baseline_in_eval_results(run_dir):
    out, _ = run_dir
    before = json.loads((out / "eval_results.json").read_text())
    assert "unigram_baseline_accuracy" in before
    done = command("eval", str(out), "--cache_dir", str(out.parent / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads((out / "eval_results.json").read_text())
    assert after["unigram_baseline_accuracy"] == pytest.approx(before["unigram_baseline_accuracy"])
    assert after["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-4)


def test_fill_mask_predicts_every_mask_with_readable_probabilities(run_dir):
    out, _ = run_dir
    done = command("fill-mask", str(out), "Return the <mask> of the <mask>.", "--top_k", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "  mask 1 of 2:" in lines and "  mask 2 of 2:" in lines
    ranked = [line for line in lines if line.lstrip()[:2] in ("1.", "2.", "3.")]
    assert len(ranked) == 6 and not any(line.rstrip().endswith(" 0.000") for line in ranked), done.stdout


def test_a_failed_upload_after_training_names_an_export_that_runs(monkeypatch, tmp_path):
    """train's own upload failure: the retry re-exports the run into its own folder (which holds the export,
    not a checkpoint to export from) with the Hub repository named."""
    import huggingface_hub

    from flax_bert.run.export import HubUploadError, export_command, push_to_hub

    class Offline:
        def __init__(self, token=None):
            pass

        def create_repo(self, *args, **kwargs):
            raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    retry = export_command("runs/tiny", "runs/tiny", "you/tiny-roberta", private=True)
    assert retry == "flax-bert export runs/tiny --to runs/tiny --overwrite --push_to_hub --hub_model_id you/tiny-roberta " \
                    "--hub_private_repo"
    with pytest.raises(HubUploadError, match="then run: " + retry.replace("-", "\\-")):
        push_to_hub(tmp_path, "you/tiny-roberta", retry=retry)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match="0"):  # it parses: --help after every flag of it
        cli.export_main([*retry.split()[2:], "--help"])


def test_eval_takes_a_config_by_bare_name_too(capsys, monkeypatch, tmp_path):
    """`flax-bert eval tiny` reads configs/tiny.yaml as train does (its run directory then has no checkpoint)."""
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["eval", "tiny", "--output_dir", str(tmp_path / "none")])
    assert "no run directory" not in err and "no run config" not in err


def test_an_eval_option_that_differs_from_the_run_says_how_to_evaluate(run_dir):
    out, _ = run_dir
    done = command("eval", str(out), "--hidden_size", "64")
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "evaluate with --hidden_size 32 or leave it out" in last, last
    assert "--output_dir" not in last and "--reset_optimizer" not in last
