"""`flax-bert finetune`: a tiny BERT learns a made task (a rule on built-in corpus texts) far beyond chance,
results.json and the table, the best seed in transformers (AutoModelForSequenceClassification and the
text-classification pipeline predict as we do), a sweep interrupted and resumed, regression inferred from
float labels and started from another task's fine-tuned model, the metrics, length batching, bad input."""
import json
import logging
import random

import jax.numpy as jnp
import numpy as np
import pytest

from flax_bert import cli
from flax_bert.finetune import metrics
from flax_bert.finetune.data import Encoded, collate, length_batches
from flax_bert.finetune.sweep import Sweep
from tests.xla_env import optimized_compiles

RETURN_WORDS = ("return", "returns")


@pytest.fixture(scope="module", autouse=True)
def optimized():
    """Thousands of fine-tuning steps in this process: LLVM's optimizations pay for themselves (tests/xla_env.py)."""
    with optimized_compiles():
        yield


def _made_rows():
    """Pairs (the first 8 words of a docstring, the next 8); label 1 when 'return(s)' is among the 16 words, balanced;
    score: 2 for 'return(s)', plus a quarter for each article among the first 4 words."""
    from flax_bert.data.corpus import load_builtin_corpus

    docs = [d.split() for d in load_builtin_corpus() if len(d.split()) >= 16]
    has = lambda w: any(x.lower().strip(".,:") in RETURN_WORDS for x in w[:16])  # noqa: E731
    chosen = [w for w in docs if has(w)][:420] + [w for w in docs if not has(w)][:420]
    random.Random(0).shuffle(chosen)
    return [{"sentence": " ".join(w[:8]), "second": " ".join(w[8:16]), "label": ["no", "yes"][has(w)],
             "score": 2.0 * has(w) + sum(x.lower() in ("the", "a", "an") for x in w[:4]) / 4} for w in chosen]


@pytest.fixture(scope="module")
def made_task(tmp_path_factory):
    import pandas as pd

    from flax_bert.data.tokenizer_training import train_tokenizer
    from flax_bert.models import create_model
    from flax_bert.models.config import ModelConfig
    from flax_bert.models.convert import save_hf

    root = tmp_path_factory.mktemp("made_task")
    rows = _made_rows()
    train, valid, test = pd.DataFrame(rows[:640]), pd.DataFrame(rows[640:800]), pd.DataFrame(rows[800:])
    train.to_json(root / "train.jsonl", orient="records", lines=True)
    valid.to_csv(root / "valid.csv", index=False)
    test.to_csv(root / "test.tsv", sep="\t", index=False)
    train.to_parquet(root / "train.parquet")
    tokenizer = train_tokenizer((r["sentence"] + " " + r["second"] for r in rows), kind="wordpiece", vocab_size=400,
                                output_dir=root / "tokenizer")
    config = ModelConfig.for_family("bert", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                    pad_token_id=tokenizer.pad_token_id)
    save_hf(create_model(config), root / "model", tokenizer=tokenizer)  # a fresh encoder: all it knows is fine-tuned
    return root


def finetune(made_task, output_dir, *extra):
    try:
        return _finetune(made_task, output_dir, *extra)
    except SystemExit as stop:  # argparse's refusals
        return stop.code


def _finetune(made_task, output_dir, *extra):
    return cli.main(["finetune", str(made_task / "model"), "--train_file", str(made_task / "train.jsonl"),
                     "--validation_file", str(made_task / "valid.csv"), "--text_column", "sentence",
                     "--text_pair_column", "second", "--per_device_train_batch_size", "4", "--max_seq_length", "32",
                     "--output_dir", str(output_dir), "--no-progress_bar", *extra])


@pytest.fixture(scope="module")
def classified(made_task, tmp_path_factory):
    """A 2 x 2 sweep (two learning rates, two seeds), cut off after its third seed and rerun."""
    output_dir = tmp_path_factory.mktemp("classified")
    args = ("--learning_rate", "2e-3,4e-3", "--num_train_epochs", "8", "--seeds", "1,2",
            "--test_file", str(made_task / "test.tsv"))
    calls = []
    original = Sweep.run_seed

    def stopped_after_three(self, setting, seed):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((setting.learning_rate, seed))
        return original(self, setting, seed)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Sweep, "run_seed", stopped_after_three)
        assert finetune(made_task, output_dir, *args) == 130  # interrupted
    first = sorted(p.name for p in output_dir.glob("cells/*/seed_*.json"))
    assert len(first) == 3 and not (output_dir / "results.json").exists()
    finished_before = {p: p.read_text() for p in output_dir.glob("cells/*/seed_*.json")}
    resumed = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Sweep, "run_seed", lambda self, s, seed: resumed.append((s.learning_rate, seed)) or original(self, s, seed))
        assert finetune(made_task, output_dir, *args) == 0
    return output_dir, calls, resumed, finished_before


def test_a_made_task_is_learned_and_results_summarize_each_seed(classified):
    output_dir, _, _, _ = classified
    results = json.loads((output_dir / "results.json").read_text())
    assert {"metric", "per_seed", "mean", "median", "std"} <= set(results)
    assert results["metric"] == "accuracy" and set(results["per_seed"]) == {"1", "2"}
    values = list(results["per_seed"].values())
    assert results["mean"] == pytest.approx(np.mean(values)) and results["std"] == pytest.approx(np.std(values, ddof=1))
    assert results["mean"] > 0.8, results  # balanced classes: chance is 0.5
    assert len(results["cells"]) == 2
    assert results["mean"] == max(cell["mean"] for cell in results["cells"])  # the setting picked by its mean
    assert results["test"]["mean"] > 0.75  # the test file's labels scored too
    predictions = (output_dir / "test_predictions.tsv").read_text().splitlines()
    assert predictions[0] == "index\tprediction" and len(predictions) == 41 and {p.split("\t")[1] for p in predictions[1:]} <= {"no", "yes"}


def test_an_interrupted_sweep_resumes_from_its_last_finished_seed(classified):
    output_dir, calls, resumed, finished_before = classified
    assert len(calls) == 3 and resumed == [(4e-3, 2)]  # only the unfinished seed ran again
    for path, text in finished_before.items():
        assert path.read_text() == text


def test_the_best_seed_loads_in_transformers_and_predicts_as_we_do(classified, made_task):
    import pandas as pd
    import torch
    import transformers

    from flax_bert.models.convert import load_hf

    output_dir = classified[0]
    best = output_dir / "best"
    results = json.loads((output_dir / "results.json").read_text())
    assert json.loads((best / "finetune.json").read_text())["seed"] == results["best_seed"]
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(best, output_loading_info=True)
    assert type(model).__name__ == "BertForSequenceClassification" and not info["missing_keys"]
    assert model.config.id2label == {0: "no", 1: "yes"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(best)
    rows = pd.read_csv(made_task / "valid.csv")[:16]
    encoded = tokenizer(list(rows["sentence"]), list(rows["second"]), padding=True, truncation=True,
                        return_tensors="np")
    ours = np.asarray(load_hf(best)(jnp.asarray(encoded["input_ids"]), attention_mask=jnp.asarray(encoded["attention_mask"]),
                                    token_type_ids=jnp.asarray(encoded["token_type_ids"])).logits)
    with torch.no_grad():
        theirs = model(**{k: torch.tensor(v) for k, v in encoded.items()}).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    classify = transformers.pipeline("text-classification", model=str(best))
    assert tokenizer.model_max_length == 32  # the length it was fine-tuned on
    labels = [classify({"text": a, "text_pair": b}, truncation=True)["label"]
              for a, b in zip(rows["sentence"], rows["second"])]
    assert labels == [model.config.id2label[i] for i in ours.argmax(-1)]


def test_float_labels_make_a_regression_started_from_another_tasks_model(made_task, classified, tmp_path, caplog):
    output_dir = tmp_path / "regression"
    caplog.set_level(logging.INFO, logger="flax_bert")
    assert cli.main(["finetune", str(made_task / "model"), "--init_from", str(classified[0] / "best"),
                     "--train_file", str(made_task / "train.parquet"), "--validation_file", str(made_task / "valid.csv"),
                     "--text_column", "sentence", "--text_pair_column", "second", "--label_column", "score",
                     "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--learning_rate", "4e-3",
                     "--num_train_epochs", "8", "--seeds", "1", "--output_dir", str(output_dir), "--no-progress_bar"]) == 0
    assert "task: regression (inferred" in caplog.text
    assert "initialized from each seed: classifier (" in caplog.text  # the 2-class head left behind, the pooler kept
    results = json.loads((output_dir / "results.json").read_text())
    assert results["metric"] == "pearson" and results["mean"] > 0.7, results
    assert json.loads((output_dir / "best" / "config.json").read_text())["problem_type"] == "regression"


# ----------------------------------------------------------------------------- pieces
def test_metrics_match_their_definitions():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    tied = np.round(x * 2), np.round(y * 2)  # many ties
    assert metrics.pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y)[0])
    assert metrics.spearman(*tied) == pytest.approx(scipy_stats.spearmanr(*tied)[0])
    predictions, labels = np.array([1, 1, 0, 0, 1, 0]), np.array([1, 0, 0, 0, 1, 1])
    assert metrics.f1(predictions, labels, 2) == pytest.approx(2 * 2 / (3 + 3))
    tp, tn, fp, fn = 2, 2, 1, 1
    assert metrics.mcc(predictions, labels, 2) == pytest.approx((tp * tn - fp * fn) / np.sqrt(3 * 3 * 3 * 3))
    assert metrics.mcc(np.zeros(6, int), labels, 2) == 0.0
    three = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1])
    assert metrics.f1(*three, 3) == pytest.approx(np.mean([1.0, 0.0, 0.5]))
    assert metrics.summary([1.0, 2.0, 4.0]) == {"mean": pytest.approx(7 / 3), "median": 2.0,
                                                 "std": pytest.approx(np.std([1, 2, 4], ddof=1))}


def test_length_batches_cover_every_example_once_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 120, size=1000)
    data = Encoded([np.ones(n, np.int32) for n in lengths], None, np.zeros(1000, np.int32))
    batches = length_batches(lengths, 16, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    padded = sum(collate(data, b, 16, 0, 128)["input_ids"].size for b in batches)
    random_order = np.random.default_rng(1).permutation(1000)
    unsorted = sum(collate(data, random_order[i:i + 16], 16, 0, 128)["input_ids"].size for i in range(0, 1000, 16))
    assert padded < 0.7 * unsorted
    batch = collate(data, batches[-1][:5], 16, 0, 128)
    assert batch["weights"].tolist() == [1.0] * 5 + [0.0] * 11 and batch["input_ids"].shape[1] % 16 == 0


@pytest.mark.parametrize("extra,message", [
    (["--label_column", "nope"], "has no column 'nope' (--label_column)"),
    (["--task", "regression"], "--task regression needs numeric labels"),
    (["--metric", "pearson"], "--metric pearson does not score classification"),
    (["--learning_rate", "1e-3,x"], "--learning_rate takes numbers separated by commas"),
    (["--max_seq_length", "512"], "exceeds the model's"),
])
def test_bad_input_is_one_line(made_task, tmp_path, capsys, extra, message):
    assert finetune(made_task, tmp_path / "out", *extra) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_rerun_with_other_options_is_refused(made_task, classified, capsys):
    assert finetune(made_task, classified[0], "--learning_rate", "2e-3", "--max_seq_length", "24") == 1
    assert "holds fine-tuning results of other options (max_seq_length 32 there, 24 now" in capsys.readouterr().err


def test_a_dataset_by_name_reads_its_splits_offline(made_task, tmp_path):
    """--dataset_name goes through datasets.load_dataset (here a local folder: the Hub is not reachable in tests)."""
    import pandas as pd

    from flax_bert.finetune.data import DataOptions, read_split

    folder = tmp_path / "dataset"
    folder.mkdir()
    rows = pd.read_csv(made_task / "valid.csv")
    rows[:100].to_csv(folder / "train.csv", index=False)
    rows[100:].to_csv(folder / "validation.csv", index=False)
    options = DataOptions(dataset_name=str(folder), text_column="sentence", text_pair_column="second",
                          cache_dir=str(tmp_path / "cache"))
    validation = read_split(options, "validation")
    assert validation.texts == list(rows["sentence"][100:]) and validation.pairs == list(rows["second"][100:])
    assert validation.labels.tolist() == list(rows["label"][100:])
    assert read_split(options, "test", required=False) is None  # no --test_split asked


def test_a_run_directory_is_read_from_its_checkpoint(made_task, tmp_path):
    from flax_bert.finetune.source import load_source
    from flax_bert.run.directory import import_hf_model

    import_hf_model(made_task / "model", tmp_path / "run")
    from_run, from_folder = load_source(str(tmp_path / "run")), load_source(str(made_task / "model"))
    assert "of the run" in from_run.description and from_run.config.model_type == "bert"
    for name, value in from_folder.tensors.items():
        np.testing.assert_array_equal(from_run.tensors[name], value, err_msg=name)
    assert from_run.tokenizer("a b")["input_ids"] == from_folder.tokenizer("a b")["input_ids"]


def test_pairs_keep_segment_ids_only_for_a_model_with_two_token_types(made_task):
    """A BERT tokenizer's second-segment 1s would index past a one-row (RoBERTa) token-type table: NaN logits."""
    from transformers import AutoTokenizer

    from flax_bert.finetune.data import Split, encode

    tokenizer = AutoTokenizer.from_pretrained(made_task / "model")
    split = Split("train", ["first text"], ["second text"], np.array([1]))
    assert encode(split, tokenizer, 32, None, token_types=True).token_type_ids[0].max() == 1
    assert encode(split, tokenizer, 32, None, token_types=False).token_type_ids is None


def test_a_downstream_score_for_a_model_in_memory(made_task, tmp_path):
    """What a pretraining run's --downstream_eval will log: a copy fine-tuned on a small task from a YAML file."""
    from flax_bert.errors import InputError
    from flax_bert.finetune.downstream import downstream_score
    from flax_bert.models.convert import load_hf
    from flax_bert.training.sharding import make_mesh

    task = tmp_path / "task.yaml"
    task.write_text(f"train_file: {made_task / 'train.jsonl'}\nvalidation_file: {made_task / 'valid.csv'}\n"
                    "text_column: sentence\ntext_pair_column: second\nper_device_train_batch_size: 4\n"
                    "max_seq_length: 32\nlearning_rate: 4.0e-3\nnum_train_epochs: 8\nseeds: [1]\n")
    model = load_hf(made_task / "model")  # the masked-LM model a pretraining run holds
    scores = downstream_score(model, transformers_tokenizer(made_task), task, make_mesh(None))
    assert set(scores) == {"downstream_accuracy", "downstream_accuracy_std"} and scores["downstream_accuracy"] > 0.8
    task.write_text("train_file: a.jsonl\nvalidation_file: b.jsonl\nlearning_rat: 1e-3\n")
    with pytest.raises(InputError, match="unknown option.s. learning_rat"):
        downstream_score(model, transformers_tokenizer(made_task), task, make_mesh(None))


def test_a_downstream_score_on_several_processes_is_refused_before_any_work(monkeypatch, tmp_path):
    """Fine-tuning reads its task whole on one host: a pretraining run of several processes refuses
    --downstream_eval when the processes have joined, before its output directory or data are touched."""
    from flax_bert.errors import InputError
    from flax_bert.run import build
    from flax_bert.run.config import RunConfig

    monkeypatch.setattr(build.distributed, "initialize", lambda run: None)
    monkeypatch.setattr(build.jax, "process_count", lambda: 2)
    run = RunConfig(output_dir=str(tmp_path / "run"), do_train=True, downstream_eval="task.yaml")
    with pytest.raises(InputError, match="--downstream_eval runs on one host, this run has 2 processes: drop it"):
        build.start_processes(run)
    assert not (tmp_path / "run").exists()
    build.start_processes(RunConfig(output_dir=str(tmp_path / "run"), do_train=True))  # without it: goes on


def transformers_tokenizer(made_task):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(made_task / "model")


def test_a_folder_holding_something_else_is_refused_untouched(made_task, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert finetune(made_task, tmp_path / "out") == 1
    assert "is not empty and holds no fine-tuning results" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_pretraining_logs_a_downstream_score_at_its_steps(made_task, tmp_path):
    """--downstream_eval TASK.yaml --downstream_eval_steps N: the train command fine-tunes a copy every N steps and at
    the last one, and metrics.jsonl holds the score beside the MLM loss; a misspelt task file stops before training."""
    import json

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{r['sentence']} {r['second']}" for r in _made_rows()[:200]) + "\n")
    task = tmp_path / "task.yaml"
    task.write_text(f"train_file: {made_task / 'train.jsonl'}\nvalidation_file: {made_task / 'valid.csv'}\n"
                    "text_column: sentence\ntext_pair_column: second\nper_device_train_batch_size: 2\n"
                    "max_seq_length: 32\nlearning_rate: 4.0e-3\nnum_train_epochs: 1\nseeds: [1]\n")
    common = ["train", "--model_name_or_path", str(made_task / "model"), "--train_file", str(corpus),
              "--max_seq_length", "32", "--per_device_train_batch_size", "1", "--max_steps", "4",
              "--logging_steps", "2", "--save_steps", "0", "--progress_bar", "false",
              "--downstream_eval", str(task)]
    assert cli.main(common + ["--output_dir", str(tmp_path / "run"), "--downstream_eval_steps", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r["downstream_accuracy"] for r in records if "downstream_accuracy" in r}
    assert sorted(scored) == [2, 4] and all(0.0 <= value <= 1.0 for value in scored.values())

    task.write_text("train_file: a.jsonl\nlearning_rat: 1e-3\n")
    assert cli.main(common + ["--output_dir", str(tmp_path / "misspelt")]) == 1
    assert not (tmp_path / "misspelt" / "run_config.json").exists()
