"""Where a CPU train step's time goes, from a `flax-bert bench --profile_dir` trace.

    python benchmarks/trace_summary.py PROFILE_DIR --steps N [--hlo DUMP/...cpu_after_optimizations.txt]

Sums the duration of every XLA op (thunk) in the trace per step. With `--hlo` (the optimized HLO
that `XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text` writes), each op is also put in a
phase by its JAX source path: masking, encoder forward/backward, embeddings+head+loss
forward/backward, optimizer; and matmuls (ynn/dot fusions) are told apart from the rest.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re

WRAPPERS = ("ThunkExecutor", "SlinkyThreadPool", "$", "PjRt", "TfrtCpu")


def load_events(profile_dir):
    files = sorted(glob.glob(os.path.join(profile_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {profile_dir}: pass the bench's --profile_dir")
    with gzip.open(files[-1]) as trace:
        return json.load(trace)["traceEvents"]


def op_phases(hlo_file):
    """HLO instruction name -> phase, from the op_name metadata JAX attaches."""
    phases = {}
    pattern = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"')
    for line in pathlib.Path(hlo_file).read_text().splitlines():
        match = pattern.match(line)
        if match:
            phases[match.group(1)] = phase_of(match.group(2))
    return phases


def phase_of(op_name):
    if "mask_tokens" in op_name or "_mask_row" in op_name or op_name.startswith("jit(_train_step)/vmap"):
        return "masking"
    backward = "transpose(" in op_name
    if "jvp(" in op_name or backward:
        where = "encoder layers" if "/while/" in op_name else "embeddings+head+loss"
        return f"{where} {'backward' if backward else 'forward'}"
    return "optimizer+clipping+metrics"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile_dir")
    parser.add_argument("--steps", type=int, default=1, help="timed steps in the trace (to report per step)")
    parser.add_argument("--hlo", help="optimized HLO text of the train step, to group ops by phase")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    per_op, calls = collections.Counter(), collections.Counter()
    for e in load_events(args.profile_dir):
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(WRAPPERS):
            per_op[name] += e["dur"] / 1e6 / args.steps
            calls[name] += 1 / args.steps
    total = sum(per_op.values())
    print(f"XLA op time per step: {total:.2f} s")

    def is_matmul(name):
        return name.startswith(("ynn_fusion", "dot", "xnn_fusion", "onednn"))

    matmul = sum(s for n, s in per_op.items() if is_matmul(n))
    print(f"  matmuls {matmul:.2f} s ({matmul / total:.0%}), everything else {total - matmul:.2f} s")
    if args.hlo:
        phases = op_phases(args.hlo)
        by_phase = collections.defaultdict(lambda: [0.0, 0.0])
        for name, seconds in per_op.items():
            phase = phases.get(name) or ("zero-fill of scan buffers" if name.startswith("wrapped_broadcast") else "other")
            by_phase[phase][0 if is_matmul(name) else 1] += seconds
        print(f"  {'phase':<36}{'matmul s':>10}{'other s':>10}{'share':>8}")
        for phase, (mm, other) in sorted(by_phase.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {phase:<36}{mm:>10.2f}{other:>10.2f}{(mm + other) / total:>8.0%}")
    kinds = collections.Counter()
    for name, seconds in per_op.items():
        kinds[re.sub(r"\.\d+$", "", name)] += seconds
    print("by op kind:")
    for kind, seconds in kinds.most_common(args.top):
        print(f"  {kind:<44}{seconds:8.3f} s {seconds / total:6.1%}")


if __name__ == "__main__":
    main()
