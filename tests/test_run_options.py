"""A run does what its options say on every path: the options that may change on resume reach the model, the
step and the data (also when continuing a checkpoint, --model_name_or_path or an import); with --keep_best every
evaluation is in a checkpoint; an explicit --resume_from_checkpoint is honoured or refused, never ignored; a
start that fails on its inputs locks nothing; an imported model's first run decides its data; the value a
message asks for is accepted."""
import dataclasses
import json
import logging
import pathlib

import pytest

from flax_bert.run.build import data_args_from_run, decide_data_shards, eval_masking, resolve_model_config
from flax_bert.run.checkpoint import Checkpointer, StartPoint, check_output_dir, resolve_start
from flax_bert.run.config import parse_run_config
from flax_bert.run.options import StoredOptionError, mutable_options, reconcile_with_stored
from flax_bert.training.phases import make_plan
from flax_bert.training.step import MaskingConfig
from tests.test_checkpoint import RUN_CONFIG, make_trainer, state_at


@pytest.fixture(scope="module")
def single():
    return make_trainer()


def save_bundle(trainer, out: pathlib.Path, steps, model: dict, run: dict | None = None) -> None:
    """Checkpoints of a run whose model config is `model` (as the train loop saves them)."""
    with Checkpointer(out, save_steps=1) as checkpoints:
        for step in steps:
            checkpoints.save(step, state_at(trainer, step), {}, {"run": run or RUN_CONFIG, "model": model}, force=True)
        checkpoints.wait()


def stored_model(trainer) -> dict:
    """The trainer's model with 0.1 dropout, as a run trained without --hidden_dropout_prob stores it."""
    cfg = dataclasses.replace(trainer.model_config, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return cfg.to_hf_dict()


# ----------------------------------------------------------------------------- 1. options reach the run
CONTINUED_MODEL = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.05, "dtype": "bfloat16",
                   "scan_layers": False, "remat_policy": "full", "attention": "xla"}


def flags(options: dict) -> list[str]:
    return [item for name, value in options.items() for item in (f"--{name}", str(value))]


def test_dropout_and_runtime_options_reach_a_continued_model(tmp_path, single):
    run_dir, hf = tmp_path / "run", tmp_path / "hf"
    save_bundle(single, run_dir, [2], stored_model(single))
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(stored_model(single)))
    starts = {"checkpoint": (resolve_start(run_dir), []),
              "model_name_or_path": (StartPoint("hf", str(hf), 0, "model_name_or_path"), ["--model_name_or_path", str(hf)])}
    for where, (start, extra) in starts.items():
        run = parse_run_config(["--output_dir", str(run_dir), *extra, *flags(CONTINUED_MODEL)])
        cfg = resolve_model_config(run, None, start)
        assert {name: getattr(cfg, name) for name in CONTINUED_MODEL} == CONTINUED_MODEL, where
        unset = resolve_model_config(parse_run_config(["--output_dir", str(run_dir), *extra]), None, start)
        assert (unset.hidden_dropout_prob, unset.attention_probs_dropout_prob) == (0.1, 0.1), where  # the model's own


class _Tokenizer:
    """What build_trainer reads of a tokenizer."""
    mask_token_id, all_special_ids = 4, [0, 1, 2, 3, 4]

    def __len__(self):
        return 1000


# each option that may change on resume -> (a new value, where it must arrive)
DATA = {"validation_file": "other.txt", "shuffle_buffer_size": 7, "skip_invalid_utf8": True, "max_eval_samples": 3}
OPTIMIZER = {"learning_rate": ("learning_rate", 0.01), "weight_decay": ("weight_decay", 0.1),
             "adam_beta1": ("b1", 0.8), "adam_beta2": ("b2", 0.9), "adam_epsilon": ("eps", 1e-7),
             "lr_scheduler_type": ("schedule", "cosine"), "wsd_decay_fraction": ("decay_fraction", 0.2),
             "warmup_steps": ("warmup_steps", 3)}
STEP = {"eval_mlm_probability": 0.3, "gradient_accumulation_steps": 2}
# read by Run from the reconciled run itself (batch sizes, the loop's cadence, the checkpointer, the mesh)
LOOP = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "num_train_epochs": 5.0,
        "max_steps": 9, "logging_steps": 7, "eval_steps": 5, "save_steps": 6, "save_minutes": 2.0,
        "save_total_limit": 2, "keep_best": True, "mesh": "data=-1",
        "mixture_temperature": 2.0}  # the mixture's iterator takes it (tests/test_mixture.py)


def test_every_option_that_may_change_on_resume_reaches_the_run(tmp_path, single, monkeypatch):
    from flax_bert.run import build

    # the phases and the batch-size warmup may change in the steps still to come: tests/test_phases.py
    later_steps = {"phases", "batch_size_warmup_tokens", "batch_size_warmup_start"}
    assert set(mutable_options()) == set(CONTINUED_MODEL) | set(DATA) | set(OPTIMIZER) | set(STEP) | set(LOOP) | later_steps
    run_dir = tmp_path / "run"
    save_bundle(single, run_dir, [2], stored_model(single))
    stored = parse_run_config(["--output_dir", str(run_dir), "--max_seq_length", "32"])
    (run_dir / "run_config.json").write_text(json.dumps(stored.to_dict()))
    new = {**CONTINUED_MODEL, **DATA, **{k: v for k, (_, v) in OPTIMIZER.items()}, **STEP, **LOOP}
    run = reconcile_with_stored(parse_run_config(["--output_dir", str(run_dir), *flags(new)]))
    assert {name: getattr(run, name) for name in new} == new

    cfg = resolve_model_config(run, None, resolve_start(run_dir))
    assert {name: getattr(cfg, name) for name in CONTINUED_MODEL} == CONTINUED_MODEL
    data_args = data_args_from_run(run)
    assert {name: getattr(data_args, name) for name in DATA} == DATA
    optimizer_args = {}
    monkeypatch.setattr(build, "make_optimizer", lambda **kwargs: (optimizer_args.update(kwargs), None))
    monkeypatch.setattr(build, "Trainer", lambda model_config, step_config, tx, mesh, schedule: step_config)
    step_config = build.build_trainer(run, cfg, _Tokenizer(), None, total_steps=100)
    assert {name: optimizer_args[arg] for name, (arg, _) in OPTIMIZER.items()} == {k: v for k, (_, v) in OPTIMIZER.items()}
    assert step_config.eval_masking.mlm_probability == 0.3 and step_config.gradient_accumulation_steps == 2
    assert build.count_total_steps(run, None, 16) == 9


def test_the_evaluation_rate_is_the_training_rate_unless_set():
    masking = MaskingConfig(special_ids=(0,), mask_token_id=4, random_vocab_size=100, mlm_probability=0.15)
    run = parse_run_config(["--output_dir", "x"])
    assert eval_masking(masking, run) is None
    assert eval_masking(masking, dataclasses.replace(run, eval_mlm_probability=0.3)).mlm_probability == 0.3


# ----------------------------------------------------------------------------- 3. --keep_best and the last step
class _NoSignal:
    def should_stop(self, step):
        return False


@pytest.mark.parametrize("save_minutes", [None, 60.0])
def test_with_keep_best_every_evaluation_saves_and_the_last_step_is_evaluated(tmp_path, save_minutes):
    from flax_bert.run.step_plan import StepPlanner

    run = parse_run_config(["--output_dir", str(tmp_path), "--eval_steps", "3", "--save_steps", "5",
                            "--keep_best", "--max_steps", "10", "--logging_steps", "100"])
    checkpoints = Checkpointer(tmp_path, save_steps=5, save_minutes=save_minutes, keep_best=True)
    plan = make_plan(None, 8, None, total_steps=10, max_seq_length=32, mlm_probability=0.15)
    planner = StepPlanner(run, plan, checkpoints, evaluates=True, downstream=False)
    plans = {step: planner.decide(step, 0, _NoSignal()) for step in range(1, 11)}
    assert [s for s, p in plans.items() if p.evaluate] == [3, 6, 9, 10]
    assert [s for s, p in plans.items() if p.save] == [3, 5, 6, 9, 10]  # every evaluation carries its metrics
    assert [s for s, p in plans.items() if p.log] == [10]  # --logging_steps 100: the last step only
    planner.run = dataclasses.replace(run, keep_best=False)
    assert [s for s in range(1, 11) if planner.decide(s, 0, _NoSignal()).save] == [5, 10]


# ----------------------------------------------------------------------------- 4. --resume_from_checkpoint
def test_an_explicit_earlier_step_of_this_run_is_refused_not_ignored(tmp_path, single, caplog):
    from flax_bert.run.start import ResumeRequestError

    run_dir, other = tmp_path / "run", tmp_path / "other"
    save_bundle(single, run_dir, [1, 2, 3], stored_model(single))
    save_bundle(single, other, [5], stored_model(single))
    with pytest.raises(ResumeRequestError, match=r"is step 1 of this run, whose checkpoints go on to step 3: drop "
                                                 r"--resume_from_checkpoint .* move .*checkpoints/2, .*checkpoints/3"):
        resolve_start(run_dir, str(run_dir / "checkpoints" / "1"))
    assert resolve_start(run_dir, str(run_dir / "checkpoints" / "3")).step == 3  # its latest: the same thing
    assert resolve_start(run_dir, str(run_dir)).step == 3
    with caplog.at_level(logging.INFO):  # another run's: the start this one went on from (rerun the same command)
        start = resolve_start(run_dir, str(other / "checkpoints" / "5"))
    assert (start.source, start.step) == ("output_dir", 3)
    assert "not read, the output_dir holds this run's own checkpoints (up to step 3)" in caplog.text


# ----------------------------------------------------------------------------- 5. a failed start locks nothing
@pytest.mark.parametrize("bad", ["misspelt", "jsonl_without_text", "empty", "binary"])
def test_a_start_that_fails_on_its_inputs_does_not_lock_the_output_dir(tmp_path, bad, capsys):
    from flax_bert.cli import run_mlm_flax_main

    good = tmp_path / "train.txt"
    good.write_text("".join(f"line {i} of some text to train on.\n" for i in range(50)))
    files = {"misspelt": tmp_path / "trian.txt", "jsonl_without_text": tmp_path / "train.jsonl",
             "empty": tmp_path / "empty.txt", "binary": tmp_path / "binary.txt"}
    files["jsonl_without_text"].write_text('{"body": "no text column"}\n' * 20)
    files["empty"].write_text("")
    files["binary"].write_bytes(bytes(range(256)) * 64)
    out = tmp_path / "out"
    common = ["--output_dir", str(out), "--max_steps", "1", "--hidden_size", "32", "--num_hidden_layers", "1",
              "--num_attention_heads", "2", "--intermediate_size", "64", "--max_seq_length", "32",
              "--tokenizer_vocab_size", "300", "--progress_bar", "false"]
    code = run_mlm_flax_main(["--train_file", str(files[bad]), *common])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and error.startswith("error: "), error
    assert not (out / "run_config.json").exists()
    # the corrected command is this directory's run: nothing stored refuses it
    corrected = reconcile_with_stored(parse_run_config(["--train_file", str(good), *common]))
    check_output_dir(corrected.output_dir, False, corrected.to_dict(), record=False)


# ----------------------------------------------------------------------------- 6. an import decides no data
@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """`flax-bert import` of a tiny RoBERTa with a 300-token tokenizer."""
    import transformers

    from flax_bert.data.tokenizer_training import train_tokenizer
    from flax_bert.run.directory import import_hf_model

    root = tmp_path_factory.mktemp("import")
    hf = root / "hf"
    train_tokenizer((f"sentence number {i} of a tiny corpus." for i in range(200)), kind="bpe", vocab_size=300,
                    output_dir=hf, model_max_length=32)
    config = transformers.RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=40)
    transformers.RobertaForMaskedLM(config).save_pretrained(hf)
    import_hf_model(hf, root / "imported")
    return root


def test_an_imported_model_takes_its_data_options_from_its_first_run(imported):
    root = imported
    data = ["--train_file", str(root / "train.txt"), "--max_seq_length", "32", "--seed", "3", "--mlm_probability", "0.2"]
    run = reconcile_with_stored(parse_run_config(["--output_dir", str(root / "imported"), *data]))
    assert (run.hidden_size, run.train_file, run.max_seq_length, run.seed) == (32, str(root / "train.txt"), 32, 3)
    check_output_dir(run.output_dir, False, run.to_dict(), resuming=True, record=False)
    elsewhere = reconcile_with_stored(parse_run_config(["--resume_from_checkpoint", str(root / "imported"),
                                                        "--output_dir", str(root / "new"), *data]))
    assert (elsewhere.hidden_size, elsewhere.max_seq_length) == (32, 32)
    with pytest.raises(StoredOptionError, match="--hidden_size 64 differs"):  # the model it holds stays fixed
        reconcile_with_stored(parse_run_config(["--output_dir", str(root / "imported"), "--hidden_size", "64"]))


# ----------------------------------------------------------------------------- 7. what a message asks for
def test_the_data_shards_a_message_asks_for_are_accepted_and_a_new_run_records_its_own(tmp_path):
    # a run resumed with a smaller batch is told "resume with --data_shards 16" (ShardedBatchIterator)
    stored = parse_run_config(["--output_dir", str(tmp_path), "--hidden_size", "32"])  # data_shards unset: None
    (tmp_path / "run_config.json").write_text(json.dumps(stored.to_dict()))
    run = reconcile_with_stored(parse_run_config(["--output_dir", str(tmp_path), "--data_shards", "16"]))
    assert run.data_shards == 16
    decided = decide_data_shards(parse_run_config(["--output_dir", str(tmp_path)]), global_batch=64)
    assert decided.data_shards == 16 and decided.to_dict()["data_shards"] == 16  # recorded with the run's options


# ----------------------------------------------------------------------------- 8. the old README's flow
def test_the_old_readme_flow_config_and_tokenizer_in_the_output_dir_then_overwrite_trains(imported, capsys):
    """The old README saved a config and a tokenizer into the output dir, then trained there with
    --overwrite_output_dir: they are the run's inputs, so they survive, and the run trains and exports."""
    import shutil

    from flax_bert.cli import run_mlm_flax_main

    out = imported / "norwegian-roberta-base"
    out.mkdir()
    saved = [p.name for p in (imported / "hf").iterdir() if p.name != "model.safetensors"]
    for name in saved:
        shutil.copy(imported / "hf" / name, out / name)
    code = run_mlm_flax_main(["--output_dir", str(out), "--model_type", "roberta", "--config_name", str(out),
                              "--tokenizer_name", str(out), "--overwrite_output_dir", "--max_seq_length", "32",
                              "--max_train_samples", "200", "--max_eval_samples", "20", "--max_steps", "2",
                              "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
                              "--do_train", "--do_eval", "--progress_bar", "false"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert {"config.json", "tokenizer_config.json", "model.safetensors", "eval_results.json"} <= set(
        p.name for p in out.iterdir())
    written = json.loads((out / ".flax-bert-written.json").read_text())["written"]
    assert "model.safetensors" in written and "checkpoints" in written and "run_config.json" in written
