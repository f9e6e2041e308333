"""Several processes through JAX's own distributed runtime, on CPU: 2 local processes x 4 simulated
devices joined by jax.distributed.initialize on 127.0.0.1 train exactly like 1 process x 8 devices,
tokenize and read only their own data shards, evaluate together, resume after a kill (on 2 processes
or on 1), and stop (instead of hanging) when a peer dies.

Every run is the real command line (run_mlm_flax.py) in subprocesses. The runs share a persistent
compilation cache, so only the first run of each layout pays for compiling. The learning rate is
constant after warmup, so a run started with a larger --max_steps (the one that gets killed) takes
exactly the same steps as the 12-step reference and its resume with --max_steps 12 must end equal.
"""
import json
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.xla_env import one_device_env, xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY, GLOBAL_BATCH = 12, 6, 16  # 2 rows per device x 8 devices
HEARTBEAT_SECONDS = 15  # how long the killed run's survivor waits before the coordination service gives up
STOP_DEADLINE_SECONDS = 120  # a survivor must be gone this long after its peer was killed
RUN_TIMEOUT_SECONDS = 420
TINY_RUN = ["--model_type", "roberta", "--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "2",
            "--intermediate_size", "128", "--max_position_embeddings", "66", "--max_seq_length", "64",
            "--per_device_train_batch_size", "2", "--learning_rate", "2e-3", "--warmup_steps", "2",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_steps", str(SAVE_EVERY),
            "--max_train_samples", "300", "--max_eval_samples", "60", "--per_device_eval_batch_size", "2",
            "--progress_bar", "false", "--seed", "7", "--do_train", "--do_eval", "--weight_decay", "0.01", "--adam_beta2", "0.98", "--adam_epsilon", "1e-6", "--max_grad_norm", "1.0",]


# ----------------------------------------------------------------------------- launching runs
class Launch:
    """One run of the command line as `num_processes` local processes (logs in files: no pipe can fill)."""

    def __init__(self, work: pathlib.Path, name: str, num_processes: int, extra_args=(), extra_env=None,
                 output_dir: pathlib.Path | None = None):
        self.out, self.num_processes = output_dir or work / name, num_processes
        self.logs = [work / f"{name}.process{i}.log" for i in range(num_processes)]
        self.rows_prefix = work / f"{name}.rows"
        devices = 8 // num_processes
        port = _free_port()
        self.processes = []
        for index in range(num_processes):
            args = [sys.executable, str(ROOT / "run_mlm_flax.py"), *TINY_RUN, "--tokenizer_name", str(work / "tokenizer"),
                    "--cache_dir", str(work / f"cache{index}"), "--output_dir", str(self.out), *extra_args]
            if num_processes > 1:
                args += ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(num_processes),
                         "--process_id", str(index)]
            env = one_device_env()
            env.update(XLA_FLAGS=xla_flags(devices), HF_HUB_OFFLINE="1",
                       HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                       FLAX_BERT_LOG_ROWS=str(self.rows_prefix), **(extra_env or {}))
            with open(self.logs[index], "w") as log:
                self.processes.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = RUN_TIMEOUT_SECONDS) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.processes]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.out.name} did not finish in {timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    def log(self, index: int = 0) -> str:
        return self.logs[index].read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- process {i}\n{self.log(i)[-chars:]}" for i in range(self.num_processes))

    def succeed(self) -> "Launch":
        codes = self.wait()
        assert codes == [0] * self.num_processes, f"exit codes {codes}\n{self.log_tail()}"
        return self

    def rows_served(self, index: int) -> dict[int, list[tuple[int, int]]]:
        """batch number -> the (data shard, row) pairs process `index` read for it, in order."""
        lines = pathlib.Path(f"{self.rows_prefix}.process{index}.jsonl").read_text().splitlines()
        return {record["batch"]: [tuple(pair) for pair in record["rows"]] for record in map(json.loads, lines)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_losses(out: pathlib.Path) -> dict[int, float]:
    """step -> train_loss from metrics.jsonl (written by process 0); a resumed run's later record wins."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train_loss" in record:
            losses[record["step"]] = record["train_loss"]
    return losses


def final_parameters(out: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(out / "model.safetensors"))


def assert_same_parameters(actual: pathlib.Path, expected: pathlib.Path, rtol: float, atol: float = 0.0) -> None:
    """Every tensor equal within rtol (rtol=atol=0: bit-identical). atol is for elements near zero: a
    cross-process all-reduce adds in another order than one process does, and the attention key
    biases (which softmax ignores: their true gradient is 0) hold nothing but such rounding, ~1e-9."""
    got, want = final_parameters(actual), final_parameters(expected)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)


def complete_checkpoints(out: pathlib.Path) -> list[int]:
    folder = out / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


# ----------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> pathlib.Path:
    """A tokenizer trained once on the built-in corpus, and one cache folder per process (as on hosts
    without a shared file system), each seeded with the corpus file so no process rebuilds it."""
    from flax_bert.data.corpus import builtin_corpus_path, load_builtin_corpus
    from flax_bert.data.tokenizer_training import train_tokenizer

    work = tmp_path_factory.mktemp("multihost")
    documents = load_builtin_corpus(work / "cache0")
    train_tokenizer(documents[:1500], kind="bpe", vocab_size=1000, output_dir=work / "tokenizer", model_max_length=64)
    corpus = builtin_corpus_path(work / "cache0")
    (work / "cache1" / corpus.parent.name).mkdir(parents=True)
    shutil.copy(corpus, work / "cache1" / corpus.parent.name / corpus.name)
    return work


@pytest.fixture(scope="module")
def reference_runs(work):
    """(1 process x 8 devices, 2 processes x 4 devices), both 12 steps, started together: they compile
    different programs, and compiling is what takes the time."""
    one = Launch(work, "one_process", 1, ["--max_steps", str(STEPS)])
    two = Launch(work, "two_processes", 2, ["--max_steps", str(STEPS)])
    try:
        one.succeed(), two.succeed()
        # what the two runs tokenized, before later runs with other options add to the caches
        one.tokenized_after_reference_runs = {cache: [json.loads(meta.read_text()) for meta in
                                                      (work / cache).glob("tokenized/*/meta.json")]
                                              for cache in ("cache0", "cache1")}
        return one, two
    finally:
        one.kill()
        two.kill()


@pytest.fixture(scope="module")
def killed_run(work, reference_runs):
    """A 2-process run meant to go on for long, whose process 1 is SIGKILLed once checkpoint 6 is
    complete; process 0 must then stop by itself. Returns (launch, process 0's exit code, seconds it
    outlived process 1)."""
    run = Launch(work, "killed", 2, ["--max_steps", "1000"],
                 extra_env={"FLAX_BERT_HEARTBEAT_TIMEOUT_SECONDS": str(HEARTBEAT_SECONDS)})
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        while SAVE_EVERY not in complete_checkpoints(run.out):
            if any(p.poll() is not None for p in run.processes) or time.monotonic() > deadline:
                pytest.fail(f"the run ended or stalled before checkpoint {SAVE_EVERY}:\n{run.log_tail()}")
            time.sleep(0.05)
        run.processes[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            code = run.processes[0].wait(timeout=STOP_DEADLINE_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still runs {STOP_DEADLINE_SECONDS} s after process 1 died:\n{run.log_tail()}")
        stopped_after = time.monotonic() - killed_at
        shutil.copytree(run.out, work / "killed_copy")  # for a resume on another number of processes
        return run, code, stopped_after
    finally:
        run.kill()


# ----------------------------------------------------------------------------- the tests
def test_two_processes_train_exactly_like_one(reference_runs):
    one, two = reference_runs
    assert "process 0 of 2 joined; 4 local and 8 global devices" in two.log(0)
    assert "process 1 of 2 joined; 4 local and 8 global devices" in two.log(1)
    expected = train_losses(one.out)
    assert sorted(expected) == list(range(1, STEPS + 1))
    got = train_losses(two.out)
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)], rtol=1e-5)
    assert expected[STEPS] < expected[1]  # it trained
    assert_same_parameters(two.out, one.out, rtol=1e-5, atol=1e-7)
    # only process 0 writes metrics: one record per logged step, not one per process
    records = [json.loads(line) for line in (two.out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "train_loss" in r]) == STEPS


@pytest.fixture(scope="module")
def fsdp_run(work):
    """--mesh fsdp=8 over both processes, with --max_eval_samples 4: the 4 validation documents fall in shards 0-3
    (document i in shard i % 16), all of them process 0's, so process 1 holds no validation row."""
    return Launch(work, "two_processes_fsdp", 2, ["--max_steps", str(STEPS), "--mesh", "fsdp=8",
                                                  "--max_eval_samples", "4"]).succeed()


def test_fsdp_across_two_processes_exports_like_one_process(fsdp_run, reference_runs):
    """With --mesh fsdp=8 each parameter is split over both processes' devices, so process 0 cannot read it
    alone: the processes gather it together before process 0 writes the export, which equals the 1-process one."""
    one, _ = reference_runs
    assert f"exported the final model (step {STEPS})" in fsdp_run.log(0), fsdp_run.log_tail()
    assert_same_parameters(fsdp_run.out, one.out, rtol=1e-5, atol=1e-7)


def test_two_processes_evaluate_every_row_once_like_one(work, reference_runs):
    """Each process evaluates the rows of its own shards; one that runs out first contributes empty rows
    while the other goes on. Each mask is keyed by its row's place in the validation set, so the numbers agree
    to float rounding."""
    from transformers import AutoTokenizer

    from flax_bert.data.pipeline import DataArgs, build_datasets

    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    local_batches = []
    for index in (0, 1):  # the same rows the runs built, from the caches they left
        args = DataArgs(cache_dir=str(work / f"cache{index}"), max_seq_length=64, max_train_samples=300,
                        max_eval_samples=60, data_shards=16)
        rows = build_datasets(args, tokenizer, process_index=index, process_count=2)[1].local_rows
        local_batches.append(-(-rows // (GLOBAL_BATCH // 2)))
    assert local_batches[0] != local_batches[1], local_batches  # the case where one process waits on the other
    one, two = (json.loads((run.out / "eval_results.json").read_text()) for run in reference_runs)
    assert one["eval_loss"] > 0 and two["eval_loss"] > 0
    np.testing.assert_allclose(two["eval_loss"], one["eval_loss"], rtol=1e-4)
    np.testing.assert_allclose(two["eval_accuracy"], one["eval_accuracy"], rtol=1e-4)
    # the baseline counts every process's shards: the same data, the same number
    assert two["unigram_baseline_accuracy"] == pytest.approx(one["unigram_baseline_accuracy"], rel=1e-12)


def test_each_process_reads_only_its_own_share_of_each_batch(reference_runs):
    one, two = reference_runs
    whole = one.rows_served(0)
    first, second = two.rows_served(0), two.rows_served(1)
    trained = list(whole)[:STEPS]  # the batches of steps 1..12 (the prefetcher may have read a few more)
    assert trained == list(range(STEPS))
    for batch in trained:
        rows_0, rows_1 = first[batch], second[batch]
        assert len(rows_0) == len(rows_1) == GLOBAL_BATCH // 2
        # 16 logical shards: process 0 reads only shards 0-7, process 1 only shards 8-15
        assert {shard for shard, _ in rows_0} <= set(range(8)) and {shard for shard, _ in rows_1} <= set(range(8, 16))
        # process p holds the p-th half of the global batch, which is what the device layout expects
        assert rows_0 + rows_1 == whole[batch]
    # each process tokenized only its own shards of the training and validation splits (process 1 has a
    # cache of its own; process 0 shares one with the 1-process run, which built all 16)
    for cache, shards in (("cache1", range(8, 16)), ("cache0", range(16))):
        built = one.tokenized_after_reference_runs[cache]
        assert sorted(m["shard"] for m in built) == sorted(2 * list(shards)), cache
        assert {m["num_shards"] for m in built} == {16}
    # every batch either process read (prefetched ones included) is its half of the same global batch
    for process, served in enumerate((first, second)):
        for batch in set(served) & set(whole):
            half = GLOBAL_BATCH // 2
            assert served[batch] == whole[batch][process * half : (process + 1) * half], (process, batch)


def test_a_dead_process_stops_the_others_with_a_clear_error(killed_run):
    run, code, seconds = killed_run
    assert code != 0, run.log_tail()
    assert seconds < STOP_DEADLINE_SECONDS
    log = run.log(0)
    assert "JAX distributed service detected fatal errors" in log and "another task died" in log, run.log_tail()
    assert "stopped sending heartbeats" in log
    assert "exported the final model" not in log


def test_the_killed_run_resumes_from_its_checkpoint_and_ends_identical(killed_run, reference_runs):
    _, two = reference_runs
    killed, _, _ = killed_run
    assert complete_checkpoints(killed.out) == [SAVE_EVERY]
    resumed = Launch(killed.out.parent, "resumed", 2, ["--max_steps", str(STEPS)], output_dir=killed.out).succeed()
    # process 0 logs for all; every process restored checkpoint 6's data position (below)
    assert f"resuming from checkpoint {killed.out / 'checkpoints' / str(SAVE_EVERY)}" in resumed.log(0)
    for index in range(2):
        # it goes on with the batch after checkpoint 6: nothing replayed, nothing skipped
        first_batch = pathlib.Path(f"{resumed.rows_prefix}.process{index}.jsonl").read_text().splitlines()[0]
        assert json.loads(first_batch)["batch"] == SAVE_EVERY
    expected, got = train_losses(two.out), train_losses(resumed.out)
    assert sorted(got) == sorted(expected)
    # the same programs on the same devices from the same state: bit for bit the uninterrupted run
    assert [got[s] for s in sorted(got)] == [expected[s] for s in sorted(expected)]
    assert_same_parameters(resumed.out, two.out, rtol=0)


def test_a_streamed_two_process_run_resumes_each_process_at_its_own_position(work, reference_runs):
    """--streaming on 2 processes through two phases (32-token rows, then 64): each process streams its own
    documents and reads on at the new length, the checkpoint holds both positions, and the run cut back to
    checkpoint 6 (in the second phase) goes on without replaying and ends bit for bit as it would have."""
    phases = [{"name": "short", "until_step": 4, "max_seq_length": 32},
              {"name": "long", "until_step": STEPS, "max_seq_length": 64}]
    streamed = ["--streaming", "--shuffle_buffer_size", "32", "--phases", json.dumps(phases)]
    reference = Launch(work, "streamed", 2, streamed).succeed()
    assert "entering phase 1 'long'" in reference.log(0), reference.log_tail()  # process 0 logs for all
    assert complete_checkpoints(reference.out) == [SAVE_EVERY, STEPS]
    records = [json.loads(line) for line in (reference.out / "metrics.jsonl").read_text().splitlines()]
    lengths = {r["step"]: r["max_seq_length"] for r in records if "train_loss" in r}
    assert lengths == {step: 32 if step <= 4 else 64 for step in range(1, STEPS + 1)}
    saved = json.loads((reference.out / "checkpoints" / str(SAVE_EVERY) / "data" / "metadata").read_text())
    assert saved["process_count"] == 2 and [state["process_index"] for state in saved["processes"]] == [0, 1]
    assert saved["processes"][0]["snapshot"] != saved["processes"][1]["snapshot"]  # documents i % 2 each

    cut = work / "streamed_cut"
    shutil.copytree(reference.out, cut)
    (cut / "model.safetensors").unlink()
    shutil.rmtree(cut / "checkpoints" / str(STEPS))
    resumed = Launch(work, "streamed_resumed", 2, streamed, output_dir=cut).succeed()
    assert f"resuming from checkpoint {cut / 'checkpoints' / str(SAVE_EVERY)}" in resumed.log(0)
    assert "no replay" in resumed.log(0), resumed.log_tail()
    assert not any("replaying" in resumed.log(index) for index in range(2)), resumed.log_tail()
    assert_same_parameters(cut, reference.out, rtol=0)


def test_a_process_without_validation_rows_ends_the_run_with_the_others(fsdp_run):
    """Process 1 of the fsdp run holds no validation row. It still takes every collective of the final
    evaluation (the unigram baseline's token counts): the run evaluates, exports and ends instead of hanging."""
    assert "(validation) (this process's shards): 4 documents" in fsdp_run.log(0), fsdp_run.log_tail()  # all 4
    results = json.loads((fsdp_run.out / "eval_results.json").read_text())
    assert results["eval_loss"] > 0 and 0 < results["unigram_baseline_accuracy"] < 1
    assert f"exported the final model (step {STEPS})" in fsdp_run.log(0), fsdp_run.log_tail()


def test_on_cpu_each_step_is_finished_on_every_device_before_a_collective_from_the_host(monkeypatch):
    """Several processes on CPU: the loop waits for all of a step's outputs before the planner's collectives
    (gloo has no tags to tell a late step's collective from theirs); one process, or a TPU, goes straight on."""
    from flax_bert.training import distributed
    waited = []
    monkeypatch.setattr(distributed.jax, "block_until_ready", waited.append)
    for processes, backend, outputs in [(1, "cpu", "one process"), (2, "cpu", "two on cpu"), (2, "tpu", "two on tpu")]:
        monkeypatch.setattr(distributed.jax, "process_count", lambda: processes)
        monkeypatch.setattr(distributed.jax, "default_backend", lambda: backend)
        distributed.settle_before_host_collectives(outputs)
    assert waited == ["two on cpu"]


def test_every_process_takes_the_tokenizer_barrier(tmp_path, monkeypatch):
    """Process 0 finds no tokenizer and trains one; process 1 starts late and finds it already published.
    Both take barrier("tokenizer"), or process 1's next collective would pair with process 0's barrier."""
    import jax

    from flax_bert.data import tokenizer_training
    from flax_bert.run import build
    from flax_bert.run.config import RunConfig
    from flax_bert.training import distributed
    from tests.test_masking import tokenizer_with_added_tokens

    out = tmp_path / "run"
    run = RunConfig(output_dir=str(out), do_train=True)
    monkeypatch.setattr(tokenizer_training, "train_tokenizer_from_args",  # what training writes, quickly
                        lambda *args, output_dir, **kwargs: tokenizer_with_added_tokens(0).save_pretrained(output_dir))
    barriers = {0: [], 1: []}
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        monkeypatch.setattr(distributed, "barrier", barriers[index].append)
        tokenizer = build.resolve_tokenizer(run, out)
        assert len(tokenizer) == 25 and (out / "tokenizer" / "tokenizer_config.json").is_file()
    assert barriers == {0: ["tokenizer"], 1: ["tokenizer"]}


def test_the_heartbeat_timeout_comes_from_the_environment(monkeypatch):
    from flax_bert.training import distributed
    monkeypatch.delenv(distributed.HEARTBEAT_TIMEOUT_VARIABLE, raising=False)
    assert distributed.heartbeat_timeout_seconds() is None  # JAX's own default
    monkeypatch.setenv(distributed.HEARTBEAT_TIMEOUT_VARIABLE, "30")
    assert distributed.heartbeat_timeout_seconds() == 30
    for bad in ("soon", "0", "1.5"):
        monkeypatch.setenv(distributed.HEARTBEAT_TIMEOUT_VARIABLE, bad)
        with pytest.raises(ValueError, match=distributed.HEARTBEAT_TIMEOUT_VARIABLE):
            distributed.heartbeat_timeout_seconds()


def test_the_killed_run_resumes_on_one_process_and_ends_like_two(work, killed_run, reference_runs):
    """The data position is the rows read from each logical shard, the same for any number of processes,
    and Orbax reshards the state: the 2-process checkpoint goes on as 1 process x 8 devices."""
    _, two = reference_runs
    copy = work / "killed_copy"
    resumed = Launch(work, "resumed_on_one", 1, ["--max_steps", str(STEPS)], output_dir=copy).succeed()
    assert f"resuming from checkpoint {copy / 'checkpoints' / str(SAVE_EVERY)}" in resumed.log(0)
    first_batch = pathlib.Path(f"{resumed.rows_prefix}.process0.jsonl").read_text().splitlines()[0]
    assert json.loads(first_batch)["batch"] == SAVE_EVERY
    expected, got = train_losses(two.out), train_losses(copy)
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)], rtol=1e-5)
    assert_same_parameters(copy, two.out, rtol=1e-5, atol=1e-7)
