"""`flax-bert bench`: time the real train step, and PyTorch's beside it, in one invocation.

Each framework is measured in its own child process (`python -m flax_bert.bench --_worker ...`):
peak resident memory (`ru_maxrss`) is a per-process high-water mark, so measuring JAX and PyTorch
in one process would report the larger of the two for both; separate processes also keep the two
runtimes' thread pools from competing for the cores. The parent only parses, launches, prints the
table and writes the JSON.

MFU follows docs/design.md: F = 6*N_enc + 12*L*s*d + rho*(6*d*V + 6*d^2) model FLOPs per non-pad
token (rematerialization excluded), counted by the same function as in training
(`peak_flops.step_flops_per_token`), against the same peak (`peak_flops.device_peak_flops`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from flax_bert.errors import InputError, MissingDependencyError
from flax_bert.run import out_of_memory

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent


class BenchError(InputError):
    """Bad bench input (config, sizes)."""


# ----------------------------------------------------------------------------- configuration
def load_setup(args, overrides: dict | None = None):
    """(RunConfig, ModelConfig) from the YAML plus the bench's overrides (and any other RunConfig
    values in `overrides`, e.g. tiny sizes for a test)."""
    from flax_bert.run.config import RunConfig, fresh_model_config, load_yaml

    values = {**load_yaml(args.config), **(overrides or {})}  # a path or a name from configs/
    for name in ("per_device_train_batch_size", "max_seq_length", "dtype", "scan_layers", "remat_policy"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    values["gradient_accumulation_steps"] = 1
    run = RunConfig(**values)
    # the special ids of the tokenizer the run would train, so both frameworks build the model that run builds
    # (the family's defaults, e.g. ModernBERT's pad id 50283, lie outside a small vocabulary)
    from flax_bert.data.tokenizer_training import trained_special_ids
    from flax_bert.models import family

    ids = trained_special_ids(family(run.model_type or "roberta").tokenizer_kind)
    model_config = fresh_model_config(run, run.vocab_size or run.tokenizer_vocab_size, ids)
    if run.max_seq_length > model_config.max_sequence_length:
        raise BenchError(f"--max_seq_length {run.max_seq_length} exceeds the position table "
                         f"({model_config.max_sequence_length}); lower it or raise max_position_embeddings")
    return run, model_config


def special_token_ids(model_config) -> tuple[tuple[int, ...], int]:
    """(special ids, mask id) for random-id batches: pad/bos/eos plus a mask id at the vocabulary's end."""
    mask_id = model_config.vocab_size - 1
    specials = {model_config.pad_token_id, mask_id}
    specials |= {i for i in (model_config.bos_token_id, model_config.eos_token_id) if i is not None}
    return tuple(sorted(specials)), mask_id


def random_batch(rows: int, length: int, model_config, seed: int = 0, nsp: bool = False) -> dict:
    """Random non-special token ids, one document a row, no padding: every token counts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    specials, _ = special_token_ids(model_config)
    ordinary = np.setdiff1d(np.arange(model_config.vocab_size), specials)
    batch = {"input_ids": rng.choice(ordinary, (rows, length)).astype(np.int32),
             "segment_ids": np.ones((rows, length), np.int32),
             "word_starts": np.ones((rows, length), bool)}
    if nsp:
        batch["token_type_ids"] = np.zeros((rows, length), np.int32)
        batch["token_type_ids"][:, length // 2:] = 1
        batch["next_sentence_label"] = rng.integers(0, 2, (rows,)).astype(np.int32)
    return batch


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class StepTimer:
    """Wall time per step, plus what says whether the number can be trusted on a shared host:
    this process's CPU seconds and page faults per step, and the share of the host's CPU that
    other processes used during the timed window (0 = the machine was ours alone).

        with StepTimer() as timer:
            for _ in range(n):
                with timer.step():
                    ...
    """

    def __enter__(self):
        self.times, self.cpu, self.faults = [], [], []
        self._start = (time.perf_counter(), _cpu_seconds(), _host_busy_jiffies())
        return self

    def __exit__(self, *exc):
        self._end = (time.perf_counter(), _cpu_seconds(), _host_busy_jiffies())

    @contextlib.contextmanager
    def step(self):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        yield
        self.times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        self.faults.append(after.ru_minflt - before.ru_minflt)

    def summary(self) -> dict:
        (wall0, own0, host0), (wall1, own1, host1) = self._start, self._end
        other = None
        if host0 is not None and host1 is not None:
            busy = (host1 - host0) / os.sysconf("SC_CLK_TCK")
            other = max(0.0, busy - (own1 - own0)) / ((wall1 - wall0) * os.cpu_count())
        return {"cpu_seconds_per_step": statistics.median(self.cpu),
                "page_faults_per_step": int(statistics.median(self.faults)), "host_other_load": other,
                "malloc_hugepages": "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")}  # as started


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def host_cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole host from /proc/stat, in clock ticks (None without /proc)."""
    try:
        fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)  # busy: all but idle and iowait


def _host_busy_jiffies() -> int | None:
    jiffies = host_cpu_jiffies()
    return jiffies[0] if jiffies else None


# ----------------------------------------------------------------------------- JAX worker
def device_peak_memory(devices) -> int | None:
    """Peak bytes in use on accelerators (None on CPU, whose allocator keeps no statistics)."""
    stats = [d.memory_stats() for d in devices]
    if not all(s and "peak_bytes_in_use" in s for s in stats):
        return None
    return max(s["peak_bytes_in_use"] for s in stats)


def make_trainer(run, model_config, dense_head: bool = False, mesh=None, gradient_accumulation_steps: int = 1):
    """The run's Trainer for random-id batches; on `mesh` (default: the run's --mesh over this machine's devices)."""
    import jax
    import jax.numpy as jnp

    from flax_bert.training.optim import make_optimizer
    from flax_bert.training.sharding import make_mesh
    from flax_bert.training.step import MaskingConfig, StepConfig, Trainer

    specials, mask_id = special_token_ids(model_config)
    masking = MaskingConfig(special_ids=specials, mask_token_id=mask_id, random_vocab_size=model_config.vocab_size,
                            mlm_probability=run.mlm_probability, max_seq_length=run.max_seq_length,
                            whole_word_masking=run.whole_word_masking)
    tx, schedule = make_optimizer(learning_rate=run.learning_rate, warmup_steps=run.warmup_steps,
                                  total_steps=max(run.max_steps, run.warmup_steps + 1),
                                  schedule=run.lr_scheduler_type, optimizer=run.optimizer, b1=run.adam_beta1,
                                  b2=run.adam_beta2, eps=run.adam_epsilon, weight_decay=run.weight_decay,
                                  max_grad_norm=run.max_grad_norm)

    class DenseHeadTrainer(Trainer):
        """Ablation: the vocabulary head on every position, then the slots gathered from its logits."""

        def model(self, params):
            model = super().model(params)

            def call(*args, masked_positions, **kwargs):
                out = model(*args, **kwargs)
                return out.replace(logits=jnp.take_along_axis(out.logits, masked_positions[:, :, None], axis=1))
            return call

    trainer_class = DenseHeadTrainer if dense_head else Trainer
    mesh = make_mesh(run.mesh) if mesh is None else mesh
    step_config = StepConfig(masking=masking, seed=run.seed, objective=run.objective,
                             gradient_accumulation_steps=gradient_accumulation_steps)
    return trainer_class(model_config, step_config, tx, mesh, schedule), jax.devices()


def run_jax(args, setup=None, compiler_options=None) -> dict:
    """Time the jitted train step; `setup` = (RunConfig, ModelConfig) instead of the args' config;
    `compiler_options`: XLA options for the step's compile (tests ask for a cheaper backend)."""
    import jax

    from flax_bert.training.sharding import batch_sharding

    run, model_config = setup or load_setup(args)
    trainer, devices = make_trainer(run, model_config, dense_head=args.dense_head)
    rows = run.per_device_train_batch_size * len(devices)
    host_batch = random_batch(rows, run.max_seq_length, model_config, nsp=run.objective == "mlm+nsp")
    # each entry sharded along its batch axis at its own rank (next_sentence_label is [rows])
    batch = {name: jax.device_put(value, batch_sharding(trainer.mesh, value.ndim)) for name, value in host_batch.items()}
    state = trainer.init_state(seed=run.seed)
    jax.block_until_ready(state)

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    compiled = trainer.train_step.lower(state, batch).compile(compiler_options)  # trace + lower + XLA compile
    compile_seconds, compile_cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    first_step_seconds = compile_seconds + time.perf_counter() - start

    for _ in range(args.warmup_steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    with jax.profiler.trace(args.profile_dir) if args.profile_dir else contextlib.nullcontext(), StepTimer() as timer:
        for _ in range(args.steps):
            with timer.step():
                state, metrics = jax.block_until_ready(compiled(state, batch))
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise FloatingPointError(f"benchmark loss is {loss}")
    # After the steps, so the matmul's buffers cannot add to the step's memory high-water mark.
    from flax_bert.training.peak_flops import device_peak_flops, peak_at_least, step_flops_per_token, total_peak_flops

    flops = step_flops_per_token(model_config, trainer.step_config.masking, dense_head=args.dense_head)
    peak, peak_source = device_peak_flops(model_config.dtype, remeasure=args.measure_peak)
    tokens_per_second = rows * run.max_seq_length / statistics.median(timer.times)
    peak = peak_at_least(peak, tokens_per_second * flops, model_config.dtype)
    result = _rates(rows * run.max_seq_length, timer, flops, total_peak_flops(peak))
    device_memory = device_peak_memory(devices)
    result.update(
        framework="jax", device=f"{len(devices)}x {devices[0].device_kind}", compile_seconds=compile_seconds,
        compile_cpu_seconds=compile_cpu_seconds,
        first_step_seconds=first_step_seconds, matmul_peak_flops=peak, peak_source=peak_source, loss=loss,
        peak_memory_bytes=device_memory or peak_rss_bytes(), peak_rss_bytes=peak_rss_bytes(),
        peak_memory_kind="device" if device_memory else "rss", global_batch_size=rows,
        scan_layers=model_config.scan_layers, remat_policy=model_config.remat_policy,
        sparse_head=not args.dense_head, xla_flags=os.environ.get("XLA_FLAGS", ""))
    return result


def _rates(tokens_per_step, timer, flops_per_token, total_peak) -> dict:
    step = statistics.median(timer.times)
    tokens_per_second = tokens_per_step / step
    return {"step_seconds": step, "step_seconds_min": min(timer.times), "step_seconds_max": max(timer.times),
            "tokens_per_second": tokens_per_second, "flops_per_token": flops_per_token, "total_peak_flops": total_peak,
            "mfu": tokens_per_second * flops_per_token / total_peak if total_peak else None,
            "timed_steps": len(timer.times), **timer.summary()}


# ----------------------------------------------------------------------------- PyTorch worker
def torch_mask_tokens(input_ids, special_ids, mask_id, vocab_size, mlm_probability):
    """transformers' DataCollatorForLanguageModeling.torch_mask_tokens: labels -100 off the mask."""
    import torch

    labels = input_ids.clone()
    probability = torch.full(labels.shape, mlm_probability)
    probability.masked_fill_(torch.isin(input_ids, torch.tensor(special_ids)), 0.0)
    masked = torch.bernoulli(probability).bool()
    labels[~masked] = -100
    inputs = input_ids.clone()
    replaced = torch.bernoulli(torch.full(labels.shape, 0.8)).bool() & masked
    inputs[replaced] = mask_id
    randomized = torch.bernoulli(torch.full(labels.shape, 0.5)).bool() & masked & ~replaced
    inputs[randomized] = torch.randint(vocab_size, labels.shape)[randomized]
    return inputs, labels


def measure_torch_matmul_peak(sizes=(1024, 2048), repeats: int = 5) -> float:
    """torch.matmul's best fp32 FLOP/s on the same sizes as the JAX peak."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def torch_model(model_config, nsp: bool = False):
    """transformers' model of the family (with the NSP head for mlm+nsp), built from the same config as ours."""
    import transformers

    from flax_bert.models import family

    model_family = family(model_config.model_type)
    model_class = getattr(transformers, model_family.nsp_architecture if nsp else model_family.architectures[0])
    return model_class(model_config.to_hf_config(model_class.__name__))


def run_torch(args) -> dict:
    import torch

    run, model_config = load_setup(args)  # main() has checked that the dtype is float32
    torch.manual_seed(run.seed)
    nsp = run.objective == "mlm+nsp"
    model = torch_model(model_config, nsp).train()
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm.weight" in n or "layer_norm.weight" in n]
    decay = [p for p in model.parameters() if all(p is not q for q in no_decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=run.learning_rate, betas=(run.adam_beta1, run.adam_beta2), eps=run.adam_epsilon)
    rows = args._rows or run.per_device_train_batch_size  # the JAX run's global batch
    batch = {k: torch.from_numpy(v).long() for k, v in random_batch(rows, run.max_seq_length, model_config, nsp=nsp).items()
             if k != "word_starts"}
    specials, mask_id = special_token_ids(model_config)

    def step():
        inputs, labels = torch_mask_tokens(batch["input_ids"], specials, mask_id, model_config.vocab_size,
                                           run.mlm_probability)
        kwargs = {"token_type_ids": batch["token_type_ids"], "next_sentence_label": batch["next_sentence_label"]} if nsp else {}
        out = model(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=labels, **kwargs)
        out.loss.backward()
        if run.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), run.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    start = time.perf_counter()
    step()
    first_step_seconds = time.perf_counter() - start
    for _ in range(args.warmup_steps):
        step()
    with StepTimer() as timer:
        for _ in range(args.steps):
            with timer.step():
                loss = step()
    from flax_bert.models.config import flops_per_token  # jax-free; transformers' head runs on every position

    result = _rates(rows * run.max_seq_length, timer, flops_per_token(model_config, run.max_seq_length, 1.0), None)
    attn_implementation = model.config._attn_implementation
    result["matmul_peak_flops"] = measure_torch_matmul_peak()  # for reference; MFU uses the JAX peak
    result.update(framework="torch", first_step_seconds=first_step_seconds, peak_memory_bytes=peak_rss_bytes(),
                  loss=loss, threads=torch.get_num_threads(), torch_version=torch.__version__,
                  attn_implementation=attn_implementation)
    return result


# ----------------------------------------------------------------------------- parent
def build_parser() -> argparse.ArgumentParser:
    from flax_bert.run.config import str2bool  # jax-free, as train's BOOL flags read

    parser = argparse.ArgumentParser(prog="flax-bert bench", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="YAML run config (configs/tiny.yaml) or a name in configs/ (roberta-base)")
    parser.add_argument("--per_device_train_batch_size", type=int, help="override the config's batch")
    parser.add_argument("--max_seq_length", type=int, help="override the config's sequence length")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="override the compute dtype")
    parser.add_argument("--scan_layers", type=str2bool, metavar="BOOL",
                        help="override scan over layers (true/false)")
    parser.add_argument("--remat_policy", choices=["none", "full", "dots", "dots_no_batch"], help="override remat")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported; at least 5)")
    parser.add_argument("--warmup_steps", type=int, default=1, help="untimed steps after the first (compiling) step")
    parser.add_argument("--compare", choices=["torch"], help="also time transformers' PyTorch model + AdamW")
    parser.add_argument("--dense_head", action="store_true", help="ablation: vocabulary head on every position")
    parser.add_argument("--hugepages", type=str2bool, default=True, metavar="BOOL",
                        help="run JAX with glibc.malloc.hugetlb=1, as `flax-bert train` does on CPU (fewer page "
                             "faults; default true)")
    parser.add_argument("--torch_hugepages", type=str2bool, default=False,
                        metavar="BOOL", help="run PyTorch with glibc.malloc.hugetlb=1 too (default false: PyTorch as "
                                             "its users run it; the tunable can slow it down)")
    parser.add_argument("--measure_peak", action="store_true",
                        help="CPU: measure the matmul peak again (the best so far on this machine is kept and used)")
    parser.add_argument("--profile_dir", help="write a jax.profiler trace of the timed steps here")
    parser.add_argument("--output", help="write the results as JSON to this file")
    parser.add_argument("--_worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    parser.add_argument("--_rows", type=int, help=argparse.SUPPRESS)
    return parser


def worker_env(hugepages: bool) -> dict:
    """A child's environment. With `hugepages`, glibc's malloc asks for transparent huge pages
    (glibc >= 2.35): XLA:CPU maps a fresh temp buffer of about 1.8 GB per roberta-base step and
    touching it costs ~460k page faults (over a second of kernel time) with 4 KiB pages. The JAX child
    gets it by default, as the train command sets it for itself; the PyTorch child runs as PyTorch users
    run it unless --torch_hugepages (measured: the tunable slowed its modernbert-base step from 2.6 to
    4.0 s on one machine). glibc reads the tunable only at process start, hence the environment."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    if hugepages and "glibc.malloc.hugetlb" not in env.get("GLIBC_TUNABLES", ""):
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
    return env


def _run_worker(framework: str, argv: list[str], env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = pathlib.Path(tmp) / "result.json"
        command = [sys.executable, "-m", "flax_bert.bench", *argv, "--_worker", framework, "--_result", str(result_file)]
        done = subprocess.run(command, env=env, check=False)  # its own output explains a failure
        if done.returncode or not result_file.is_file():
            raise RuntimeError(f"the {framework} benchmark process failed (exit code {done.returncode}); see its output above")
        result = json.loads(result_file.read_text())
        if "error" in result:
            raise BenchError(result["error"])
        return result


def too_large(error: BaseException, args) -> Exception:
    """The JAX child's step that does not fit the device's memory, with the bench's own flags that shrink it."""
    import jax

    run, model_config = load_setup(args)
    step = argparse.Namespace(per_device_train_batch_size=run.per_device_train_batch_size,
                              max_seq_length=run.max_seq_length, remat_policy=model_config.remat_policy,
                              dtype=model_config.dtype)  # no --attention here: the hint leaves it out
    return out_of_memory.train_step_error(error, step, jax.devices()[0].platform, accumulation_flag=False,
                                          new_run_for_length=False)


def summarize(jax_result: dict, torch_result: dict | None) -> dict:
    summary = dict(jax_result)
    if torch_result:
        # one host, one denominator: the best either framework's matmul (or step) reached on it
        torch_flops = torch_result["tokens_per_second"] * torch_result["flops_per_token"]
        peak = max(jax_result["total_peak_flops"], torch_result["matmul_peak_flops"], torch_flops)
        if peak > jax_result["total_peak_flops"]:
            summary["total_peak_flops"] = summary["matmul_peak_flops"] = peak
            summary["mfu"] = jax_result["tokens_per_second"] * jax_result["flops_per_token"] / peak
            summary["peak_source"] = "torch.matmul measured now (above the JAX matmul)"
        torch_result["mfu"] = torch_flops / peak
        summary.update({f"torch_{k}": v for k, v in torch_result.items() if k != "framework"})
        summary["speedup_vs_torch"] = jax_result["tokens_per_second"] / torch_result["tokens_per_second"]
        summary["memory_ratio_vs_torch"] = jax_result["peak_memory_bytes"] / torch_result["peak_memory_bytes"]
    return summary


def format_table(summary: dict) -> str:
    gib = 2 ** 30
    lines = [(f"{summary['config']}: batch {summary['global_batch_size']} x seq {summary['max_seq_length']}, "
              f"{summary['dtype']}, {summary['device']}; matmul peak {summary['matmul_peak_flops'] / 1e9:.1f} GFLOP/s "
              f"({summary.get('peak_source', 'measured')})"),
             f"{'framework':<10}{'step s (median)':>17}{'tokens/s':>11}{'MFU':>8}{'compile s':>11}{'peak mem GiB':>14}"]
    rows = [("jax", "")] + ([("torch", "torch_")] if "torch_tokens_per_second" in summary else [])
    for name, p in rows:
        compile_s = f"{summary['compile_seconds']:.1f}" if name == "jax" else "-"
        lines.append(f"{name:<10}{summary[p + 'step_seconds']:>17.3f}{summary[p + 'tokens_per_second']:>11.1f}"
                     f"{summary[p + 'mfu']:>8.1%}{compile_s:>11}{summary[p + 'peak_memory_bytes'] / gib:>14.2f}")
    for name, p in rows:
        other = summary.get(p + "host_other_load")
        if other is not None and other > 0.05:
            lines.append(f"warning: other processes used {other:.0%} of the host's CPU during the {name} steps; "
                         "the timings are disturbed")
    if "speedup_vs_torch" in summary:
        lines.append(f"jax/torch: tokens/s x{summary['speedup_vs_torch']:.2f}, "
                     f"peak memory x{summary['memory_ratio_vs_torch']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.steps < 5 and not args._worker:
        print(f"note: --steps {args.steps}: a median wants at least 5 timed steps", file=sys.stderr)
    if args.steps < 1:
        raise BenchError("--steps must be at least 1")
    if args._worker:
        try:
            result = run_jax(args) if args._worker == "jax" else run_torch(args)
        except Exception as error:
            if args._worker != "jax" or not out_of_memory.is_out_of_memory(error):
                raise
            result = {"error": str(too_large(error, args))}  # the parent says it in one line
        pathlib.Path(args._result).write_text(json.dumps(result))
        return 0
    run, model_config = load_setup(args)  # fail fast on bad input, before any child starts
    if args.compare == "torch":
        import importlib.util

        if not all(importlib.util.find_spec(name) for name in ("torch", "transformers")):
            raise MissingDependencyError("--compare torch needs PyTorch and transformers: pip install -e '.[torch]'")
        if model_config.dtype != "float32":
            raise BenchError("--compare torch times fp32 (PyTorch's CPU default); pass --dtype float32")
    jax_result = _run_worker("jax", argv, worker_env(args.hugepages))
    jax_result.update(config=str(args.config), max_seq_length=run.max_seq_length, dtype=model_config.dtype,
                      per_device_train_batch_size=run.per_device_train_batch_size, steps=args.steps)
    torch_result = None
    if args.compare == "torch":
        torch_argv = [*argv, "--_rows", str(jax_result["global_batch_size"])]
        torch_result = _run_worker("torch", torch_argv, worker_env(args.torch_hugepages))
    summary = summarize(jax_result, torch_result)
    print(format_table(summary))
    if args.output:
        pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.output).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
