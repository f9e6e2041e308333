"""Where training metrics are written (the peak FLOP/s that MFU divides by: `peak_flops`)."""
from __future__ import annotations

import json
import pathlib
import shutil
import sys

from flax_bert import storage
from flax_bert.errors import InputFileNotFoundError


class MetricsWriter:
    """One JSON object per line in OUTPUT_DIR/metrics.jsonl, and TensorBoard event files (process 0 only).

    With --output_dir on a URL both are written in a local folder and uploaded after every write: object
    stores cannot append, and tensorboardX writes only local files (and gs:// with google-cloud-storage)."""

    def __init__(self, output_dir, enabled: bool = True):
        self.enabled = enabled
        self.output_dir = output_dir
        self._stage = storage.local_stage(output_dir) if enabled and storage.is_url(output_dir) else None
        local_dir = self._stage or pathlib.Path(output_dir)
        self.path = local_dir / "metrics.jsonl"
        if self._stage is not None and storage.isfile(storage.join(output_dir, "metrics.jsonl")):
            # a resumed run appends to what the earlier runs wrote
            self.path.write_bytes(storage.read_bytes(storage.join(output_dir, "metrics.jsonl")))
        self._tensorboard = None
        if enabled:
            try:
                self._tensorboard = _summary_writer_class()(str(local_dir / "tensorboard"))
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
        if self._stage is not None:
            storage.upload(self._stage, self.output_dir)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._stage is not None:
            storage.upload(self._stage, self.output_dir)
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None


def _summary_writer_class():
    """tensorboardX's SummaryWriter. Its module imports PyTorch when installed, only to accept torch tensors,
    which a run never passes (1-1.6 s of every start on a 2-core CPU): unless PyTorch is already loaded, that
    import fails for the moment tensorboardX loads (a None entry in sys.modules makes `import torch` raise
    ImportError, which tensorboardX handles) and the entry is removed again at once."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


def _plain(value):
    try:
        return float(value) if not isinstance(value, (str, bool, int)) else value
    except (TypeError, ValueError):
        return str(value)


def read_metrics(output_dir) -> list[dict]:
    path = storage.join(output_dir, "metrics.jsonl")
    if not storage.isfile(path):
        raise InputFileNotFoundError(f"no metrics.jsonl in {output_dir}: is it a flax-bert run directory?")
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
