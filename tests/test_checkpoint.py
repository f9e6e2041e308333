"""Checkpoints: exact round trip, async + donation, retention, damage fallback, meshes, resume order,
the output-directory guard, and signals (one process, and two processes that must agree)."""
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from flax_bert.run.checkpoint import claim_written
from flax_bert.run.checkpoint import (CheckpointMismatchError, Checkpointer, DamagedCheckpointError, OutputDirError,
                                  PreemptionGuard, check_output_dir, resolve_start)
from flax_bert.models.config import ModelConfig
from flax_bert.training.optim import make_optimizer
from flax_bert.training.sharding import make_mesh
from flax_bert.training.step import MaskingConfig, StepConfig, Trainer
from tests.xla_env import one_device_env

SEQ, ROWS, VOCAB = 16, 8, 128
MASKING = MaskingConfig(special_ids=(0, 1, 2, 3, 4), mask_token_id=4, random_vocab_size=VOCAB, max_seq_length=SEQ)
RUN_CONFIG = {"seed": 0, "model_type": "roberta", "hidden_size": 32, "max_steps": 10, "train_file": None}
PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent


def make_trainer(mesh_spec="data=1", hidden=32):
    cfg = ModelConfig.for_family("roberta", vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=40,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    mesh = make_mesh(mesh_spec, jax.devices()[:1] if mesh_spec == "data=1" else None)
    tx, schedule = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    return Trainer(cfg, StepConfig(masking=MASKING), tx, mesh, schedule)


def state_at(trainer, step: int):
    """A train state at `step` with random parameters and optimizer moments, on the trainer's mesh.
    (Random rather than trained: compiling init and train steps would dominate this file's runtime.)"""
    rng = np.random.default_rng(step)
    host = jax.tree.map(lambda a: np.full(a.shape, step, a.dtype) if np.issubdtype(a.dtype, np.integer)
                        else rng.standard_normal(a.shape).astype(a.dtype), trainer.abstract_state)
    return jax.device_put(host, trainer.state_shardings)


def target(trainer):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        trainer.abstract_state, trainer.state_shardings)


def to_host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes())  # bit for bit


def save_run(trainer, output_dir, steps, metrics=None, **options) -> dict:
    """Save a state at each step in `steps`; returns {step: host copy of the saved state}."""
    checkpointer = Checkpointer(output_dir, save_steps=1, **options)
    saved = {}
    for step in steps:
        state = state_at(trainer, step)
        saved[step] = to_host(state)
        assert checkpointer.save(step, state, {"epoch": 0, "position": step * ROWS}, RUN_CONFIG,
                                 metrics=(metrics or {}).get(step))
    checkpointer.close()
    return saved


@pytest.fixture(scope="module")
def single():
    return make_trainer()


@pytest.fixture(scope="module")
def fsdp():
    return make_trainer("fsdp=8")


# ----------------------------------------------------------------------------- round trip
def test_async_round_trip_is_bit_identical_even_when_the_next_step_donates_the_state(tmp_path, fsdp):
    checkpointer = Checkpointer(tmp_path, save_steps=2)
    state = state_at(fsdp, 2)
    expected = to_host(state)
    data_state = {"epoch": 1, "position": np.int64(48)}
    assert checkpointer.save(2, state, data_state, RUN_CONFIG, metrics={"eval_loss": np.float32(2.5)})
    # like the next train step: donate the state's buffers while the bundle may still be written (on GPU/TPU
    # Orbax has copied them to host memory; on CPU it holds views, and JAX then copies instead of donating)
    next_step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0,
                        out_shardings=fsdp.state_shardings)
    next_step(state)
    checkpointer.wait()
    assert checkpointer.latest_step() == 2

    restored = checkpointer.restore(target(fsdp))
    state_back, data_back, config_back, step = restored
    assert step == 2 and int(state_back.step) == 2
    assert_identical(state_back.params, expected.params)
    assert_identical(state_back.opt_state, expected.opt_state)
    assert data_back == {"epoch": 1, "position": 48} and config_back == RUN_CONFIG
    assert restored.metrics == {"eval_loss": 2.5}
    np.testing.assert_array_equal(jax.random.key_data(restored.rng_key), jax.random.key_data(jax.random.key(0)))
    assert jax.tree.leaves(state_back.params)[0].sharding == jax.tree.leaves(fsdp.state_shardings.params)[0]

    params, config, step = Checkpointer.for_path(tmp_path).restore_params()
    assert step == 2 and config == RUN_CONFIG
    assert_identical(params, expected.params)
    checkpointer.close()


def test_replicated_small_arrays_are_written_whole_by_one_replica(tmp_path, monkeypatch):
    """Data parallel over 8 devices: every parameter is replicated 8 times. Orbax would write each as 8 slices,
    one per replica, each slice a small program compiled at the first save; below 1 MiB a slice, one replica
    writes the whole array. The bundle still restores bit for bit."""
    from flax_bert.run import checkpoint

    data_parallel = make_trainer("data=8")
    state = state_at(data_parallel, 3)
    assert max(leaf.nbytes for leaf in jax.tree.leaves(state)) // 8 < checkpoint.REPLICA_PARALLEL_MIN_SLICE_BYTES
    slices = []
    real_slice = jax.lax.slice_in_dim
    monkeypatch.setattr(jax.lax, "slice_in_dim", lambda *a, **k: slices.append(a[0].shape) or real_slice(*a, **k))
    checkpointer = Checkpointer(tmp_path, save_steps=1)
    assert checkpointer.save(3, state, {"epoch": 0, "position": 3}, RUN_CONFIG)
    checkpointer.wait()
    assert slices == []  # with Orbax's default every replicated array is sliced 8 ways
    assert_identical(checkpointer.restore(target(data_parallel)).state.params, to_host(state.params))
    checkpointer.close()


def test_saves_on_save_steps_and_save_minutes_only(tmp_path, single, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("flax_bert.run.checkpoint.time.monotonic", lambda: clock[0])
    checkpointer = Checkpointer(tmp_path, save_steps=3, save_minutes=10)
    state = state_at(single, 0)
    assert [s for s in range(1, 7) if checkpointer.should_save(s)] == [3, 6]
    clock[0] += 601
    assert checkpointer.should_save(7)
    with pytest.raises(ValueError, match="train state at step 0"):
        checkpointer.save(7, state, {}, RUN_CONFIG)
    assert checkpointer.save(7, state_at(single, 7), {}, RUN_CONFIG)
    assert not checkpointer.save(7, state_at(single, 7), {}, RUN_CONFIG, force=True)  # a step is saved once
    assert not checkpointer.save(8, state_at(single, 8), {}, RUN_CONFIG)  # 10 minutes count from the last save
    assert checkpointer.save(8, state_at(single, 8), {}, RUN_CONFIG, force=True)
    checkpointer.close()
    assert checkpointer.all_steps() == [7, 8]


def test_keeps_the_last_n_and_optionally_the_best(tmp_path, single):
    save_run(single, tmp_path / "last", [1, 2, 3, 4], save_total_limit=2)
    assert Checkpointer.for_path(tmp_path / "last").all_steps() == [3, 4]
    losses = {1: {"eval_loss": 0.5}, 2: {"eval_loss": 0.9}, 3: {"eval_loss": 1.0}, 4: {"eval_loss": 1.1}}
    save_run(single, tmp_path / "best", [1, 2, 3, 4], metrics=losses, save_total_limit=2, keep_best=True)
    assert Checkpointer.for_path(tmp_path / "best").all_steps() == [1, 3, 4]


# ----------------------------------------------------------------------------- damage
def _truncate_biggest_array_file(step_dir: pathlib.Path):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parent.name]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncate an array file", "delete the data-iterator file"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_restored(tmp_path, single, damage, caplog):
    saved = save_run(single, tmp_path, [1, 2])
    latest = tmp_path / "checkpoints" / "2"
    if damage == "truncate an array file":
        _truncate_biggest_array_file(latest)
    else:
        (latest / "data" / "metadata").unlink()
    assert resolve_start(tmp_path).step == 2  # complete on disk; the damage shows only when read

    checkpointer = Checkpointer(tmp_path, save_steps=1)
    with caplog.at_level(logging.WARNING, logger="flax_bert.run.checkpoint"):
        state, data_state, _, step = checkpointer.restore(target(single), step=2)
    assert step == 1 and data_state == {"epoch": 0, "position": ROWS}
    assert_identical(state, saved[1])
    assert [path for path, _ in checkpointer.damaged] == [str(latest)]
    assert str(latest) in caplog.text and "damaged" in caplog.text
    # kept for inspection, out of the way of the step-2 save the resumed run makes
    assert (tmp_path / "checkpoints_damaged" / "2").is_dir() and checkpointer.latest_step() == 1
    assert checkpointer.save(2, state_at(single, 2), data_state, RUN_CONFIG)
    checkpointer.close()
    assert checkpointer.all_steps() == [1, 2]


def _abandoned_read_traceback():
    """What TensorStore's callbacks print after Orbax closed its event loop: an asyncio RuntimeError passed to
    sys.unraisablehook, hundreds of times for a damaged checkpoint."""
    import asyncio
    import types

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as err:
        sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=err, exc_traceback=err.__traceback__,
                                                 err_msg=None, object=None))


def test_a_damaged_checkpoint_leaves_one_warning_and_its_tracebacks_in_a_debug_log(tmp_path, single, monkeypatch,
                                                                                 capfd, caplog):
    save_run(single, tmp_path, [1, 2])
    _truncate_biggest_array_file(tmp_path / "checkpoints" / "2")
    from flax_bert.run import checkpoint as checkpoint_module

    original = checkpoint_module.restore_bundle

    def restore_bundle_with_abandoned_reads(*args, **kwargs):
        _abandoned_read_traceback()  # during the restore, before the damage is known
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "restore_bundle", restore_bundle_with_abandoned_reads)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="flax_bert.run.checkpoint"):
        assert Checkpointer(tmp_path, save_steps=1).restore(target(single), step=2).step == 1
    _abandoned_read_traceback()  # after it: abandoned reads finish late
    debug_log = tmp_path / "checkpoints_damaged" / "restore-debug.log"
    assert f"(details in {debug_log})" in caplog.text
    assert "Event loop is closed" not in capfd.readouterr().err
    details = debug_log.read_text()
    assert "OUT_OF_RANGE" in details, details[-2000:]
    assert details.count("in _abandoned_read_traceback") == 3, details[-3000:]  # with the real ones, if any
    # an intact restore prints what it held, as Python would have, and stops capturing
    assert Checkpointer(tmp_path, save_steps=1).restore(target(single)).step == 1
    _abandoned_read_traceback()
    assert "Event loop is closed" in capfd.readouterr().err


def test_no_intact_checkpoint_left_is_one_clear_error(tmp_path, single):
    save_run(single, tmp_path, [1])
    _truncate_biggest_array_file(tmp_path / "checkpoints" / "1")
    with pytest.raises(DamagedCheckpointError, match=r"damaged .*checkpoints/1"):
        Checkpointer.for_path(tmp_path).restore(target(single))
    assert (tmp_path / "checkpoints" / "1").is_dir()  # read-only access moves nothing


def test_an_unfinished_save_is_never_used(tmp_path, single):
    save_run(single, tmp_path, [1])
    unfinished = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "_METADATA").write_text("{")
    assert resolve_start(tmp_path).step == 1
    checkpointer = Checkpointer(tmp_path, save_steps=1)
    assert checkpointer.latest_step() == 1
    assert checkpointer.save(2, state_at(single, 2), {}, RUN_CONFIG)  # the resumed run saves step 2 anew
    checkpointer.close()
    assert checkpointer.all_steps() == [1, 2]
    assert not unfinished.exists()  # removed by the next run's checkpointer (in the background, before it saves)


def test_a_different_model_is_an_error_not_damage(tmp_path, single):
    save_run(single, tmp_path, [1])
    with pytest.raises(CheckpointMismatchError, match="different model"):
        Checkpointer(tmp_path).restore(target(make_trainer(hidden=16)))
    assert (tmp_path / "checkpoints" / "1").is_dir()


# ----------------------------------------------------------------------------- meshes
def test_saved_with_fsdp8_restores_on_one_device_and_back(tmp_path, single, fsdp):
    saved = save_run(fsdp, tmp_path / "fsdp", [1])[1]
    restored = Checkpointer.for_path(tmp_path / "fsdp").restore(target(single)).state
    assert all(leaf.sharding.mesh.size == 1 for leaf in jax.tree.leaves(restored.params))
    assert_identical(restored, saved)

    saved = save_run(single, tmp_path / "single", [1])[1]
    restored = Checkpointer.for_path(tmp_path / "single").restore(target(fsdp)).state
    embedding = restored.params["roberta"]["embeddings"]["word_embeddings"]["embedding"]
    wanted = fsdp.state_shardings.params["roberta"]["embeddings"]["word_embeddings"]["embedding"]
    assert embedding.sharding.spec == wanted.spec
    assert len(embedding.addressable_shards) == 8 and embedding.addressable_shards[0].data.size < embedding.size
    assert_identical(restored, saved)


# ----------------------------------------------------------------------------- resume order
def test_resolve_start_order(tmp_path, single):
    run, other = tmp_path / "run", tmp_path / "other"
    assert resolve_start(run).kind == "fresh"
    assert "starting fresh" in resolve_start(run).describe()
    hf = resolve_start(run, None, "roberta-base")
    assert (hf.kind, hf.path) == ("hf", "roberta-base") and "weights only" in hf.describe()

    save_run(single, other, [1, 2])
    for path in (other, other / "checkpoints"):
        start = resolve_start(run, str(path), "roberta-base")
        assert (start.kind, start.step, start.source) == ("checkpoint", 2, "resume_from_checkpoint")
    start = resolve_start(run, str(other / "checkpoints" / "1"), "roberta-base")
    assert (start.path, start.step) == (str(other / "checkpoints" / "1"), 1)
    assert Checkpointer.for_path(start.path).restore(target(single)).step == 1
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_start(run, str(tmp_path / "missing"))

    save_run(single, run, [3])
    start = resolve_start(run, str(other), "roberta-base")  # the output_dir's own checkpoint wins
    assert (start.source, start.step) == ("output_dir", 3)
    assert start.describe() == f"resuming from checkpoint {run / 'checkpoints' / '3'} (step 3)"
    assert resolve_start(run, str(other), overwrite_output_dir=True).source == "resume_from_checkpoint"


# ----------------------------------------------------------------------------- output directory
def listing(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_check_output_dir(tmp_path, single):
    run = tmp_path / "run"
    assert check_output_dir(run, False, RUN_CONFIG) == []
    assert json.loads((run / "run_config.json").read_text()) == RUN_CONFIG
    save_run(single, run, [1])
    claim_written(run, "metrics.jsonl")  # as a run records each name it writes
    (run / "metrics.jsonl").write_text("{}\n")

    check_output_dir(run, False, {**RUN_CONFIG, "max_steps": 20})  # the same run, resumed with more steps
    assert json.loads((run / "run_config.json").read_text())["max_steps"] == 20
    before = listing(run)
    with pytest.raises(OutputDirError, match=r"different run \(seed 0 there, 1 now\).*--overwrite_output_dir"):
        check_output_dir(run, False, {**RUN_CONFIG, "seed": 1})
    assert listing(run) == before
    check_output_dir(run, False, {**RUN_CONFIG, "optimizer": "adamw"})
    with pytest.raises(OutputDirError, match=r"different run \(optimizer 'adamw' there, 'lamb' now\)"):
        check_output_dir(run, False, {**RUN_CONFIG, "optimizer": "lamb"})
    # --reset_optimizer starts a fresh optimizer state: the same run with another optimizer
    check_output_dir(run, False, {**RUN_CONFIG, "optimizer": "lamb", "reset_optimizer": True})
    check_output_dir(run, False, RUN_CONFIG)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"did not write \(notes.txt\)"):
        check_output_dir(foreign, False, RUN_CONFIG)
    assert listing(foreign) == ["notes.txt"]

    (run / "notes.txt").write_text("mine")
    deleted = check_output_dir(run, True, {**RUN_CONFIG, "seed": 1})
    assert deleted == ["checkpoints", "metrics.jsonl", "run_config.json"]
    assert listing(run) == [".flax-bert-written.json", "notes.txt", "run_config.json"]  # the record of what flax-bert wrote


def test_a_run_dir_without_run_config_is_accepted_only_when_resuming_it(tmp_path, single):
    check_output_dir(tmp_path, False, RUN_CONFIG, record=False)  # e.g. `flax-bert import` preparing a run dir
    save_run(single, tmp_path, [1])
    assert not (tmp_path / "run_config.json").exists()
    with pytest.raises(OutputDirError, match="without its run_config.json"):
        check_output_dir(tmp_path, False, RUN_CONFIG)
    check_output_dir(tmp_path, False, RUN_CONFIG, resuming=True)
    assert (tmp_path / "run_config.json").is_file()


# ----------------------------------------------------------------------------- signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_preemption_guard_sets_the_flag_and_restores_handlers(signum):
    previous = signal.getsignal(signum)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signum)
        assert guard.requested and guard.should_stop(2) and guard.stopped and guard.stopped_at == 2
        assert guard.signal_name == signal.Signals(signum).name
    assert signal.getsignal(signum) is previous


def test_a_second_signal_exits_at_once():
    script = textwrap.dedent("""
        import os, signal, time
        from flax_bert.run.checkpoint import PreemptionGuard
        with PreemptionGuard():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        print("not reached")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 128 + signal.SIGTERM and "not reached" not in done.stdout
    assert "SIGTERM again: exiting now" in done.stderr


def test_two_processes_agree_on_stopping_and_on_time_based_saves(tmp_path):
    """Process 0 gets SIGTERM at step 3, and only process 1's clock says a save is due: both processes
    must answer should_stop and should_save identically at every step."""
    script = textwrap.dedent("""
        import os, signal, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
        from flax_bert.run.checkpoint import Checkpointer, PreemptionGuard
        checkpointer = Checkpointer(sys.argv[3], save_steps=0, save_minutes=10)
        if jax.process_index() == 1:
            checkpointer._last_save -= 3600
        print("SAVES", [step for step in range(1, 5) if checkpointer.should_save(step)])
        with PreemptionGuard() as guard:
            for step in range(1, 20):
                if step == 3 and jax.process_index() == 0:
                    os.kill(os.getpid(), signal.SIGTERM)
                if guard.should_stop(step):
                    break
        print("STOPPED", step, guard.stopped_at, guard.requested)
        jax.distributed.shutdown()
    """)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = one_device_env()
    procs = [subprocess.Popen([sys.executable, "-c", script, address, str(i), str(tmp_path)], cwd=PROJECT_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    lines = [[line for line in out.splitlines() if line.startswith(("SAVES", "STOPPED"))] for out, _ in outputs]
    # both agree one step late: process 1's overdue clock at step 1 -> saves from step 2; the signal at 3 -> stop at 4
    assert lines == [["SAVES [2, 3, 4]", "STOPPED 4 4 True"], ["SAVES [2, 3, 4]", "STOPPED 4 4 False"]]
