"""The bench's step beside the real train loop, on one config, in one invocation.

    python benchmarks/bench_train_loop.py [--rounds 3] [--train_steps 60] [--output results.json]

Each round runs, one after the other, `flax-bert bench` (its JAX worker: the jitted step on one
fixed batch) and `run_mlm_flax.py` (data pipeline, prefetch, metrics, checkpoints: the real loop) on
the issue's small RoBERTa: hidden 256, 4 layers, vocabulary 8k, sequence 128, batch 16, fp32, the
built-in corpus. The train run's tokens/s is the median of its metrics.jsonl windows after the first
`--skip_windows` (warm-up). Both children get this process's environment minus GLIBC_TUNABLES and
FLAX_BERT_*: whatever makes either fast it must do by itself. Rounds interleave the two, so a noisy
neighbour hurts both alike; the table gives per-round figures and the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every option the two runs depend on, spelled out: a changed default cannot change the comparison.
CONFIG = {
    "model_type": "roberta", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
    "intermediate_size": 1024, "max_position_embeddings": 514, "vocab_size": 8192, "tokenizer_vocab_size": 8192,
    "max_seq_length": 128, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "dtype": "float32",
    "scan_layers": True, "remat_policy": "none", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "objective": "mlm", "mlm_probability": 0.15, "whole_word_masking": False, "optimizer": "adamw",
    "learning_rate": 5e-4, "warmup_steps": 10, "lr_scheduler_type": "linear", "weight_decay": 0.01,
    "adam_beta1": 0.9, "adam_beta2": 0.98, "adam_epsilon": 1e-6, "max_grad_norm": 1.0, "seed": 42,
}


def clean_env() -> dict:
    """This environment without anything a user would have to export for speed."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("FLAX_BERT_")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def write_config(work: pathlib.Path) -> pathlib.Path:
    import yaml

    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def train_tokenizer(work: pathlib.Path, env: dict) -> pathlib.Path:
    folder = work / "tokenizer"
    subprocess.run([sys.executable, "-m", "flax_bert.cli", "train-tokenizer", "--vocab_size", str(CONFIG["vocab_size"]),
                    "--output_dir", str(folder), "--cache_dir", str(work / "cache")], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return folder


def run_bench(config: pathlib.Path, work: pathlib.Path, env: dict, steps: int) -> tuple[float, dict]:
    out = work / f"bench-{time.time_ns()}.json"
    subprocess.run([sys.executable, "-m", "flax_bert.bench", str(config), "--steps", str(steps), "--warmup_steps", "2",
                    "--output", str(out)], env=env, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    return result["tokens_per_second"], {"cpu_seconds_per_step": result["cpu_seconds_per_step"],
                                         "host_other_load": result["host_other_load"]}


def run_train(config: pathlib.Path, work: pathlib.Path, tokenizer: pathlib.Path, env: dict, steps: int,
              logging_steps: int, skip_windows: int) -> tuple[float, dict]:
    out = work / f"run-{time.time_ns()}"
    log = work / f"{out.name}.log"
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, str(ROOT / "run_mlm_flax.py"), str(config), "--output_dir", str(out),
                               "--tokenizer_name", str(tokenizer), "--cache_dir", str(work / "cache"),
                               "--max_steps", str(steps), "--logging_steps", str(logging_steps), "--do_eval", "false",
                               "--save_steps", "0", "--progress_bar", "false", "--validation_split_percentage", "0"],
                              env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"run_mlm_flax.py failed (exit {done.returncode}); see {log}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "tokens_per_second" in r][skip_windows:]
    if not windows:
        raise RuntimeError(f"no metrics windows after warm-up in {out}: raise --train_steps")
    allocator = next((line.split("INFO ", 1)[1] for line in log.read_text().splitlines() if "malloc huge pages" in line), "?")
    return statistics.median(r["tokens_per_second"] for r in windows), {
        "input_wait_seconds": statistics.median(r["input_wait_seconds"] for r in windows),
        "step_seconds": statistics.median(r["step_seconds"] for r in windows), "allocator": allocator,
        "cpu_seconds_per_step": statistics.median(r["cpu_seconds_per_step"] for r in windows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="bench + train pairs, interleaved")
    parser.add_argument("--bench_steps", type=int, default=20, help="timed bench steps (median)")
    parser.add_argument("--train_steps", type=int, default=60)
    parser.add_argument("--logging_steps", type=int, default=5)
    parser.add_argument("--skip_windows", type=int, default=2, help="metrics windows left out as warm-up")
    parser.add_argument("--control", action="store_true",
                        help="also run the train loop with FLAX_BERT_HUGEPAGES=0 (4 KiB pages) each round")
    parser.add_argument("--work_dir", help="keep runs, tokenizer and cache here (default: a temporary folder)")
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args()
    env = clean_env()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        config, tokenizer = write_config(work), train_tokenizer(work, env)
        rounds = []
        for i in range(args.rounds):
            bench, bench_details = run_bench(config, work, env, args.bench_steps)
            train, details = run_train(config, work, tokenizer, env, args.train_steps, args.logging_steps,
                                       args.skip_windows)
            if args.control:
                control, _ = run_train(config, work, tokenizer, {**env, "FLAX_BERT_HUGEPAGES": "0"}, args.train_steps,
                                       args.logging_steps, args.skip_windows)
                details["control_tokens_per_second"] = control
                print(f"round {i + 1}: train loop without huge pages {control:,.0f} tokens/s "
                      f"(ratio {control / bench:.3f})", flush=True)
            rounds.append({"bench_tokens_per_second": bench, "train_tokens_per_second": train,
                           "bench_cpu_seconds_per_step": bench_details["cpu_seconds_per_step"],
                           "bench_host_other_load": bench_details["host_other_load"], **details})
            print(f"round {i + 1}: bench {bench:,.0f} tokens/s, train loop {train:,.0f} tokens/s, "
                  f"ratio {train / bench:.3f}; CPU s/step bench {bench_details['cpu_seconds_per_step']:.3f} "
                  f"train {details['cpu_seconds_per_step']:.3f}; other processes' load during the bench "
                  f"{bench_details['host_other_load']:.0%}", flush=True)
    bench = statistics.median(r["bench_tokens_per_second"] for r in rounds)
    train = statistics.median(r["train_tokens_per_second"] for r in rounds)
    print(f"\nRoBERTa hidden 256, 4 layers, vocab 8k, seq 128, batch 16, fp32; {len(rounds)} rounds, medians")
    print(f"{'what':<40}{'tokens/s':>12}")
    print(f"{'flax-bert bench (jitted step)':<40}{bench:>12,.0f}")
    print(f"{'run_mlm_flax.py (train loop)':<40}{train:>12,.0f}")
    print(f"{'ratio train / bench':<40}{train / bench:>12.3f}")
    if args.control:
        control = statistics.median(r["control_tokens_per_second"] for r in rounds)
        print(f"{'train loop, FLAX_BERT_HUGEPAGES=0':<40}{control:>12,.0f}")
        print(f"{'ratio without huge pages / bench':<40}{control / bench:>12.3f}")
    cpu_bench = statistics.median(r["bench_cpu_seconds_per_step"] for r in rounds)
    cpu_train = statistics.median(r["cpu_seconds_per_step"] for r in rounds)
    print(f"CPU seconds per step (less sensitive to other processes): bench {cpu_bench:.3f}, train loop "
          f"{cpu_train:.3f} (ratio bench / train {cpu_bench / cpu_train:.3f})")
    print(f"train-loop allocator: {rounds[-1]['allocator']}")
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps({"config": CONFIG, "rounds": rounds, "bench_tokens_per_second": bench,
                                                         "train_tokens_per_second": train, "ratio": train / bench},
                                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
