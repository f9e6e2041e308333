"""The table of docs/tpu.md: for each shipped config and TPU chip, the largest per-device batch whose train step
fits one chip's HBM, without and with remat (`--remat_policy full`), found by compiling the real train step for a
4-chip slice (`flax_bert.tpu_compile.find_batch`; compile only, needs libtpu: pip install "flax-bert[tpu]").

    python benchmarks/compile_table.py --configs roberta-base bert-base --chips v5e --json table.json

A cell takes three to ten compiles (find_batch follows the line of bytes against rows, which is not quite straight),
minutes each on a small machine: results go into --json as they come, and a second run skips the cells already there. Each cell is exact
(--precision 0: one row more does not fit); the gradient accumulation is 1 (accumulation adds one gradient buffer,
not activations). `benchmarks/results/compile_table.json` holds the cells measured for docs/tpu.md; print its table with

    python benchmarks/compile_table.py --json benchmarks/results/compile_table.json --print_only
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from flax_bert import tpu_compile  # noqa: E402

CHIPS = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
CONFIGS = ("bert-base", "bert-large", "roberta-base", "roberta-large", "modernbert-base", "modernbert-large")


def cell(config: str, topology: str, remat: str, precision: float, start: int, limit: int) -> int:
    _, run = tpu_compile.parse([config, "--topology", topology, "--no_eval"])
    run = dataclasses.replace(run, remat_policy=remat, gradient_accumulation_steps=1)

    def heard(batch, report):
        print(f"    {config} {topology} remat {remat}: {batch} rows {'fit' if report.fits else 'do not fit'} "
              f"({report.train.total / 2 ** 30:.2f} of {report.hbm / 2 ** 30:.2f} GiB)", flush=True)

    return tpu_compile.find_batch(run, topology, precision=precision, start=start, limit=limit, on_try=heard)


def markdown(results: dict) -> str:
    lines = ["| config | tokens | " + " | ".join(f"{chip} (no remat / remat full)" for chip in CHIPS) + " |",
             "|---|---|" + "---|" * len(CHIPS)]
    for config in CONFIGS:
        row = [results.get(f"{config}|{chip}|{remat}") for chip in CHIPS for remat in ("none", "full")]
        if not any(value is not None for value in row):
            continue
        length = results.get(f"{config}|tokens", "")
        # "-": a cell not compiled yet
        cells = [f"{'-' if a is None else a} / {'-' if b is None else b}" for a, b in zip(row[::2], row[1::2])]
        lines.append(f"| {config} | {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--chips", nargs="+", default=list(CHIPS), choices=list(CHIPS))
    parser.add_argument("--remat", nargs="+", default=["none", "full"], choices=["none", "full"])
    parser.add_argument("--precision", type=float, default=0.0)
    parser.add_argument("--start", type=int, default=8, help="the first batch tried")
    parser.add_argument("--limit", type=int, default=tpu_compile.FIND_BATCH_LIMIT,
                        help="the largest batch tried (a cell at it reads >=)")
    parser.add_argument("--json", default="compile_table.json", help="results so far (read and extended)")
    parser.add_argument("--print_only", action="store_true", help="print the table of --json, compile nothing")
    args = parser.parse_args()
    path = pathlib.Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {}
    for config in [] if args.print_only else args.configs:
        results[f"{config}|tokens"] = tpu_compile.parse([config, "--topology", "v5e:2x2"])[1].max_seq_length
        for chip in args.chips:
            for remat in args.remat:
                key = f"{config}|{chip}|{remat}"
                if key not in results:
                    best = cell(config, CHIPS[chip], remat, args.precision, args.start, args.limit)
                    results[key] = f">={best}" if best == args.limit else best
                    path.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
