"""How long a --streaming iterator takes to give its next batch when it resumes, beside a fresh one's first.

    python benchmarks/bench_stream_resume.py [--megabytes 40] [--at 200 2000] [--format txt|jsonl] [--output F.json]

On a generated text corpus (WikiText-2 valid+test from ../shared repeated, each copy's lines numbered so no
two documents are equal; the built-in corpus when ../shared is absent), as a text file (read by byte
offset) or as jsonl (read through ``datasets``, which resumes by row number), for one process:
  * fresh: a new iterator's first batch (fill the shuffle buffer, tokenize one group, pack);
  * resumed at batch k from the saved state (JSON round trip included): seek, refill nothing, tokenize
    the snapshot's one group again;
  * resumed at batch k the old way (a state of ``{"batches": k}``): replay k batches from the start.
Also the size of the saved state as JSON (it holds the shuffle buffer's documents).
"""

from __future__ import annotations

import argparse
import json
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
from benchmarks.bench_data import SHARED, load_tokenizer  # noqa: E402
from flax_bert.data.pipeline import DataArgs, build_datasets  # noqa: E402


def write_corpus(path: pathlib.Path, megabytes: float, work: pathlib.Path, jsonl: bool) -> int:
    wikitext = SHARED / "data" / "wikitext-2-raw"
    if (wikitext / "wiki.valid.raw").is_file():
        lines = [line for name in ("wiki.valid.raw", "wiki.test.raw")
                 for line in (wikitext / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from flax_bert.data.corpus import load_builtin_corpus

        lines = [text.replace("\n", " ") for text in load_builtin_corpus(work)]
    written, copy, documents = 0, 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < megabytes * 1e6:
            for line in lines:
                text = f"{copy}.{documents} {line.strip()}"
                text = json.dumps({"text": text}) + "\n" if jsonl else text + "\n"
                out.write(text)
                written += len(text.encode())
                documents += 1
            copy += 1
    return documents


def timed_next(iterator, state: dict | None = None) -> float:
    start = time.perf_counter()
    if state is not None:
        iterator.load_state_dict(state)
    next(iterator)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=40)
    parser.add_argument("--at", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--global_batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--shuffle_buffer_size", type=int, default=10_000)
    parser.add_argument("--format", choices=["txt", "jsonl"], default="txt")
    parser.add_argument("--output", help="also write the results to this JSON file")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        tokenizer, tokenizer_name = load_tokenizer(work)
        corpus = work / f"corpus.{options.format}"
        documents = write_corpus(corpus, options.megabytes, work, options.format == "jsonl")
        args = DataArgs(train_file=str(corpus), cache_dir=str(work / "cache"), max_seq_length=options.max_seq_length,
                        streaming=True, shuffle_buffer_size=options.shuffle_buffer_size, validation_split_percentage=0)
        train = build_datasets(args, tokenizer)[0]

        def new_iterator():
            return train.iterator(options.global_batch_size, seed=0)

        results = {"format": options.format, "tokenizer": tokenizer_name,
                   "corpus_megabytes": round(corpus.stat().st_size / 1e6, 1),
                   "documents": documents, "global_batch_size": options.global_batch_size,
                   "max_seq_length": options.max_seq_length, "shuffle_buffer_size": options.shuffle_buffer_size,
                   "fresh_first_batch_s": round(timed_next(new_iterator()), 3), "resumes": []}
        print(f"fresh iterator, first batch: {results['fresh_first_batch_s']:.2f} s", flush=True)
        running = new_iterator()
        done = 0
        for k in sorted(options.at):
            for _ in range(k - done):
                next(running)
            done = k
            start = time.perf_counter()
            saved = json.dumps(running.state_dict())
            dump_s = time.perf_counter() - start
            start = time.perf_counter()
            state = json.loads(saved)
            load_s = time.perf_counter() - start
            snapshot = state["snapshot"]
            row = {"batch": k, "epoch": snapshot["epoch"], "document": snapshot["documents"],
                   "resumes_at": snapshot["where"].replace(str(work) + "/", ""),
                   "rows_since_snapshot": state["rows_since_snapshot"],
                   "state_json_megabytes": round(len(saved) / 1e6, 2),
                   "buffer_documents": len(snapshot["buffer"]) + len(snapshot["drain"] or ()),
                   "json_dump_s": round(dump_s, 3), "json_load_s": round(load_s, 3),
                   "resume_next_batch_s": round(timed_next(new_iterator(), state), 3),
                   "replay_next_batch_s": round(timed_next(new_iterator(), {"batches": k, "process_count": 1}), 3)}
            results["resumes"].append(row)
            print(f"batch {k} (epoch {row['epoch']}, document {row['document']}): resumed from the saved state "
                  f"{row['resume_next_batch_s']:.2f} s, by replay {row['replay_next_batch_s']:.2f} s; state "
                  f"{row['state_json_megabytes']} MB of JSON ({row['buffer_documents']} buffered documents, "
                  f"dump {row['json_dump_s']:.2f} s, load {row['json_load_s']:.2f} s)", flush=True)
        print(json.dumps(results))
        if options.output:
            pathlib.Path(options.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
