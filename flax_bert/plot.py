"""`flax-bert plot RUN_DIR`: training curves from metrics.jsonl to a PNG."""
from __future__ import annotations

import io
import logging
import pathlib

from flax_bert import storage
from flax_bert.training.metrics import read_metrics

PANELS = (("loss", ("train_loss", "eval_loss")), ("MLM accuracy", ("mlm_accuracy", "eval_accuracy")),
          ("learning rate", ("learning_rate",)), ("tokens/s", ("tokens_per_second",)))


def plot_run(run_dir: str, output: str | None = None):
    # its first use builds a font cache and says so at INFO, which our INFO log would show after every run
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    figure, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for axis, (title, names) in zip(axes, PANELS):
        for name in names:
            points = [(r["step"], r[name]) for r in records if name in r]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=name)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.suptitle(storage.name(run_dir) if storage.is_url(run_dir) else str(pathlib.Path(run_dir).resolve().name))
    figure.tight_layout()
    path = output or storage.join(run_dir, "curves.png")
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    plt.close(figure)
    if output is None:
        from flax_bert.run.start import claim_written

        claim_written(run_dir, "curves.png")
    storage.write_bytes(path, png.getvalue())  # a local path or a URL
    return pathlib.Path(path) if not storage.is_url(path) else path
