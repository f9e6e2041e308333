"""Plot tokens/s (JAX beside PyTorch) and MFU by configuration from `flax-bert bench --output` files,
and print the Markdown table of docs/benchmarks.md.

    python benchmarks/plot_benchmarks.py benchmarks/results docs/benchmarks.png

Every JSON file in the folder is one run; its name up to the first `.` is the configuration, so
repeated runs (`roberta-base-b8.1.json`, `roberta-base-b8.2.json`) are one bar showing the median
with the range of the repeats as an error bar. Runs during which other processes took more than
10% of the host's CPU (`host_other_load`, either framework) are left out and listed.
"""
from __future__ import annotations

import collections
import json
import pathlib
import re
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MAX_OTHER_LOAD = 0.10


def natural_key(file: pathlib.Path):
    """roberta-base-b8 before roberta-base-b32: numbers compare as numbers."""
    config, _, repeat = file.name.partition(".")
    return [[(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text)] for text in (config, repeat)]


def disturbed(run: dict) -> bool:
    return any((run.get(k) or 0) > MAX_OTHER_LOAD for k in ("host_other_load", "torch_host_other_load"))


def load_runs(folder: pathlib.Path) -> tuple[dict[str, list[dict]], list[str]]:
    """(configuration -> undisturbed runs, names of the disturbed files left out)."""
    runs, left_out = collections.defaultdict(list), []
    for file in sorted(folder.glob("*.json"), key=natural_key):
        run = json.loads(file.read_text())
        if disturbed(run):
            left_out.append(file.name)
        else:
            runs[file.name.split(".")[0]].append(run)
    if not runs:
        raise FileNotFoundError(f"no undisturbed bench results (*.json) in {folder}: run benchmarks/run_benchmarks.sh")
    return dict(runs), left_out


def cell(runs: list[dict], key: str, scale: float = 1.0, digits: int = 0) -> str:
    """Median, and the range when the repeats differ: `205 (198-206)`."""
    values = sorted(r[key] * scale for r in runs if r.get(key) is not None)
    if not values:
        return "-"
    mid = statistics.median(values)
    text = f"{mid:.{digits}f}"
    if len(values) > 1 and f"{values[0]:.{digits}f}" != f"{values[-1]:.{digits}f}":
        text += f" ({values[0]:.{digits}f}-{values[-1]:.{digits}f})"
    return text


def markdown_table(runs: dict[str, list[dict]]) -> str:
    gib = 1 / 2 ** 30
    lines = [("| configuration | runs | JAX tokens/s | PyTorch tokens/s | JAX/PyTorch | JAX MFU % | PyTorch MFU % "
              "| JAX compile s | JAX peak RSS GiB | PyTorch peak RSS GiB | matmul peak GFLOP/s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, group in runs.items():
        lines.append(" | ".join([
            f"| {name}", str(len(group)), cell(group, "tokens_per_second"), cell(group, "torch_tokens_per_second"),
            cell(group, "speedup_vs_torch", digits=2), cell(group, "mfu", 100, 1), cell(group, "torch_mfu", 100, 1),
            cell(group, "compile_seconds", digits=1), cell(group, "peak_memory_bytes", gib, 2),
            cell(group, "torch_peak_memory_bytes", gib, 2), cell(group, "matmul_peak_flops", 1e-9)]) + " |")
    return "\n".join(lines)


def median_and_range(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return None, (0.0, 0.0)
    mid = statistics.median(values)
    return mid, (mid - min(values), max(values) - mid)


def plot(runs: dict[str, list[dict]], out: pathlib.Path) -> None:
    names = list(runs)
    fig, (ax_tps, ax_mfu) = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.38
    for offset, prefix, label, color in ((-width / 2, "", "JAX (flax-bert)", "tab:blue"),
                                         (width / 2, "torch_", "PyTorch (transformers)", "tab:orange")):
        for metric_ax, key, scale in ((ax_tps, "tokens_per_second", 1.0), (ax_mfu, "mfu", 100.0)):
            xs, ys, errs = [], [[], []], []
            for i, name in enumerate(names):
                mid, (low, high) = median_and_range(runs[name], prefix + key)
                if mid is None:
                    continue
                xs.append(i + offset)
                errs.append(mid * scale)
                ys[0].append(low * scale)
                ys[1].append(high * scale)
            if xs:
                bars = metric_ax.bar(xs, errs, width, yerr=ys, capsize=3, label=label, color=color)
                metric_ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    for ax, title in ((ax_tps, "tokens/s (non-pad, median of repeats; bars: range)"),
                      (ax_mfu, ("MFU % of the measured matmul peak (FLOPs each model runs:\n"
                                "JAX head on the 15% masked tokens, PyTorch on all)"))):
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    ax_tps.set_yscale("log")
    ax_tps.legend(fontsize=8)
    device = next(iter(runs.values()))[0].get("device", "")
    dtype = next(iter(runs.values()))[0].get("dtype", "")
    fig.suptitle(f"flax-bert bench: one {dtype} train step (masking, forward, backward, AdamW) on {device}", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = pathlib.Path(argv[0] if argv else "benchmarks/results")
    out = pathlib.Path(argv[1] if len(argv) > 1 else "docs/benchmarks.png")
    runs, left_out = load_runs(folder)
    plot(runs, out)
    print(markdown_table(runs))
    if left_out:
        print(f"\nleft out (other processes took > {MAX_OTHER_LOAD:.0%} of the CPU): {', '.join(left_out)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
