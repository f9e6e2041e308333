"""`flax-bert prepare` throughput: tokens/s, and per core, with 1 and with 2 worker processes.

    python benchmarks/bench_prepare.py [--corpus wikitext|generated] [--generated_mb 100] [--workers 1 2]

`wikitext`: WikiText-2 raw (valid as training data, test as validation) from ../shared. `generated`:
a corpus of at least `--generated_mb` MB written from WikiText-2's paragraphs in seeded random order
(realistic text for the tokenizer, any size). Each measurement is a real `flax-bert prepare` command
into a fresh cache, with the GPT-2 byte-level BPE (50,262 tokens), rows of 128, 16 logical shards.
"per core" is tokens over the workers' own CPU seconds: what one core delivers, even on a shared host.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2-raw"
RESULT = re.compile(r"prepared (\w+): (\d+) shards, ([\d,]+) tokens tokenized and packed in ([\d.]+) s by (\d+) "
                    r"worker.*?\(([\d.]+) CPU s\)")


def save_tokenizer(work: pathlib.Path) -> pathlib.Path:
    from transformers import RobertaTokenizer

    bpe = SHARED / "tokenizers" / "gpt2-bpe"
    tokenizer = RobertaTokenizer(vocab=str(bpe / "vocab.json"), merges=str(bpe / "merges.txt"))
    assert len(tokenizer) > 50_000, len(tokenizer)  # a wrong keyword silently gives 5 tokens
    tokenizer.save_pretrained(work / "tokenizer")
    return work / "tokenizer"


def generate_corpus(path: pathlib.Path, megabytes: int, seed: int = 0) -> None:
    """WikiText-2 paragraphs, shuffled with `seed`, until the file holds `megabytes` MB."""
    text = (WIKITEXT / "wiki.valid.raw").read_text(encoding="utf-8") + (WIKITEXT / "wiki.test.raw").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n") if len(p.strip()) > 40]
    rng, written = random.Random(seed), 0
    with path.open("w", encoding="utf-8") as out:
        while written < megabytes * 1_000_000:
            rng.shuffle(paragraphs)
            for paragraph in paragraphs:
                out.write(paragraph + "\n\n")  # a blank line ends a document, as in WikiText
            written = out.tell()


def run_prepare(data_flags: list[str], tokenizer: pathlib.Path, work: pathlib.Path, workers: int) -> list[dict]:
    cache = pathlib.Path(tempfile.mkdtemp(dir=work, prefix=f"cache-w{workers}-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flax_bert.cli", "prepare", *data_flags, "--tokenizer_name",
                           str(tokenizer), "--cache_dir", str(cache), "--output_dir", str(work / "run"),
                           "--preprocessing_num_workers", str(workers), "--max_seq_length", "128",
                           "--per_device_train_batch_size", "16", "--data_shards", "16"],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"prepare failed: {done.stderr[-2000:]}")
    wall = time.perf_counter() - start
    results = []
    for split, shards, tokens, seconds, used, cpu in RESULT.findall(done.stdout):
        tokens, seconds, cpu = int(tokens.replace(",", "")), float(seconds), float(cpu)
        results.append({"split": split, "workers": int(used), "tokens": tokens, "seconds": seconds,
                        "tokens_per_second": tokens / seconds, "per_core": tokens / cpu, "cpu_seconds": cpu,
                        "command_seconds": wall})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["wikitext", "generated"], default="wikitext")
    parser.add_argument("--generated_mb", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work_dir", help="default: a temporary folder")
    args = parser.parse_args()
    if not (WIKITEXT / "wiki.valid.raw").is_file():
        print(f"needs WikiText-2 raw in {WIKITEXT}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer = save_tokenizer(work)
        if args.corpus == "wikitext":
            flags = ["--train_file", str(WIKITEXT / "wiki.valid.raw"), "--validation_file", str(WIKITEXT / "wiki.test.raw")]
            size = sum((WIKITEXT / f).stat().st_size for f in ("wiki.valid.raw", "wiki.test.raw"))
        else:
            corpus = work / f"generated-{args.generated_mb}mb.txt"
            if not corpus.is_file():
                generate_corpus(corpus, args.generated_mb)
            flags = ["--train_file", str(corpus), "--validation_split_percentage", "0"]
            size = corpus.stat().st_size
        print(f"{args.corpus}: {size / 1e6:.1f} MB of text, GPT-2 BPE, rows of 128, 16 shards, {os.cpu_count()} cores")
        print(f"{'workers':>8}{'split':>12}{'tokens':>14}{'seconds':>10}{'tokens/s':>12}{'CPU s':>8}{'per core':>11}")
        for workers in args.workers:
            for r in run_prepare(flags, tokenizer, work, workers):
                print(f"{r['workers']:>8}{r['split']:>12}{r['tokens']:>14,}{r['seconds']:>10.1f}"
                      f"{r['tokens_per_second']:>12,.0f}{r['cpu_seconds']:>8.1f}{r['per_core']:>11,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
