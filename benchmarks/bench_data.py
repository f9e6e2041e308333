"""Host data pipeline throughput: first pass (read + tokenize + pack + write the cache) for one
process and for process 0 of 4 (which tokenizes only its own logical shards), and from the cache
(load + shuffle + this process's share + gather rows, through the prefetch thread).

    python benchmarks/bench_data.py [--source wikitext|builtin] [--max_seq_length 128] [--global_batch_size 256]

Target: >= 1M tokens/s from the cache on 2 CPU cores (one TPU v4-8 host training roberta-base at
40% MFU consumes about 0.8M tokens/s). Uses ../shared (WikiText-2 valid+test, the GPT-2 BPE) when
present, else the built-in corpus and a freshly trained byte-level BPE.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flax_bert.training import accelerators  # noqa: E402

accelerators.quiet_libtpu_without_a_tpu()  # before JAX: no libtpu probing errors on a machine without a TPU
from flax_bert.data.pipeline import DataArgs, Prefetcher, build_datasets  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def load_tokenizer(work: pathlib.Path):
    bpe = SHARED / "tokenizers" / "gpt2-bpe"
    if (bpe / "vocab.json").is_file():
        from transformers import RobertaTokenizer

        tokenizer = RobertaTokenizer(vocab=str(bpe / "vocab.json"), merges=str(bpe / "merges.txt"))
        assert len(tokenizer) > 50_000, len(tokenizer)  # a wrong keyword silently gives 5 tokens
        return tokenizer, "GPT-2 byte-level BPE (50,262 tokens)"
    from flax_bert.data.corpus import load_builtin_corpus
    from flax_bert.data.tokenizer_training import train_tokenizer

    tokenizer = train_tokenizer(load_builtin_corpus(work), kind="bpe", vocab_size=8000, output_dir=work / "tok")
    return tokenizer, "byte-level BPE trained on the built-in corpus (8,000 tokens)"


def data_args(source: str, cache: pathlib.Path, options) -> DataArgs:
    common = dict(cache_dir=str(cache), max_seq_length=options.max_seq_length,
                  preprocessing_num_workers=options.workers, data_shards=options.data_shards)
    wikitext = SHARED / "data" / "wikitext-2-raw"
    if source == "wikitext" and (wikitext / "wiki.valid.raw").is_file():
        return DataArgs(train_file=str(wikitext / "wiki.valid.raw"), validation_file=str(wikitext / "wiki.test.raw"),
                        **common)
    return DataArgs(**common)  # the built-in corpus, 5% carved out for validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=["wikitext", "builtin"], default="wikitext")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--global_batch_size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=50, help="passes over the cached rows")
    parser.add_argument("--data_shards", type=int, default=16, help="logical shards")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: all cores)")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        work = pathlib.Path(folder)
        tokenizer, tokenizer_name = load_tokenizer(work)
        args = data_args(options.source, work / "cache", options)
        source = args.train_file or "built-in corpus"
        print(f"source: {source}; tokenizer: {tokenizer_name}; cores: {os.cpu_count()}; "
              f"max_seq_length {args.max_seq_length}, global batch {options.global_batch_size}")

        start = time.perf_counter()
        train, evaluation = build_datasets(args, tokenizer, process_index=0, process_count=1)
        first_pass = time.perf_counter() - start
        tokens = train.num_tokens + (evaluation.num_tokens if evaluation else 0)
        print(f"first pass (read, tokenize, pack, write cache): {tokens:,} tokens in {first_pass:.2f}s "
              f"= {tokens / first_pass / 1e6:.2f}M tokens/s")

        start = time.perf_counter()
        share, share_eval = build_datasets(DataArgs(**{**vars(args), "cache_dir": str(work / "cache-process0")}),
                                           tokenizer, process_index=0, process_count=4)
        elapsed = time.perf_counter() - start
        own = share.num_tokens + (share_eval.num_tokens if share_eval else 0)
        print(f"first pass of process 0 of 4 (its {args.data_shards // 4} of {args.data_shards} shards): "
              f"{own:,} tokens ({own / tokens:.0%}) in {elapsed:.2f}s")

        start = time.perf_counter()
        train, evaluation = build_datasets(args, tokenizer, process_index=0, process_count=1)
        reopen = time.perf_counter() - start
        print(f"second run finds the cache: build_datasets in {reopen:.2f}s")

        streaming = DataArgs(**{**vars(args), "streaming": True})
        stream_rows, _ = build_datasets(streaming, tokenizer, process_index=0, process_count=1)
        real, start = 0, time.perf_counter()
        for batch in stream_rows.iterator(options.global_batch_size, seed=0, num_epochs=1):
            real += int((batch["segment_ids"] > 0).sum())
        elapsed = time.perf_counter() - start
        print(f"streaming (shuffle buffer, tokenize, pack on the fly): {real:,} tokens in {elapsed:.2f}s "
              f"= {real / elapsed / 1e6:.2f}M tokens/s")

        steps = options.epochs * -(-train.local_rows // options.global_batch_size)
        for process_count, rows in ((1, train), (4, share)):
            real = slots = 0
            start = time.perf_counter()
            with Prefetcher(rows.iterator(options.global_batch_size, seed=0), depth=4) as batches:
                for _ in range(steps):
                    batch = next(batches)
                    real += int((batch["segment_ids"] > 0).sum())
                    slots += batch["input_ids"].size
                waited = batches.wait_seconds
            elapsed = time.perf_counter() - start
            print(f"from cache, process 0 of {process_count}: {real:,} tokens ({slots:,} with padding) in "
                  f"{elapsed:.3f}s = {real / elapsed / 1e6:.1f}M tokens/s (consumer waited {waited:.3f}s)")


if __name__ == "__main__":
    main()
