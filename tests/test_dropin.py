"""run_mlm_flax.py as a drop-in for the old Hugging Face script: its arguments with their old defaults and
meaning, --do_eval alone, run directories that know their options, one example per line of a text file.
Everything here runs on the built-in corpus: no ../shared needed."""
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_cli import ROOT, cli_env, run_cli
from tests.xla_env import xla_flags

# Every argument of the old run_mlm_flax.py (transformers' examples/flax/language-modeling, its last
# version: ModelArguments, DataTrainingArguments and the script's own TrainingArguments) with its default.
OLD_ARGUMENTS = {
    # ModelArguments
    "model_name_or_path": None, "model_type": None, "config_name": None, "tokenizer_name": None, "cache_dir": None,
    "use_fast_tokenizer": True, "dtype": "float32", "token": None, "use_auth_token": None, "trust_remote_code": False,
    # DataTrainingArguments
    "dataset_name": None, "dataset_config_name": None, "train_file": None, "validation_file": None,
    "train_ref_file": None, "validation_ref_file": None, "overwrite_cache": False, "validation_split_percentage": 5,
    "max_seq_length": None, "preprocessing_num_workers": None, "mlm_probability": 0.15, "pad_to_max_length": False,
    "line_by_line": False,
    # TrainingArguments (output_dir had no default: it was required)
    "output_dir": None, "overwrite_output_dir": False, "do_train": False, "do_eval": False,
    "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "learning_rate": 5e-5, "weight_decay": 0.0,
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "adafactor": False, "num_train_epochs": 3.0,
    "warmup_steps": 0, "logging_steps": 500, "save_steps": 500, "eval_steps": None, "seed": 42, "push_to_hub": False,
    "hub_model_id": None, "hub_token": None, "gradient_checkpointing": False,
}
# What the old script did without a flag for it: no clipping, AdamW, linear warmup then linear decay to 0 over
# the epochs, every non-blank line of a text file one example.
OLD_BEHAVIOUR = {"max_grad_norm": None, "optimizer": "adamw", "lr_scheduler_type": "linear", "max_steps": -1,
                 "gradient_accumulation_steps": 1, "objective": "mlm", "whole_word_masking": False,
                 "blank_line_documents": False, "remat_policy": "none"}

# The old README's command: RoBERTa-base from scratch in Norwegian (no --do_train: the old script trained anyway).
README_FROM_SCRATCH = [
    '--output_dir=./norwegian-roberta-base', '--model_type=roberta', '--config_name=./norwegian-roberta-base',
    '--tokenizer_name=./norwegian-roberta-base', '--dataset_name=oscar',
    '--dataset_config_name=unshuffled_deduplicated_no', '--max_seq_length=128', '--weight_decay=0.01',
    '--per_device_train_batch_size=128', '--per_device_eval_batch_size=128', '--learning_rate=3e-4',
    '--warmup_steps=1000', '--overwrite_output_dir', '--num_train_epochs=18', '--adam_beta1=0.9', '--adam_beta2=0.98',
    '--logging_steps=500', '--save_steps=2500', '--eval_steps=2500', '--push_to_hub']
# Fine-tuning a checkpoint, as transformers' own test of the example ran it (test_flax_examples.py).
FINE_TUNE = ["--model_name_or_path", "distilroberta-base", "--train_file", "sample_text.txt", "--validation_file",
             "sample_text.txt", "--output_dir", "out", "--overwrite_output_dir", "--max_seq_length", "128",
             "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--logging_steps", "2",
             "--eval_steps", "2", "--do_train", "--do_eval", "--num_train_epochs=1"]


def test_every_old_argument_is_accepted_with_its_old_default(capsys):
    import dataclasses

    from flax_bert.run.config import RunConfig, parse_run_config

    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    assert {name: defaults[name] for name in OLD_ARGUMENTS} == OLD_ARGUMENTS
    assert {name: defaults[name] for name in OLD_BEHAVIOUR} == OLD_BEHAVIOUR
    run = parse_run_config(["--output_dir", "x", "--adafactor", "--use_auth_token", "hf_x", "--trust_remote_code",
                            "--gradient_checkpointing", "--train_ref_file", "r.txt", "--overwrite_cache",
                            "--use_fast_tokenizer", "--pad_to_max_length"])
    assert (run.optimizer, run.token, run.use_auth_token, run.remat_policy) == ("adafactor", "hf_x", None, "full")
    assert "hf_x" not in json.dumps(run.to_dict())
    for argv, message in ((["--output_dir", "x", "--token", "a", "--use_auth_token", "b"], "pass only --token"),
                          (["--output_dir", "x", "--adafactor", "--optimizer", "lamb"], "choose one"),
                          (["--output_dir", "x", "--adafactor", "--optimizer", "stableadamw"], "choose one"),
                          (["--output_dir", "x", "--do_eval", "false"], None),  # the old script trained
                          (["--do_train"], "--output_dir is required"),
                          (["--output_dir", "x", "--do_train", "false"], "nothing to do")):
        if message is None:
            assert parse_run_config(argv).do_train
            continue
        with pytest.raises(SystemExit) as exit_status:
            parse_run_config(argv)
        assert exit_status.value.code == 2 and message in capsys.readouterr().err


def test_the_old_readme_commands_give_the_old_run_config():
    from flax_bert.run.config import parse_run_config

    expected = {**OLD_ARGUMENTS, **OLD_BEHAVIOUR,
                "output_dir": "./norwegian-roberta-base", "model_type": "roberta",
                "config_name": "./norwegian-roberta-base", "tokenizer_name": "./norwegian-roberta-base",
                "dataset_name": "oscar", "dataset_config_name": "unshuffled_deduplicated_no", "max_seq_length": 128,
                "weight_decay": 0.01, "per_device_train_batch_size": 128, "per_device_eval_batch_size": 128,
                "learning_rate": 3e-4, "warmup_steps": 1000, "overwrite_output_dir": True, "num_train_epochs": 18.0,
                "adam_beta2": 0.98, "save_steps": 2500, "eval_steps": 2500, "push_to_hub": True,
                "do_train": True,  # the old script trained whatever --do_train said
                "hub_model_id": "norwegian-roberta-base"}  # the old script's repository name: output_dir's name
    run = parse_run_config(README_FROM_SCRATCH)
    assert {name: getattr(run, name) for name in expected} == expected
    expected = {**OLD_ARGUMENTS, **OLD_BEHAVIOUR, "model_name_or_path": "distilroberta-base",
                "train_file": "sample_text.txt", "validation_file": "sample_text.txt", "output_dir": "out",
                "overwrite_output_dir": True, "max_seq_length": 128, "per_device_train_batch_size": 4,
                "per_device_eval_batch_size": 4, "logging_steps": 2, "eval_steps": 2, "do_train": True,
                "do_eval": True, "num_train_epochs": 1.0}
    run = parse_run_config(FINE_TUNE)
    assert {name: getattr(run, name) for name in expected} == expected


def test_the_docs_list_the_options_that_may_and_may_not_change_on_resume():
    from flax_bert.run.options import IMMUTABLE, mutable_options, option_tables

    assert option_tables() in (ROOT / "docs" / "run_mlm_flax.md").read_text()
    assert {"learning_rate", "max_steps", "logging_steps", "eval_steps", "save_steps", "validation_file",
            "max_eval_samples"} <= set(mutable_options())
    assert {"hidden_size", "tokenizer_name", "objective", "optimizer", "data_shards", "seed"} <= set(IMMUTABLE)


def test_transformers_advice_is_silenced_and_its_warnings_are_not():
    """"PyTorch was not found" (transformers' advice on an install without torch) is no news to a JAX user."""
    code = ("import flax_bert.cli; from transformers.utils import logging; log = logging.get_logger('transformers'); "
            "log.warning_advice('ADVICE-SHOWN'); log.warning('WARNING-SHOWN')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert "ADVICE-SHOWN" not in result.stderr and "WARNING-SHOWN" in result.stderr, result.stderr


def test_a_continued_run_takes_its_stored_options_and_refuses_immutable_changes(tmp_path, caplog):
    import logging

    from flax_bert.run.config import parse_run_config
    from flax_bert.run.options import StoredOptionError, reconcile_with_stored

    stored = parse_run_config(["--output_dir", str(tmp_path), "--hidden_size", "32", "--max_grad_norm", "1.0",
                               "--learning_rate", "1e-3", "--max_seq_length", "64"])
    (tmp_path / "run_config.json").write_text(json.dumps(stored.to_dict()))
    with caplog.at_level(logging.INFO):
        run = reconcile_with_stored(parse_run_config(["--output_dir", str(tmp_path), "--learning_rate", "2e-4"]))
    assert (run.hidden_size, run.max_grad_norm, run.max_seq_length, run.learning_rate) == (32, 1.0, 64, 2e-4)
    assert "changed on resume: learning_rate 0.001 -> 0.0002" in caplog.text
    for flags, named in ((["--hidden_size", "64"], "--hidden_size 64 differs from the run's 32"),
                         (["--optimizer", "lamb"], "--optimizer 'lamb' differs from the run's 'adamw'"),
                         (["--max_grad_norm", "0"], "--max_grad_norm 0.0 differs from the run's 1.0")):
        with pytest.raises(StoredOptionError, match=re.escape(named) + r".*continue with"):
            reconcile_with_stored(parse_run_config(["--output_dir", str(tmp_path), *flags]))
    assert reconcile_with_stored(parse_run_config(["--output_dir", str(tmp_path), "--max_grad_norm", "0.5"])).max_grad_norm == 0.5
    fresh = parse_run_config(["--output_dir", str(tmp_path), "--optimizer", "lamb"])
    fresh.reset_optimizer = True  # a fresh optimizer state: the optimizer may change
    assert reconcile_with_stored(fresh).optimizer == "lamb"
    assert reconcile_with_stored(parse_run_config(["--output_dir", str(tmp_path), "--hidden_size", "64",
                                                   "--overwrite_output_dir"])).hidden_size == 64


def test_old_flags_that_spell_new_options_are_not_overridden_by_the_stored_run(tmp_path):
    from flax_bert.run.config import parse_run_config
    from flax_bert.run.options import reconcile_with_stored

    stored = parse_run_config(["--output_dir", str(tmp_path), "--hidden_size", "32"])
    (tmp_path / "run_config.json").write_text(json.dumps(stored.to_dict()))
    resumed = reconcile_with_stored(parse_run_config(["--output_dir", str(tmp_path), "--gradient_checkpointing"]))
    assert resumed.remat_policy == "full"  # was: the stored "none", the flag silently ignored
    switched = parse_run_config(["--output_dir", str(tmp_path), "--adafactor"])
    switched.reset_optimizer = True
    assert reconcile_with_stored(switched).optimizer == "adafactor"  # was: "adamw", then refused with --adafactor


def test_adafactor_is_optax_adafactor_with_the_schedule():
    import jax.numpy as jnp
    import optax

    from flax_bert.training.optim import make_optimizer

    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    grads = {"w": jnp.full((4, 3), 0.5), "b": jnp.full(3, -0.25)}
    ours, schedule = make_optimizer(learning_rate=1e-2, warmup_steps=2, total_steps=10, optimizer="adafactor",
                                    max_grad_norm=None)
    old = optax.adafactor(learning_rate=schedule)
    a, b = ours.init(params), old.init(params)
    for _ in range(3):
        ua, a = ours.update(grads, a, params)
        ub, b = old.update(grads, b, params)
        np.testing.assert_array_equal(ua["w"], ub["w"])
        np.testing.assert_array_equal(ua["b"], ub["b"])


# ---------------------------------------------------------------- one example per line
EXAMPLES = ["def add(a, b): return the sum of a and b.", "Return a copy of the string with its first character capitalized.",
            "Raise ValueError if the value is not found.", "x", "Open the file and return a stream.",
            "Return True if all elements of the iterable are true."]


@pytest.fixture(scope="module")
def roberta_tokenizer(trained):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(trained / "tokenizer"))


def test_each_line_is_one_example_with_its_own_special_tokens_and_segment(roberta_tokenizer, tmp_path, caplog):
    import logging

    from flax_bert.data.pipeline import DataArgs, build_datasets

    lines = EXAMPLES * 5  # 30 examples, several per 32-token row, some cut across rows
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    args = DataArgs(train_file=str(path), validation_split_percentage=0, max_seq_length=32, cache_dir=str(tmp_path))
    with caplog.at_level(logging.INFO):
        train, _ = build_datasets(args, roberta_tokenizer, process_index=0, process_count=1)
    assert f"{len(lines)} documents, mean length" in caplog.text
    rows = train.shards[0].arrays
    bos = roberta_tokenizer.cls_token_id
    documents = []
    for ids, segments in zip(np.asarray(rows["input_ids"]), np.asarray(rows["segment_ids"])):
        for segment in [s for s in np.unique(segments) if s > 0]:
            tokens = ids[segments == segment].tolist()
            assert bos not in tokens[1:], "two examples share one attention segment"
            if tokens[0] == bos:
                documents.append(tokens)
            else:  # the rest of a document cut at the end of the previous row
                documents[-1] += tokens
    assert documents == [roberta_tokenizer(line)["input_ids"] for line in lines]


def test_blank_line_documents_is_the_explicit_multi_line_layout(roberta_tokenizer, tmp_path):
    from flax_bert.data.pipeline import DataArgs
    from flax_bert.data.sources import document_streams

    path = tmp_path / "blocks.txt"
    path.write_text("first sentence.\nsecond sentence.\n\nanother document.\n")
    for blocks, expected in ((False, 3), (True, 2), (None, 3)):
        args = DataArgs(train_file=str(path), validation_split_percentage=0, blank_line_documents=blocks)
        assert sum(len(batch) for batch in document_streams(args)[0].batches()) == expected
    nsp = DataArgs(train_file=str(path), validation_split_percentage=0, objective="mlm+nsp")
    assert sum(len(batch) for batch in document_streams(nsp)[0].batches()) == 2  # sentence pairs need blocks


# ---------------------------------------------------------------- a trained run, then eval / import as users type them
TINY = ["--model_type", "roberta", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--intermediate_size", "64", "--max_position_embeddings", "66", "--max_seq_length", "64",
        "--tokenizer_vocab_size", "1000", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--learning_rate", "2e-3", "--warmup_steps", "5", "--logging_steps", "5", "--save_steps", "10",
        "--max_steps", "20", "--max_train_samples", "600", "--max_eval_samples", "100", "--progress_bar", "false",
        "--eval_steps", "6", "--keep_best"]  # evaluations at 6, 12, 18 and the last step, 20; saves at 10 and 20


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropin")
    return root, cli_env(FLAX_BERT_CACHE=str(root / "cache"))


@pytest.fixture(scope="module")
def trained(workspace):
    root, env = workspace
    result = run_cli([str(ROOT / "run_mlm_flax.py"), *TINY, "--output_dir", "run", "--do_train", "--do_eval"],
                     env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def _listing(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_do_eval_alone_evaluates_the_run_and_changes_nothing_else(trained, workspace):
    root, env = workspace
    trained_results = json.loads((trained / "eval_results.json").read_text())
    assert 0 < trained_results["unigram_baseline_accuracy"] < 0.5  # printed beside the accuracy: did it learn?
    (trained / "eval_results.json").unlink()
    before = _listing(trained)
    result = run_cli([str(ROOT / "run_mlm_flax.py"), "--output_dir", "run", "--do_eval"], env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "first step" not in result.stderr and "(train)" not in result.stderr  # no training, no training data
    assert _listing(trained).keys() - {"eval_results.json"} == before.keys()
    assert {k: v for k, v in _listing(trained).items() if k != "eval_results.json"} == before
    results = json.loads((trained / "eval_results.json").read_text())
    assert results["step"] == trained_results["step"] == 20
    for name in ("eval_loss", "eval_accuracy", "perplexity"):
        assert results[name] == pytest.approx(trained_results[name], rel=1e-6)

    # `flax-bert eval RUN_DIR`, as a user types it: the run's own options, nothing else needed
    result = run_cli(["-m", "flax_bert.cli", "eval", "run"], env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((trained / "eval_results.json").read_text())
    assert again["eval_loss"] == pytest.approx(trained_results["eval_loss"], rel=1e-6)


def test_with_keep_best_every_evaluation_is_in_a_checkpoint_and_the_last_step_is_evaluated_once(trained):
    """--eval_steps 6 --save_steps 10 --keep_best: each evaluation saves its checkpoint with its metrics (else
    best-N has nothing to keep); the last step is evaluated inside the loop, and --do_eval does not repeat it."""
    from flax_bert.run.checkpoint_restore import read_json_item

    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12, 18, 20]
    kept = sorted(int(p.name) for p in (trained / "checkpoints").iterdir() if p.name.isdigit())
    assert {12, 18, 20} <= set(kept), kept  # the last three saves (6, 10, 12, 18, 20) and the best
    for step in (12, 18, 20):
        metrics = read_json_item(str(trained / "checkpoints" / str(step) / "meta"))["metrics"]
        assert metrics and metrics["eval_loss"] > 0, (step, metrics)
    best = min((r["eval_loss"], r["step"]) for r in records if "eval_loss" in r)[1]
    assert best in kept
    final = json.loads((trained / "eval_results.json").read_text())
    assert final["eval_loss"] == [r for r in records if "eval_loss" in r][-1]["eval_loss"]


def test_eval_is_the_same_at_any_eval_batch_size_and_device_count(trained, workspace):
    """Each eval mask is keyed by its row's place in the validation set: `flax-bert eval RUN` gives one figure
    at --per_device_eval_batch_size 8, 16 (the run's) and 32, on one device or two."""
    root, env = workspace
    original = (trained / "eval_results.json").read_text()
    scores = {}
    try:
        for batch, devices in ((8, 1), (32, 1), (8, 2)):
            run_env = {**env, "XLA_FLAGS": xla_flags(devices)}
            result = run_cli(["-m", "flax_bert.cli", "eval", "run", "--per_device_eval_batch_size", str(batch)],
                             env=run_env, cwd=root)
            assert result.returncode == 0, result.stderr[-3000:]
            scores[batch, devices] = json.loads((trained / "eval_results.json").read_text())
    finally:
        (trained / "eval_results.json").write_text(original)
    trained_results = json.loads(original)
    for key, results in scores.items():
        for name in ("eval_loss", "eval_accuracy"):
            assert results[name] == pytest.approx(trained_results[name], rel=1e-5), (key, name, results[name])


def test_import_then_the_printed_command_continues_the_run(trained, workspace):
    root, env = workspace
    result = run_cli(["-m", "flax_bert.cli", "import", "run", "--to", "imported"], env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    command = result.stdout.split("continue pretraining with: ")[1].splitlines()[0].split()
    assert command[:2] == ["flax-bert", "train"]
    # exactly as printed; it would train three epochs of the built-in corpus, so stop it with SIGTERM once it
    # trains: the run then saves and exits 0
    log = open(root / "continued.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "flax_bert.cli", *command[1:]], env=env, cwd=root,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while "first step (compile included)" not in (root / "continued.log").read_text():
            assert process.poll() is None and time.time() < deadline, (root / "continued.log").read_text()[-3000:]
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, (root / "continued.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    text = (root / "continued.log").read_text()
    assert "resuming from checkpoint" in text and "(hidden_size" in text.replace(", hidden_size", "(hidden_size")
    steps = sorted(int(p.name) for p in (root / "imported" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] > 0 and not (root / "imported" / "checkpoints_damaged").exists()
    stored = json.loads((root / "imported" / "run_config.json").read_text())
    assert (stored["hidden_size"], stored["num_hidden_layers"]) == (32, 2)  # the imported model's, not 768 x 12


def test_our_eval_of_one_example_per_line_equals_pytorch_on_the_same_masks(trained, workspace, roberta_tokenizer):
    """The exported model evaluated by `flax-bert eval` on a one-example-per-line file gives the loss that
    transformers' PyTorch model gives on each example alone, with the same masked tokens: packing kept every
    example's own special tokens, positions and attention."""
    import jax
    import torch
    import transformers

    from flax_bert.data.pipeline import DataArgs, build_datasets
    from flax_bert.training.masking import mask_tokens
    from flax_bert.training.step import MaskingConfig, StepConfig

    root, env = workspace
    lines = EXAMPLES * 4
    (root / "lines.txt").write_text("\n".join(lines) + "\n")
    result = run_cli(["-m", "flax_bert.cli", "eval", "--model_name_or_path", "run", "--validation_file", "lines.txt",
                      "--output_dir", "eval-lines", "--max_seq_length", "64", "--per_device_eval_batch_size", "4"],
                     env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads((root / "eval-lines" / "eval_results.json").read_text())
    assert "lines.txt (all): 24 documents, mean length" in result.stderr

    # the same rows and masks, rebuilt here; then PyTorch on every example alone
    _, rows = build_datasets(DataArgs(validation_file=str(root / "lines.txt"), max_seq_length=64,
                                      cache_dir=str(root / "cache")), roberta_tokenizer, process_index=0,
                             process_count=1, splits=("validation",))
    masking = MaskingConfig.from_tokenizer(roberta_tokenizer, mlm_probability=0.15, max_seq_length=64)
    model = transformers.AutoModelForMaskedLM.from_pretrained(str(trained)).eval()
    mask = jax.jit(lambda row_ids, ids: mask_tokens(
        jax.random.key(StepConfig(masking=masking).eval_seed), 0, ids, example_index_B=row_ids,
        special_ids=masking.special_ids, mask_token_id=masking.mask_token_id,
        random_vocab_size=masking.random_vocab_size, mlm_probability=0.15, num_slots=masking.num_slots))
    losses = []
    for batch in rows.eval_batches(4):
        masked = mask(batch["row_ids"], batch["input_ids"])
        corrupted, positions = np.asarray(masked.input_ids), np.asarray(masked.positions)
        labels, weights = np.asarray(masked.labels), np.asarray(masked.weights)
        for row in range(len(corrupted)):
            segments = batch["segment_ids"][row]
            for segment in [s for s in np.unique(segments) if s > 0]:
                where = np.flatnonzero(segments == segment)
                slots = [k for k in range(positions.shape[1]) if weights[row, k] and positions[row, k] in where]
                if not slots:
                    continue
                with torch.no_grad():
                    logits = model(torch.tensor(corrupted[row, where][None])).logits[0]
                for k in slots:
                    log_probs = torch.log_softmax(logits[positions[row, k] - where[0]], -1)
                    losses.append(-float(log_probs[labels[row, k]]))
    assert ours["eval_loss"] == pytest.approx(np.mean(losses), rel=1e-4)
