"""Nothing lost, nothing silently restarted: a restore tells damaged, incompatible and other failures apart;
a run directory whose checkpoints were all set aside never restarts at step 0 by itself; --reset_optimizer;
--overwrite_output_dir removes only what flax-bert wrote and never the run's inputs; internal errors keep
their traceback; LAMB's trust ratio is taken per layer of the stacked encoder weights."""
import pathlib

import jax
import numpy as np
import optax
import pytest

from flax_bert.run.checkpoint import (CheckpointMismatchError, Checkpointer, DamagedCheckpointError, OutputDirError,
                                  check_output_dir, resolve_start)
from flax_bert.run.checkpoint import claim_written
from flax_bert.training.optim import make_optimizer
from flax_bert.training.step import StepConfig, Trainer
from tests.test_checkpoint import MASKING, RUN_CONFIG, _truncate_biggest_array_file, make_trainer, save_run, target

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def single():
    return make_trainer()  # AdamW with the default clipping (max_grad_norm 1.0)


@pytest.fixture(scope="module")
def unclipped(single):
    tx, schedule = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10, max_grad_norm=None)
    return Trainer(single.model_config, StepConfig(masking=MASKING), tx, single.mesh, schedule)


# ----------------------------------------------------------------------------- restore: three cases
def test_another_optimizer_layout_is_incompatible_not_damage(tmp_path, single, unclipped):
    save_run(single, tmp_path, [1, 2])
    checkpointer = Checkpointer(tmp_path, save_steps=1)
    with pytest.raises(CheckpointMismatchError) as raised:
        checkpointer.restore(target(unclipped))
    message = str(raised.value)
    assert "\n" not in message and "opt_state" in message and "--reset_optimizer" in message, message
    assert raised.value.optimizer_only  # the parameters fit: --reset_optimizer can keep them
    assert checkpointer.all_steps() == [1, 2] and not (tmp_path / "checkpoints_damaged").exists()
    # a different model is no optimizer question: --reset_optimizer would not help
    with pytest.raises(CheckpointMismatchError) as raised:
        checkpointer.restore(target(make_trainer(hidden=16)))
    assert not raised.value.optimizer_only and "--reset_optimizer" not in str(raised.value)
    checkpointer.close()


def test_restore_parameters_into_a_fresh_optimizer_state(tmp_path, single, unclipped):
    saved = save_run(single, tmp_path, [3])[3]
    restored = Checkpointer(tmp_path).restore(target(unclipped), reset_optimizer=unclipped.fresh_opt_state)
    assert restored.step == 3 and restored.optimizer_reset
    for ours, theirs in zip(jax.tree.leaves(restored.state.params), jax.tree.leaves(saved.params)):
        assert np.asarray(ours).tobytes() == np.asarray(theirs).tobytes()
    assert int(restored.state.step) == 3
    fresh = unclipped.init_state(params=restored.state.params).opt_state
    adam = [s for s in jax.tree.leaves(restored.state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    assert int(adam.count) == 0 and all(not np.asarray(m).any() for m in jax.tree.leaves(adam.mu))  # fresh moments
    schedules = [s for s in jax.tree.leaves(restored.state.opt_state,
                                            is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
                 if isinstance(s, optax.ScaleByScheduleState)]
    assert schedules and all(int(s.count) == 3 for s in schedules)  # the learning-rate schedule goes on at step 3
    assert jax.tree.structure(restored.state.opt_state) == jax.tree.structure(fresh)


def test_an_error_that_is_not_damage_is_raised_and_the_checkpoint_kept(tmp_path, single, monkeypatch):
    save_run(single, tmp_path, [1, 2])
    checkpointer = Checkpointer(tmp_path, save_steps=1)
    out_of_memory = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.")
    real_restore = checkpointer._manager.restore

    def failing_restore(step, *args, **kwargs):
        if step == 2:
            raise out_of_memory
        return real_restore(step, *args, **kwargs)

    monkeypatch.setattr(checkpointer._manager, "restore", failing_restore)
    with pytest.raises(RuntimeError) as raised:
        checkpointer.restore(target(single))
    assert raised.value is out_of_memory
    assert checkpointer.all_steps() == [1, 2] and not (tmp_path / "checkpoints_damaged").exists()
    checkpointer.close()


@pytest.mark.parametrize("damage", ["truncate an array file", "garble the tree metadata"])
def test_damage_is_still_moved_aside(tmp_path, single, damage):
    save_run(single, tmp_path, [1, 2])
    latest = tmp_path / "checkpoints" / "2"
    if damage == "truncate an array file":
        _truncate_biggest_array_file(latest)
    else:
        (latest / "state" / "_METADATA").write_text("{garbage")
    checkpointer = Checkpointer(tmp_path, save_steps=1)
    assert checkpointer.restore(target(single)).step == 1
    assert (tmp_path / "checkpoints_damaged" / "2").is_dir()
    checkpointer.close()


def test_a_run_whose_checkpoints_were_all_set_aside_never_restarts_by_itself(tmp_path, single):
    save_run(single, tmp_path, [1])
    _truncate_biggest_array_file(tmp_path / "checkpoints" / "1")
    checkpointer = Checkpointer(tmp_path, save_steps=1)
    with pytest.raises(DamagedCheckpointError):
        checkpointer.restore(target(single))
    checkpointer.close()
    assert (tmp_path / "checkpoints_damaged" / "1").is_dir()
    for model in (None, "roberta-base"):  # neither a fresh start nor the Hugging Face weights at step 0
        with pytest.raises(DamagedCheckpointError, match=r"checkpoints_damaged.*--overwrite_output_dir"):
            resolve_start(tmp_path, None, model)
    assert resolve_start(tmp_path, overwrite_output_dir=True).kind == "fresh"  # said so explicitly


# ----------------------------------------------------------------------------- --overwrite_output_dir
def test_overwrite_removes_only_what_flax_bert_wrote(tmp_path, single):
    run = tmp_path / "run"
    check_output_dir(run, False, RUN_CONFIG)
    save_run(single, run, [1])
    claim_written(run, "metrics.jsonl")  # as a run records each name it writes
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine\n")
    deleted = check_output_dir(run, True, {**RUN_CONFIG, "seed": 1})
    assert sorted(deleted) == ["checkpoints", "metrics.jsonl", "run_config.json"]
    assert (run / "notes.txt").read_text() == "mine\n"

    # a model folder of someone else's, under names flax-bert also writes: never deleted, nor written over
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (model / name).write_text(name)
    with pytest.raises(OutputDirError, match=r"config.json.*flax-bert did not write"):
        check_output_dir(model, True, RUN_CONFIG)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_overwrite_deletes_only_names_a_run_wrote_not_those_it_might_write(tmp_path):
    """The record lists a name once it is written: a user's own vocab.txt (a name an export may write) that
    appears in a run directory is never deleted by --overwrite_output_dir."""
    import json

    run = tmp_path / "run"
    check_output_dir(run, False, RUN_CONFIG)
    written = json.loads((run / ".flax-bert-written.json").read_text())["written"]
    assert sorted(written) == [".flax-bert-written.json", "run_config.json"]  # nothing claimed ahead of writing
    (run / "vocab.txt").write_text("mine\n")
    try:
        check_output_dir(run, True, {**RUN_CONFIG, "seed": 1})
    except OutputDirError as refusal:  # it would write over it at the export: refused, nothing deleted
        assert "vocab.txt that flax-bert did not write" in str(refusal)
    assert (run / "vocab.txt").read_text() == "mine\n"


@pytest.mark.parametrize("option", ["model_name_or_path", "config_name", "tokenizer_name", "train_file",
                                    "resume_from_checkpoint"])
def test_overwrite_keeps_the_runs_inputs_inside_the_output_dir(tmp_path, option, single):
    """The old README saved the config and tokenizer into the output dir, then ran with --overwrite_output_dir:
    what the run reads survives the overwrite (and the run goes on); what an earlier run wrote is deleted."""
    out = tmp_path / "m"
    check_output_dir(out, False, RUN_CONFIG)  # an earlier run's directory: its record, options, metrics
    claim_written(out, "metrics.jsonl")
    (out / "metrics.jsonl").write_text("{}\n")
    save_run(single, out, [1])
    model_files = {"config.json", "vocab.json", "merges.txt", "tokenizer_config.json"}
    if option in ("model_name_or_path", "config_name", "tokenizer_name"):
        for name in model_files:
            (out / name).write_text(name)  # saved there by the user (the old README's flow)
    (out / "train.txt").write_text("text\n")
    value = {"train_file": str(out / "train.txt"), "resume_from_checkpoint": str(out / "checkpoints" / "1")
             }.get(option, str(out))
    deleted = check_output_dir(out, True, {**RUN_CONFIG, option: value})
    assert "metrics.jsonl" in deleted and "run_config.json" in deleted
    assert (out / "train.txt").read_text() == "text\n"  # not flax-bert's: never deleted
    if option == "resume_from_checkpoint":
        assert (out / "checkpoints" / "1").is_dir() and "checkpoints" not in deleted
    else:
        assert "checkpoints" in deleted
    if option in ("model_name_or_path", "config_name", "tokenizer_name"):
        assert all((out / name).read_text() == name for name in model_files)


# ----------------------------------------------------------------------------- one-line errors
def test_only_our_errors_are_one_line_others_keep_their_traceback(capsys):
    from flax_bert.cli import run_command
    from flax_bert.data.sources import DataError

    def bad_data(argv):
        raise DataError("--train_file x.txt holds no text: pass a file with text")

    assert run_command(bad_data, []) == 1
    assert capsys.readouterr().err.strip() == "error: --train_file x.txt holds no text: pass a file with text"

    def internal(argv):
        raise ValueError("User-provided restore item and on-disk value metadata tree structures do not match")

    assert run_command(internal, [], resumes=True) == 1  # train's: the same command goes on
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in internal" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ValueError: User-provided restore item") and "resumes the run" in last, last


def test_project_input_errors_are_project_classes():
    """A user's mistake raised as a bare ValueError would now print a traceback."""
    from flax_bert.errors import InputError
    from flax_bert.run.config import RunConfig

    with pytest.raises(InputError):
        RunConfig(max_steps=0, num_train_epochs=0).validate()
    with pytest.raises(InputError):
        make_optimizer(learning_rate=-1.0, warmup_steps=0, total_steps=10)


# ----------------------------------------------------------------------------- LAMB on stacked layers
def test_lamb_trust_ratio_is_per_layer_of_a_stacked_weight():
    rng = np.random.default_rng(0)
    layers = [{"kernel": rng.standard_normal((4, 3)).astype(np.float32) * (i + 1),
               "bias": rng.standard_normal(3).astype(np.float32)} for i in range(3)]
    stacked = {"encoder": {"layer": jax.tree.map(lambda *xs: np.stack(xs), *layers)},
               "head": {"kernel": rng.standard_normal((3, 2)).astype(np.float32)}}
    unstacked = {"encoder": {f"layer_{i}": layer for i, layer in enumerate(layers)}, "head": stacked["head"]}
    grads = [jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 10, stacked) for _ in range(3)]

    def updates(params, to_tree):
        tx, _ = make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10, optimizer="lamb",
                               schedule="constant")
        state, out = tx.init(params), []
        for grad in grads:
            update, state = tx.update(to_tree(grad), state, params)
            params = optax.apply_updates(params, update)
            out.append(update)
        return out

    def split(tree):
        layer = tree["encoder"]["layer"]
        return {"encoder": {f"layer_{i}": jax.tree.map(lambda x: x[i], layer) for i in range(3)}, "head": tree["head"]}

    for ours, reference in zip(updates(stacked, lambda g: g), updates(unstacked, split)):
        np.testing.assert_allclose(split(ours)["encoder"]["layer_1"]["kernel"],
                                   reference["encoder"]["layer_1"]["kernel"], rtol=1e-5, atol=1e-7)
        for a, b in zip(jax.tree.leaves(split(ours)), jax.tree.leaves(reference)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
