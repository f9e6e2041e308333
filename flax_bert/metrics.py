"""Where training metrics are written (the peak FLOP/s that MFU divides by: `peak_flops`)."""
from __future__ import annotations

import json
import pathlib


class MetricsWriter:
    """One JSON object per line in OUTPUT_DIR/metrics.jsonl, and TensorBoard event files (process 0 only)."""

    def __init__(self, output_dir: str | pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(output_dir) / "metrics.jsonl"
        self._tensorboard = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self._tensorboard = SummaryWriter(str(pathlib.Path(output_dir) / "tensorboard"))
            except ImportError:  # metrics.jsonl still has everything
                pass

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _plain(value):
    try:
        return float(value) if not isinstance(value, (str, bool, int)) else value
    except (TypeError, ValueError):
        return str(value)


def read_metrics(output_dir: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {output_dir}: is it a flax-bert run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
