"""A training mixture of several sources (train_sources): checked options, sampling probabilities, batches
that are the same for any number of processes, exact resumes (also after a change of weights), long-run
proportions, per-source evaluation row ids, and one short `flax-bert train` run with two sources."""
import dataclasses
import json

import numpy as np
import pytest

from flax_bert.data.mixture import (MixtureRows, apportion, build_mixture, mixture_probabilities, parse_sources)
from flax_bert.data.sources import DataArgs, DataError

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()
SYMBOLS = "def return class import for while if else print self lambda yield None True False".split()


def write_lines(path, words, count, seed):
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(" ".join(rng.choice(words, size=rng.integers(5, 30))) for _ in range(count)) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return {"wiki": write_lines(root / "wiki.txt", WORDS, 400, 0), "code": write_lines(root / "code.txt", SYMBOLS, 200, 1),
            "root": root}


@pytest.fixture(scope="module")
def tokenizer(files):
    from flax_bert.data.tokenizer_training import train_tokenizer

    texts = [line for name in ("wiki", "code") for line in files[name].read_text().splitlines()]
    return train_tokenizer(texts, kind="bpe", vocab_size=300, output_dir=files["root"] / "tokenizer")


def specs_for(files, weights=(3, 1)):
    return parse_sources([{"name": "wiki", "train_file": str(files["wiki"]), "weight": weights[0]},
                          {"name": "code", "train_file": str(files["code"]), "weight": weights[1]}])


def build(files, tokenizer, process_index=0, process_count=1, shards=4):
    args = DataArgs(cache_dir=str(files["root"] / "cache"), max_seq_length=16, data_shards=shards,
                    validation_split_percentage=10)
    return build_mixture(specs_for(files), args, tokenizer, seed=0, process_index=process_index,
                         process_count=process_count)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def same(batches, others):
    assert len(batches) == len(others)
    for a, b in zip(batches, others):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ----------------------------------------------------------------------------- options
def test_probabilities_follow_the_temperature():
    assert mixture_probabilities({"a": 2, "b": 1}, 1.0) == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert mixture_probabilities({"a": 2, "b": 1}, 0.5) == pytest.approx({"a": 0.8, "b": 0.2})
    assert mixture_probabilities({"a": 1000, "b": 1}, 1e6)["a"] == pytest.approx(0.5, abs=1e-4)  # towards uniform
    assert mixture_probabilities({"a": 1, "b": 0}, 2.0) == {"a": 1.0, "b": 0.0}
    with pytest.raises(DataError, match="positive"):
        mixture_probabilities({"a": 1}, 0)


@pytest.mark.parametrize("entries, message", [
    ([{"name": "wiki", "train_fil": "a.txt"}], r"entry 'wiki': unknown key 'train_fil'; a source takes name, weight"),
    ([{"name": "wiki"}], r"entry 'wiki' needs exactly one text source: give it train_file: PATH or dataset_name"),
    ([{"name": "wiki", "train_file": "a.txt", "weight": -1}], r"entry 'wiki': weight -1 must be a number >= 0"),
    ([{"name": "a", "train_file": "a.txt"}, {"name": "a", "train_file": "b.txt"}], r"entry 'a' appears twice"),
    ([{"name": "my-web", "train_file": "a.txt"}], r"name 'my-web' is not a simple identifier.*e\.g\. my_web"),
    ([{"train_file": "a.txt"}], r"entry 1 has no name: add name:"),
    ([{"name": "a", "train_file": "a.txt", "weight": 1}, {"name": "b", "train_file": "b.txt"}],
     "some sources have a weight and others not"),
    ([], "must be a list of sources"),
])
def test_every_bad_entry_is_refused_in_one_line(entries, message):
    with pytest.raises(DataError, match=message) as refused:
        parse_sources(entries)
    assert "\n" not in str(refused.value)


def test_the_option_takes_yaml_or_an_inline_flag_and_refuses_train_file_beside_it(tmp_path):
    from flax_bert.run.config import RunConfigError, parse_run_config

    config = tmp_path / "mix.yaml"
    config.write_text("train_sources:\n  - {name: wiki, train_file: wiki.txt, weight: 2}\n"
                      "  - {name: code, train_file: code.jsonl, text_column: content, weight: 1}\nmixture_temperature: 2\n"
                      "output_dir: out\n")
    run = parse_run_config([str(config)])
    assert [s["name"] for s in run.train_sources] == ["wiki", "code"] and run.mixture_temperature == 2
    flag = parse_run_config(["--output_dir", "o", "--train_sources", "[{name: a, train_file: a.txt}]"])
    assert flag.train_sources == [{"name": "a", "train_file": "a.txt"}]
    with pytest.raises(SystemExit) as stop:
        parse_run_config([str(config), "--train_file", "x.txt"])
    assert stop.value.code == 2
    from flax_bert.run.config import RunConfig, check_run_config

    with pytest.raises(RunConfigError, match="train_sources and --train_file both given"):
        check_run_config(RunConfig(output_dir="o", do_train=True, train_file="x.txt", train_sources=[
            {"name": "a", "train_file": "a.txt"}]))


def test_weights_may_change_on_resume_but_not_the_sources(tmp_path):
    from flax_bert.run.config import parse_run_config
    from flax_bert.run.options import StoredOptionError, reconcile_with_stored

    out = tmp_path / "run"
    out.mkdir()
    stored = parse_run_config(["--output_dir", str(out), "--train_sources", "[{name: a, train_file: a.txt, weight: 1}]"])
    (out / "run_config.json").write_text(json.dumps(stored.to_dict()))
    reweighted = parse_run_config(["--output_dir", str(out), "--train_sources", "[{name: a, train_file: a.txt, weight: 5}]"])
    assert reconcile_with_stored(reweighted).train_sources[0]["weight"] == 5
    moved = parse_run_config(["--output_dir", str(out), "--train_sources", "[{name: a, train_file: b.txt, weight: 1}]"])
    with pytest.raises(StoredOptionError, match="--train_sources .* it fixes the training data"):
        reconcile_with_stored(moved)


# ----------------------------------------------------------------------------- batches
def test_batches_are_the_same_for_one_and_two_processes(files, tokenizer):
    weights = {"wiki": 3.0, "code": 1.0}
    whole = build(files, tokenizer)[0].iterator(8, seed=5, weights=weights)
    halves = [build(files, tokenizer, p, 2)[0].iterator(8, seed=5, weights=weights) for p in range(2)]
    for _ in range(12):
        expected = next(whole)
        parts = [next(half) for half in halves]
        same([expected], [{name: np.concatenate([p[name] for p in parts]) for name in expected}])
    # the state is the same on every process (but tokens drawn: this process's times the process count)
    states = [{k: v for k, v in it.state_dict().items() if k != "tokens"} for it in (whole, *halves)]
    assert states[0] == states[1] == states[2]


def test_a_resume_from_a_saved_state_continues_exactly(files, tokenizer):
    train = build(files, tokenizer)[0]
    weights = {"wiki": 3.0, "code": 1.0}
    running = train.iterator(8, seed=1, weights=weights)
    take(running, 7)
    state = json.loads(json.dumps(running.state_dict()))  # as a checkpoint stores it
    expected = take(running, 9)
    resumed = train.iterator(8, seed=1, weights=weights)
    resumed.load_state_dict(state)
    same(take(resumed, 9), expected)


def test_long_run_proportions_match_the_probabilities_and_every_shard_is_read_alike(files, tokenizer):
    train = build(files, tokenizer)[0]
    iterator = train.iterator(8, weights={"wiki": 2.0, "code": 1.0}, temperature=0.5)  # p = 0.8, 0.2
    for batches in range(1, 301):
        counts = iterator._allocate()  # the decision alone, no rows read
        assert counts.sum() == 8 and (counts.sum(axis=0) == iterator.readers[0].layout(8)[1]).all()
        iterator.rows_drawn += counts.sum(axis=1)
        for k, reader in enumerate(iterator.readers):
            reader.positions += counts[k]
        assert np.abs(iterator.rows_drawn - 8 * batches * np.array([0.8, 0.2])).max() < 1 + 1e-9
    for reader, p in zip(iterator.readers, (0.8, 0.2)):
        assert np.abs(reader.positions - 300 * 2 * p).max() <= 2  # 2 slots per shard and batch


def test_weights_change_between_batches_and_a_resume_after_it_is_exact(files, tokenizer):
    train = build(files, tokenizer)[0]
    weights = {"wiki": 3.0, "code": 1.0}
    running = train.iterator(8, seed=2, weights=weights)
    take(running, 4)
    assert running.set_weights({"code": 3.0}) == pytest.approx({"wiki": 0.5, "code": 0.5})
    take(running, 3)
    state = json.loads(json.dumps(running.state_dict()))
    assert state["weights"] == {"wiki": 3.0, "code": 3.0}
    expected = take(running, 6)
    resumed = train.iterator(8, seed=2, weights=weights)  # the run's configured weights, as a restart builds it
    resumed.load_state_dict(state)
    same(take(resumed, 6), expected)
    before = running.rows_drawn.copy()
    take(running, 10)
    assert (running.rows_drawn - before).tolist() == [40, 40]
    with pytest.raises(DataError, match="no source named 'web'"):
        running.set_weights({"web": 1.0})
    with pytest.raises(DataError, match="all 0"):
        running.set_weights({"wiki": 0, "code": 0})
    assert running.weights == {"wiki": 3.0, "code": 3.0}


def test_new_configured_weights_take_over_on_resume_and_other_sources_are_refused(files, tokenizer):
    train = build(files, tokenizer)[0]
    old = train.iterator(8, weights={"wiki": 3.0, "code": 1.0})
    take(old, 2)
    state = old.state_dict()
    new = train.iterator(8, weights={"wiki": 1.0, "code": 1.0})
    new.load_state_dict(state)
    assert new.weights == {"wiki": 1.0, "code": 1.0} and new.batches == 2
    alone = MixtureRows({"wiki": train.sources["wiki"]}).iterator(8, weights={"wiki": 1.0})
    with pytest.raises(DataError, match="mixes the sources wiki, code, this run wiki"):
        alone.load_state_dict(state)


def test_apportion_keeps_the_total_and_the_caps():
    assert apportion(np.array([2.6, 1.4]), 4).tolist() == [3, 1]
    assert apportion(np.array([-0.9, -0.9, 3.8]), 2).tolist() == [0, 0, 2]
    assert apportion(np.array([3.0, 1.0]), 4, np.array([1, 5])).tolist() == [1, 3]


def test_evaluation_rows_of_the_sources_have_ids_that_do_not_collide(files, tokenizer):
    evaluation = build(files, tokenizer)[1]
    ids = {}
    for name, rows in evaluation.parts():
        ids[name] = np.concatenate([b["row_ids"] for b in rows.eval_batches(8)])
        ids[name] = ids[name][ids[name] >= 0]
    assert len(ids["wiki"]) and len(ids["code"])
    assert not set(ids["wiki"]) & set(ids["code"])
    assert len(set(ids["wiki"])) == len(ids["wiki"])


# ----------------------------------------------------------------------------- a run
def test_a_run_of_two_sources_reports_them_and_its_resume_continues_the_batches(files, tokenizer, tmp_path, monkeypatch,
                                                                               caplog):
    import logging

    from flax_bert import cli

    caplog.set_level(logging.INFO, logger="flax_bert")

    tokenizer.save_pretrained(tmp_path / "tok")
    sources = f"[{{name: wiki, train_file: {files['wiki']}, weight: 3}}, {{name: code, train_file: {files['code']}, weight: 1}}]"
    common = ["train", "tiny", "--tokenizer_name", str(tmp_path / "tok"), "--max_seq_length", "32",
              "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "2", "--data_shards", "2",
              "--logging_steps", "2", "--eval_steps", "4", "--save_steps", "2", "--warmup_steps", "0",
              "--validation_split_percentage", "10", "--cache_dir", str(tmp_path / "cache"), "--progress_bar", "false",
              "--train_sources", sources]
    monkeypatch.setenv("FLAX_BERT_LOG_ROWS", str(tmp_path / "full"))
    assert cli.main(common + ["--output_dir", str(tmp_path / "full"), "--max_steps", "4"]) == 0
    assert "mixture of 2 sources, weighted as given, temperature 1: wiki p=0.7500 (weight 3), code p=0.2500" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "tokens_wiki" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert 0 < logged[0]["tokens_code"] < logged[0]["tokens_wiki"] < logged[1]["tokens_wiki"]  # 6 of 8 rows wiki
    evaluated = next(r for r in rows if "eval_loss" in r)
    assert {"eval_loss_wiki", "eval_loss_code", "eval_accuracy_wiki", "eval_accuracy_code"} <= set(evaluated)
    # a second run resumes the first's step-2 checkpoint and must read the same rows for batches 2 and 3
    monkeypatch.setenv("FLAX_BERT_LOG_ROWS", str(tmp_path / "resumed"))
    assert cli.main(common + ["--output_dir", str(tmp_path / "resumed"), "--max_steps", "4", "--resume_from_checkpoint",
                              str(tmp_path / "full" / "checkpoints" / "2")]) == 0

    def batches(prefix):
        read = {}
        for line in (tmp_path / f"{prefix}.process0.jsonl").read_text().splitlines():
            record = json.loads(line)
            read[record["batch"]] = record["rows"]  # the last read of a batch (prefetched ones are read again)
        return read

    full, resumed = batches("full"), batches("resumed")
    assert min(resumed) == 2 and all(resumed[b] == full[b] for b in (2, 3))
    assert {source for source, _, _ in full[2]} == {"wiki", "code"}


def test_dataclass_fields_of_sources_are_data_options():
    names = {f.name for f in dataclasses.fields(DataArgs)}
    from flax_bert.data.mixture import SOURCE_OPTIONS

    assert set(SOURCE_OPTIONS) <= names


def test_evaluating_a_mixture_run_on_another_validation_file_does_not_take_its_sources(tmp_path):
    from flax_bert.run.config import parse_run_config
    from flax_bert.run.options import reconcile_with_stored

    out = tmp_path / "run"
    out.mkdir()
    stored = parse_run_config(["--output_dir", str(out), "--train_sources", "[{name: a, train_file: a.txt}]"])
    (out / "run_config.json").write_text(json.dumps(stored.to_dict()))
    evaluation = parse_run_config(["--output_dir", str(out), "--do_eval", "--validation_file", "v.txt"],
                                  defaults={"do_train": False})
    run = reconcile_with_stored(evaluation)
    assert run.train_sources is None and run.validation_file == "v.txt"
    assert reconcile_with_stored(parse_run_config(["--output_dir", str(out), "--max_steps", "3"])).train_sources


def test_prepare_tokenizes_every_source(files, tokenizer, tmp_path, capsys):
    from flax_bert import cli

    tokenizer.save_pretrained(tmp_path / "tok")
    sources = f"[{{name: wiki, train_file: {files['wiki']}}}, {{name: code, train_file: {files['code']}}}]"
    assert cli.main(["prepare", "tiny", "--tokenizer_name", str(tmp_path / "tok"), "--max_seq_length", "32",
                     "--per_device_train_batch_size", "1", "--cache_dir", str(tmp_path / "cache"),
                     "--output_dir", str(tmp_path / "run"), "--train_sources", sources]) == 0
    printed = capsys.readouterr().out
    assert "prepared wiki train" in printed and "prepared code train" in printed


def test_the_run_weighs_sources_by_size_with_its_temperature(files, tokenizer, caplog):
    import logging

    from flax_bert.run.build import mixture_iterator
    from flax_bert.run.config import parse_run_config

    caplog.set_level(logging.INFO, logger="flax_bert")
    run = parse_run_config(["--output_dir", "o", "--mixture_temperature", "2", "--train_sources",
                            f"[{{name: wiki, train_file: {files['wiki']}}}, {{name: code, train_file: {files['code']}}}]"])
    train = build(files, tokenizer)[0]
    iterator = mixture_iterator(run, train, 8, run.seed)
    sizes = train.local_tokens()
    assert iterator.temperature == 2.0 and iterator.weights == {name: float(size) for name, size in sizes.items()}
    expected = np.sqrt([sizes["wiki"], sizes["code"]]) / np.sqrt([sizes["wiki"], sizes["code"]]).sum()
    np.testing.assert_allclose(iterator.probabilities, expected)
    assert f"weighted by size in tokens, temperature 2: wiki p={expected[0]:.4f}" in caplog.text


def test_a_change_scheduled_at_a_batch_is_the_same_behind_a_prefetcher_and_survives_a_resume(files, tokenizer):
    from flax_bert.data.iterators import Prefetcher

    train = build(files, tokenizer)[0]
    weights = {"wiki": 3.0, "code": 1.0}
    plain = train.iterator(8, seed=4, weights=weights)
    plain.set_weights({"wiki": 0.0}, at_batch=8)
    expected = take(plain, 12)
    assert plain.weights == {"wiki": 0.0, "code": 1.0} and plain.rows_drawn.tolist() == [48, 48]  # 8 batches 6:2, then 4 all code
    ahead = train.iterator(8, seed=4, weights=weights)
    with Prefetcher(ahead, depth=2) as batches:
        first = take(batches, 3)
        state = json.loads(json.dumps(batches.state_dict()))
        # the thread has made at most 3 + 2 + 1 batches: batch 8 is still to come
        ahead.set_weights({"wiki": 0.0}, at_batch=8)
        same(first + take(batches, 9), expected)
    resumed = train.iterator(8, seed=4, weights=weights)
    resumed.load_state_dict(state)  # taken before the change was scheduled: scheduled again, as a restart does
    resumed.set_weights({"wiki": 0.0}, at_batch=8)
    same(take(resumed, 9), expected[3:])
    saved = train.iterator(8, seed=4, weights=weights)
    saved.set_weights({"wiki": 0.0}, at_batch=8)
    take(saved, 2)
    again = train.iterator(8, seed=4, weights=weights)
    again.load_state_dict(json.loads(json.dumps(saved.state_dict())))  # the pending change is in the state
    same(take(again, 10), expected[2:])
    with pytest.raises(DataError, match="batch 3 of the mixture has been made already"):
        again.set_weights({"wiki": 1.0}, at_batch=3)


def test_a_source_too_small_for_the_shards_is_named(files, tokenizer, tmp_path):
    tiny = write_lines(tmp_path / "tiny.txt", WORDS, 2, 3)
    args = DataArgs(cache_dir=str(files["root"] / "cache"), max_seq_length=16, data_shards=4,
                    validation_split_percentage=0)
    specs = parse_sources([{"name": "wiki", "train_file": str(files["wiki"])}, {"name": "tiny", "train_file": str(tiny)}])
    with pytest.raises(DataError, match=r"train_sources entry 'tiny': the train corpus .*shard 2 of 4\) has no text: "
                                        "add text or lower --data_shards"):
        build_mixture(specs, args, tokenizer, process_index=0, process_count=1)


def test_a_phase_sets_the_mixture_weights_from_its_first_step(files, tokenizer, tmp_path):
    """phases: the first reads only wiki, the second only code: the tokens drawn per source say so."""
    from flax_bert import cli

    tokenizer.save_pretrained(tmp_path / "tok")
    sources = f"[{{name: wiki, train_file: {files['wiki']}, weight: 1}}, {{name: code, train_file: {files['code']}, weight: 1}}]"
    phases = "[{until_step: 2, mixture: {wiki: 1, code: 0}}, {until_step: 4, mixture: {wiki: 0, code: 1}}]"
    assert cli.main(["train", "tiny", "--tokenizer_name", str(tmp_path / "tok"), "--max_seq_length", "32",
                     "--per_device_train_batch_size", "1", "--data_shards", "2", "--logging_steps", "2",
                     "--save_steps", "0", "--warmup_steps", "0", "--max_steps", "-1", "--do_eval", "false",
                     "--validation_split_percentage", "10", "--cache_dir", str(tmp_path / "cache"),
                     "--progress_bar", "false", "--train_sources", sources, "--phases", phases,
                     "--output_dir", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows if "tokens_wiki" in r}
    assert logged[2]["tokens_code"] == 0 and logged[2]["tokens_wiki"] > 0
    assert logged[4]["tokens_wiki"] == logged[2]["tokens_wiki"] and logged[4]["tokens_code"] > 0
    assert (logged[2]["phase"], logged[4]["phase"]) == (0, 1)
