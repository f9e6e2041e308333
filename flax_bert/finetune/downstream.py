"""A downstream score for a model in memory (a pretraining run's current parameters): a copy fine-tuned on a small
task described by a YAML file of `flax-bert finetune` options, its validation score averaged over the seeds.

TASK.yaml holds finetune's options by name, e.g.

    train_file: rte_train.jsonl
    validation_file: rte_validation.jsonl
    text_column: sentence1
    text_pair_column: sentence2
    learning_rate: 3.0e-5
    num_train_epochs: 3
    seeds: [1, 2]

One setting only (no comma lists); nothing is written to disk.
"""
from __future__ import annotations

import logging
import pathlib

import numpy as np

from flax_bert.errors import InputError, InputFileNotFoundError
from flax_bert.finetune.command import build_parser, check_options
from flax_bert.finetune.metrics import score
from flax_bert.finetune.run import build_trainer
from flax_bert.finetune.source import SourceModel
from flax_bert.finetune.trainer import Setting

log = logging.getLogger("flax_bert")

# the running job decides these; a token does not belong in a file
NOT_IN_A_TASK_FILE = ("model", "output_dir", "overwrite_output_dir", "init_from", "test_file", "test_split", "mesh",
                      "token", "progress_bar")


def load_task(task_file) -> object:
    """The task file's options as finetune's parsed arguments; an unknown or misspelled key is refused."""
    import yaml

    path = pathlib.Path(task_file)
    if not path.is_file():
        raise InputFileNotFoundError(f"no downstream task file {path}")
    options = yaml.safe_load(path.read_text()) or {}
    if not isinstance(options, dict):
        raise InputError(f"{path} must hold finetune options by name (train_file: ..., validation_file: ...)")
    parser = build_parser()
    known = {action.dest for action in parser._actions} - set(NOT_IN_A_TASK_FILE) - {"help"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"{path}: unknown option(s) {', '.join(unknown)}; a task file takes {', '.join(sorted(known))}")
    argv = ["-", "--output_dir", "-"]
    for name, value in options.items():
        argv += [f"--{name}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        raise InputError(f"{path}: an option's value is not valid (the line above says which)") from None
    check_options(args)
    if max(len(args.learning_rate), len(args.num_train_epochs), len(args.weight_decay)) > 1:
        raise InputError(f"{path}: a downstream task runs one setting; give single values, not lists")
    return args


def downstream_score(model, tokenizer, task_file, mesh) -> dict[str, float]:
    """Fine-tune copies of `model`'s encoder (a masked-LM NNX model) on the task from each of its seeds;
    {"downstream_METRIC": mean, "downstream_METRIC_std": spread} on its validation split."""
    from flax_bert.models.convert import to_hf_tensors

    args = load_task(task_file)
    args.progress_bar = False  # a line per tenth of the steps inside another run's log would drown it
    source = SourceModel(model.config, to_hf_tensors(model), tokenizer, "the model being pretrained")
    task, _, trainer = build_trainer(args, source, mesh)
    setting = Setting(args.learning_rate[0], args.num_train_epochs[0], args.weight_decay[0])
    values = []
    for seed in args.seeds:
        params = trainer.fit(trainer.initial_params(source.tensors, seed, False), task.train, setting, seed,
                             label="downstream")
        values.append(score(task.name, trainer.outputs(params, task.validation), task.validation.labels)[task.metric])
    name = f"downstream_{task.metric}"
    return {name: float(np.mean(values)), f"{name}_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
