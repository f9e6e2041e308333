"""The run directory's layout: the names a run writes at the top of its output_dir, and where its complete
checkpoints are.

OUTPUT_DIR/checkpoints/STEP is a complete bundle (see flax_bert.run.checkpoint): Orbax writes into
STEP.orbax-checkpoint-tmp-* and renames the folder once every item is written, so a bare step number is whole.
"""
from __future__ import annotations

import orbax.checkpoint as ocp
from etils import epath

from flax_bert import storage
from flax_bert.errors import InputFileNotFoundError

RUN_CONFIG_FILE = "run_config.json"
CHECKPOINTS, DAMAGED, SUPERSEDED = "checkpoints", "checkpoints_damaged", "checkpoints_superseded"
WRITTEN_RECORD = ".flax-bert-written.json"  # the top-level names this tool created in an output_dir
EVALUATION_FILE = "flax_bert_evaluation.json"  # in an export: the options its run evaluated with (run.options)

# What a run writes at the top of its output_dir. --overwrite_output_dir deletes those of them that the
# output_dir's WRITTEN_RECORD says this tool created, and nothing else.
OWNED_ENTRIES = frozenset({
    CHECKPOINTS, DAMAGED, SUPERSEDED, RUN_CONFIG_FILE, f".{RUN_CONFIG_FILE}.tmp", WRITTEN_RECORD,
    f"{WRITTEN_RECORD}.tmp", "metrics.jsonl", "tensorboard",
    "eval_results.json", ".eval_results.json.tmp", "tokenizer", "curves.png",
    # the exported Hugging Face model (written at the end of training), with the settings of its evaluation
    "config.json", "model.safetensors", "README.md", EVALUATION_FILE, "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt"})

def complete_steps(directory) -> list[int]:
    """Steps of the finished bundles in a checkpoints/ folder (tmp folders of unfinished saves excluded)."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(m.step for m in ocp.path.step.standard_name_format().find_all(directory))


def orbax_path(path) -> epath.Path:
    """A URL as Orbax writes it (flax_bert.storage.checkpoint_path: file:// as its local path, gs:// and s3://
    natively, others refused); a local path as given."""
    return storage.checkpoint_path(path) if storage.is_url(path) else epath.Path(path)


def locate_checkpoints(path) -> tuple[epath.Path, int | None]:
    """(checkpoints folder, step or None) for a run directory, a checkpoints/ folder or a checkpoints/STEP folder."""
    path = orbax_path(path)
    if path.name.isdigit() and int(path.name) in complete_steps(path.parent):
        return path.parent, int(path.name)
    if ".orbax-checkpoint-tmp" in path.name:
        raise InputFileNotFoundError(f"{path} is a checkpoint that never finished writing; pass its run "
                                     "directory instead")
    for directory in (path / CHECKPOINTS, path):
        if complete_steps(directory):
            return directory, None
    raise InputFileNotFoundError(f"{path} holds no complete checkpoint: pass a run's --output_dir, its checkpoints/ "
                                 "folder or one checkpoints/STEP folder")
