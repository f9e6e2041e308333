"""The command line end to end on the built-in corpus: train, evaluate, export, fill-mask, plot, bad input."""
import json
import pathlib
import subprocess
import sys

import pytest

from tests.xla_env import one_device_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_FLAGS = ["--model_type", "roberta", "--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "2",
              "--intermediate_size", "128", "--max_position_embeddings", "66", "--max_seq_length", "64",
              "--tokenizer_vocab_size", "2000", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
              "--learning_rate", "2e-3", "--warmup_steps", "5", "--logging_steps", "5", "--save_steps", "20",
              "--max_eval_samples", "200", "--progress_bar", "false",
              # the recipe these runs were tuned with (no longer the defaults: those are the old script's)
              "--weight_decay", "0.01", "--adam_beta2", "0.98", "--adam_epsilon", "1e-6", "--max_grad_norm", "1.0",]
SECRET = "hf_SECRETtoken123456789"
SECRET_DOWNLOADS = "hf_SECRETdownloads987654321"


def cli_env(**extra):
    env = one_device_env()  # one CPU device: faster compiles
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_cli(args, env=None, timeout=600, cwd=ROOT):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(), cwd=cwd)


# runs a script as `python SCRIPT ARGS...` would, and writes the names of the modules it imported at its exit
MODULES_AT_EXIT = """
import atexit, runpy, sys
record = sys.argv[1]
atexit.register(lambda: open(record, "w").write("\\n".join(sorted(sys.modules))))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """On the built-in corpus: runs in a fresh clone, without ../shared."""
    out = tmp_path_factory.mktemp("cli") / "run"
    cache = out.parent / "cache"
    result = run_cli(["-c", MODULES_AT_EXIT, str(out.parent / "modules.txt"), str(ROOT / "run_mlm_flax.py"), *TINY_FLAGS, "--max_train_samples", "1500", "--do_train",
                      "--do_eval", "--max_steps", "40", "--output_dir", "run", "--cache_dir", str(cache),  # relative
                      "--hub_token", SECRET, "--token", SECRET_DOWNLOADS], env=cli_env(FLAX_BERT_CACHE=str(cache)),
                     cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_training_logs_metrics_and_the_loss_falls(trained_run):
    out, _ = trained_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train] == list(range(5, 45, 5))
    for r in train:
        assert {"step", "train_loss", "mlm_accuracy", "learning_rate", "tokens_per_second", "grad_norm", "mfu"} <= set(r)
        assert r["tokens_per_second"] > 0
    assert train[-1]["train_loss"] < train[0]["train_loss"] - 0.5
    assert any("compile_seconds" in r for r in records)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_a_training_run_never_imports_pytorch(trained_run):
    """Nothing in a run needs PyTorch; importing it (through AutoTokenizer or tensorboardX) took 1-1.6 s of every start."""
    out, _ = trained_run
    modules = set((out.parent / "modules.txt").read_text().split())
    assert {"jax", "transformers", "tensorboardX"} <= modules  # the record is of this run
    assert "torch" not in modules


def test_eval_results_are_written(trained_run):
    out, _ = trained_run
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval_loss", "perplexity", "eval_accuracy"} <= set(results)
    assert results["perplexity"] == pytest.approx(2.718281828 ** results["eval_loss"], rel=1e-4)
    assert 0 < results["eval_accuracy"] < 1


def test_export_loads_in_transformers_and_fill_mask_works(trained_run):
    import transformers

    out, _ = trained_run
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    fill = transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=3)
    predictions = fill(f"The game was released in {tokenizer.mask_token} .")
    assert len(predictions) == 3
    card = (out / "README.md").read_text()
    assert "steps: 40" in card and "eval_loss" in card


def test_fill_mask_command_reads_the_export(trained_run):
    out, _ = trained_run
    result = run_cli(["-m", "flax_bert.cli", "fill-mask", str(out), "The song was <mask> in 2009 .", "--top_k", "3"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("  1. ") == 1 and "  3. " in result.stdout


def test_hub_token_never_reaches_the_output_directory(trained_run):
    out, result = trained_run
    for file in out.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes() and SECRET_DOWNLOADS.encode() not in file.read_bytes(), file
    assert SECRET not in result.stdout + result.stderr and SECRET_DOWNLOADS not in result.stdout + result.stderr


def test_plot_draws_the_curves(trained_run):
    out, _ = trained_run
    result = run_cli(["-m", "flax_bert.cli", "plot", str(out), "--output", str(out.parent / "curves.png")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out.parent / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hub_dataset_without_network_is_a_clear_error(tmp_path):
    result = run_cli([str(ROOT / "run_mlm_flax.py"), *TINY_FLAGS, "--dataset_name", "wikitext", "--dataset_config_name",
                      "wikitext-2-raw-v1", "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "c")])
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "network" in last and "--train_file" in last
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("args, message", [
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    (["--learning_rate", "fast"], "invalid float value: 'fast'"),
    (["--mlm_probability", "1.5"], "--mlm_probability must be between 0 and 1"),
    (["--model_type", "gpt2"], "invalid choice: 'gpt2'"),
    (["--mesh", "data=3"], "mesh"),
])
def test_bad_flags_are_rejected_with_one_line(args, message, tmp_path):
    result = run_cli([str(ROOT / "run_mlm_flax.py"), "--output_dir", str(tmp_path / "run"), "--do_train", *args])
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_documents_every_option():
    from flax_bert.run.config import RunConfig, build_parser
    import dataclasses

    text = build_parser().format_help()
    for field in dataclasses.fields(RunConfig):
        assert f"--{field.name}" in text
    for old_flag in ("--model_type", "--config_name", "--tokenizer_name", "--model_name_or_path", "--dataset_name",
                     "--dataset_config_name", "--train_file", "--validation_file", "--validation_split_percentage",
                     "--max_seq_length", "--line_by_line", "--pad_to_max_length", "--mlm_probability",
                     "--preprocessing_num_workers", "--output_dir", "--overwrite_output_dir", "--do_train", "--do_eval",
                     "--per_device_train_batch_size", "--per_device_eval_batch_size", "--learning_rate",
                     "--weight_decay", "--adam_beta1", "--adam_beta2", "--adam_epsilon", "--warmup_steps",
                     "--num_train_epochs", "--max_steps", "--logging_steps", "--save_steps", "--eval_steps", "--seed",
                     "--dtype", "--push_to_hub", "--hub_model_id", "--hub_token"):
        assert old_flag in text


def test_yaml_config_then_flags_override(tmp_path):
    from flax_bert.run.config import parse_run_config

    (tmp_path / "run.yaml").write_text("max_steps: 7\nlearning_rate: 1.0e-4\nline_by_line: true\noutput_dir: r\n")
    run = parse_run_config([str(tmp_path / "run.yaml"), "--max_steps", "9"])
    assert (run.max_steps, run.learning_rate, run.line_by_line) == (9, 1e-4, True)
    (tmp_path / "bad.yaml").write_text("max_step: 7\n")
    with pytest.raises(SystemExit):
        parse_run_config([str(tmp_path / "bad.yaml")])
    for name in ("tiny", "bert-base", "bert-large", "roberta-base", "roberta-large"):
        parse_run_config([str(ROOT / "configs" / f"{name}.yaml")])


def test_configuration_reference_matches_the_options():
    result = run_cli([str(ROOT / "docs" / "make_configuration_reference.py"), "--check"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_fill_mask_shows_a_whitespace_token_instead_of_an_empty_string():
    from flax_bert.fill_mask import _shown

    assert _shown(" the") == "the"
    assert _shown("\n") == "\n"  # printed as '\n', not ''


def test_eval_of_an_exported_folder_scores_what_the_run_scored(trained_run, tmp_path):
    """`flax-bert eval FOLDER` on an exported model (no checkpoints) evaluates its weights on what its run
    evaluated (the export carries the run's evaluation settings: --max_eval_samples, --max_seq_length, the
    mask rate), at any eval batch size."""
    import shutil

    out, _ = trained_run
    exported = tmp_path / "exported"
    exported.mkdir()
    for file in out.iterdir():
        if file.is_file() and file.name not in ("eval_results.json", "run_config.json", ".flax-bert-written.json"):
            shutil.copy(file, exported / file.name)
    cache = out.parent / "cache"
    result = run_cli(["-m", "flax_bert.cli", "eval", str(exported), "--per_device_eval_batch_size", "8",
                      "--cache_dir", str(cache),
                      # the default train batch (8, not the run's 16) must not change the validation rows
                      "--progress_bar", "false"], env=cli_env(FLAX_BERT_CACHE=str(cache)))
    assert "max_eval_samples 200" in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads((exported / "eval_results.json").read_text())
    trained = json.loads((out / "eval_results.json").read_text())
    assert ours["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)
    assert ours["eval_accuracy"] == pytest.approx(trained["eval_accuracy"], rel=1e-4)
