"""One `flax-bert finetune` run: the source model and data read, the classifier config decided, the sweep run."""
from __future__ import annotations

import itertools
import logging
import pathlib

from flax_bert.errors import InputError
from flax_bert.finetune import data as labelled
from flax_bert.finetune.metrics import METRICS, REGRESSION_METRICS, default_metric
from flax_bert.finetune.source import SourceModel, load_source
from flax_bert.finetune.sweep import Sweep, Task, prepare_output_dir
from flax_bert.finetune.trainer import ClassifierTrainer, LoopOptions, Setting

log = logging.getLogger("flax_bert")

# Options that do not change a finished seed's result: the grid, the seeds, where and how it is shown.
NOT_FIXED = ("learning_rate", "num_train_epochs", "weight_decay", "seeds", "output_dir", "overwrite_output_dir",
             "progress_bar", "token", "cache_dir", "mesh")


def data_options(args) -> labelled.DataOptions:
    return labelled.DataOptions(**{name: getattr(args, name) for name in labelled.DataOptions.__dataclass_fields__})


def chosen_metric(args, task: str) -> str:
    metric = args.metric or default_metric(task)
    if (metric in REGRESSION_METRICS) != (task == "regression"):
        raise InputError(f"--metric {metric} does not score {task}; use one of "
                         f"{', '.join(m for m in METRICS if (m in REGRESSION_METRICS) == (task == 'regression'))}")
    return metric


def _source(args) -> SourceModel:
    source = load_source(args.model)
    if not args.init_from:
        return source
    start = load_source(args.init_from)
    sizes = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    if any(getattr(start.config, k) != getattr(source.config, k) for k in sizes):
        raise InputError(f"--init_from {args.init_from} is not a fine-tuned {args.model}: "
                         + ", ".join(f"{k} {getattr(start.config, k)} vs {getattr(source.config, k)}" for k in sizes))
    log.info("starting from %s (fine-tuned from the same encoder) instead of %s", start.description, source.description)
    return start


def _classifier_config(args, source: SourceModel, task: str, id2label: tuple[str, ...]):
    config = source.config
    if args.max_seq_length > config.max_sequence_length:
        raise InputError(f"--max_seq_length {args.max_seq_length} exceeds the model's {config.max_sequence_length} "
                         "positions; pass a smaller one")
    if args.classifier_pooling and config.model_type != "modernbert":
        raise InputError("--classifier_pooling is a ModernBERT option; BERT and RoBERTa pool the first token")
    changes = dict(id2label=id2label, dtype=args.dtype, scan_layers=True, remat_policy="none",
                   problem_type="regression" if task == "regression" else "single_label_classification")
    if args.classifier_dropout is not None:
        changes["classifier_dropout"] = args.classifier_dropout
    if args.classifier_pooling:
        changes["classifier_pooling"] = args.classifier_pooling
    return config.replace(**changes)


def _read_task(args, tokenizer, type_vocab_size: int) -> tuple[Task, tuple[str, ...]]:
    options = data_options(args)
    train, validation = labelled.read_split(options, "train"), labelled.read_split(options, "validation")
    test = labelled.read_split(options, "test", required=False)
    for split in (train, validation):
        if split.labels is None:
            raise InputError(f"the {split.name} split has no labels in --label_column {args.label_column!r}")
    task = labelled.infer_task(train.labels, args.task)
    id2label = ("LABEL_0",) if task == "regression" else labelled.label_vocabulary(train, validation)
    if task == "classification" and len(id2label) < 2:
        raise InputError(f"the labels hold one class only ({id2label[0]!r}): classification needs two or more")

    def encode(split):
        return labelled.encode(split, tokenizer, args.max_seq_length, labelled.targets(split, task, id2label),
                               token_types=type_vocab_size > 1)

    log.info("%s: %d train, %d validation%s examples%s", task, len(train.texts), len(validation.texts),
             f", {len(test.texts)} test" if test else "", f"; classes {', '.join(id2label)}" if task != "regression" else "")
    return Task(task, chosen_metric(args, task), encode(train), encode(validation),
                encode(test) if test else None), id2label


def build_trainer(args, source: SourceModel, mesh) -> tuple[Task, tuple[str, ...], ClassifierTrainer]:
    """The labelled data read and tokenized, the classifier config decided, and its trainer on `mesh`."""
    import jax

    task, id2label = _read_task(args, source.tokenizer, source.config.type_vocab_size)
    config = _classifier_config(args, source, task.name, id2label)
    pad = source.tokenizer.pad_token_id if source.tokenizer.pad_token_id is not None else config.pad_token_id
    options = LoopOptions(batch_size=args.per_device_train_batch_size * jax.device_count(),
                          max_seq_length=args.max_seq_length, warmup_ratio=args.warmup_ratio,
                          max_grad_norm=args.max_grad_norm or None, adam_beta1=args.adam_beta1,
                          adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon, progress_bar=args.progress_bar)
    return task, id2label, ClassifierTrainer(config, task.name, mesh, options, pad)


def finetune(args) -> dict:
    import jax

    from flax_bert.training.sharding import make_mesh

    if jax.process_count() > 1:
        raise InputError("flax-bert finetune runs on one host (its devices all used); start it on one process")
    mesh = make_mesh(args.mesh)
    source = _source(args)
    task, id2label, trainer = build_trainer(args, source, mesh)
    fixed = {k: v for k, v in vars(args).items() if k not in NOT_FIXED}
    fixed.update(task=task.name, metric=task.metric, global_batch=trainer.options.batch_size, id2label=list(id2label))
    output_dir = pathlib.Path(args.output_dir)
    prepare_output_dir(output_dir, fixed, args.overwrite_output_dir)
    # the exported tokenizer truncates (truncation=True) to the length the classifier was fine-tuned on
    source.tokenizer.model_max_length = args.max_seq_length
    settings = [Setting(*cell) for cell in itertools.product(args.learning_rate, args.num_train_epochs, args.weight_decay)]
    log.info("fine-tuning %s from %s: %d setting(s) x %d seed(s), global batch %d on %d devices, %s compute",
             trainer.model_class.__name__, source.description, len(settings), len(args.seeds),
             trainer.options.batch_size, jax.device_count(), trainer.config.dtype)
    sweep = Sweep(output_dir, trainer, task, source.tensors, source.tokenizer,
                  fresh_mismatched_heads=bool(args.init_from))
    results = sweep.run(settings, args.seeds)
    sweep.write_test_predictions(id2label)
    return results
