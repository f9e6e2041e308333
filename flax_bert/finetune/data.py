"""Labelled texts for fine-tuning: read from csv/tsv/jsonl/parquet files or a hub dataset, the task inferred
from the labels, tokenized as single texts or pairs, and cut into batches of similar length (little padding)."""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import pathlib

import numpy as np

from flax_bert.errors import InputError, InputFileNotFoundError

log = logging.getLogger("flax_bert")

TASKS = ("classification", "regression")
FILE_READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
LENGTH_STEP = 16      # padded lengths are multiples of this: a few compiled shapes, little padding
SORT_WINDOW = 64      # training: batches are cut from windows of this many batches sorted by length


class LabelError(InputError):
    """Labels that do not fit the task (or each other)."""


@dataclasses.dataclass
class DataOptions:
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str | None = None
    text_column: str = "sentence"
    text_pair_column: str | None = None
    label_column: str = "label"
    cache_dir: str | None = None
    token: str | None = None


@dataclasses.dataclass
class Split:
    """One split's texts and labels as read (labels None when the split has none, as GLUE's test sets)."""

    name: str
    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray | None
    label_names: tuple[str, ...] | None = None  # a hub ClassLabel's names


@dataclasses.dataclass
class Encoded:
    """Token ids per example, labels as model targets (class index or float)."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray | None

    def __len__(self):
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.input_ids])


# ----------------------------------------------------------------------------- reading
def _read_file(path: str, options: DataOptions, role: str) -> dict[str, list]:
    import pandas as pd

    file = pathlib.Path(path)
    kind = FILE_READERS.get(file.suffix.lower())
    if kind is None:
        raise InputError(f"--{role}_file {path}: unknown format {file.suffix!r}; use one of {', '.join(FILE_READERS)}")
    if not file.is_file():
        raise InputFileNotFoundError(f"--{role}_file {path} does not exist")
    if kind == "csv":
        frame = pd.read_csv(file, keep_default_na=False)
    elif kind == "tsv":  # GLUE's tsv files: no quoting, quotes are text
        frame = pd.read_csv(file, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    elif kind == "json":
        frame = pd.read_json(file, lines=file.suffix.lower() == ".jsonl" or _looks_like_lines(file))
    else:
        frame = pd.read_parquet(file)
    return {column: frame[column].tolist() if frame[column].dtype == object else frame[column].to_numpy()
            for column in frame.columns}


def _looks_like_lines(file: pathlib.Path) -> bool:
    with open(file, encoding="utf-8") as handle:
        return handle.read(1) == "{"


def _read_hub(options: DataOptions, split: str) -> tuple[dict, tuple[str, ...] | None]:
    import datasets

    try:
        dataset = datasets.load_dataset(options.dataset_name, options.dataset_config_name, split=split,
                                        cache_dir=options.cache_dir, token=options.token)
    except Exception as err:  # offline, unknown name, config or split
        raise InputError(f"could not load split {split!r} of the hub dataset {options.dataset_name!r}"
                         f"{f' ({options.dataset_config_name})' if options.dataset_config_name else ''}: "
                         f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from None
    feature = dataset.features.get(options.label_column)
    names = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return {column: dataset[column] for column in dataset.column_names}, names


def read_split(options: DataOptions, role: str, required: bool = True) -> Split | None:
    """The `role` split ("train", "validation", "test") from its file or the hub dataset; None when not given."""
    path = getattr(options, f"{role}_file")
    if path:
        columns, names = _read_file(path, options, role), None
        source = path
    elif options.dataset_name and (role != "test" or options.test_split):
        split = getattr(options, f"{role}_split")
        columns, names = _read_hub(options, split)
        source = f"{options.dataset_name}[{split}]"
    elif required:
        raise InputError(f"no {role} data: pass --{role}_file FILE, or --dataset_name NAME (with --dataset_config_name)")
    else:
        return None
    for flag in ("text_column", "text_pair_column") + (("label_column",) if role != "test" else ()):
        column = getattr(options, flag)
        if column is not None and column not in columns:
            raise InputError(f"{source} has no column {column!r} (--{flag}); its columns are {', '.join(map(str, columns))}")
    labels = columns.get(options.label_column)
    labels = None if labels is None else np.asarray(labels)
    if labels is not None and labels.dtype.kind in "iu" and np.all(labels == -1):
        labels = None  # GLUE's test splits: -1 everywhere, no labels
    pairs = None if options.text_pair_column is None else [str(t) for t in columns[options.text_pair_column]]
    return Split(role, [str(t) for t in columns[options.text_column]], pairs, labels, names)


# ----------------------------------------------------------------------------- labels
def infer_task(labels: np.ndarray, given: str | None) -> str:
    """Integers, booleans and strings are classes; floats are regression targets."""
    inferred = "regression" if labels.dtype.kind == "f" else "classification"
    if given is None:
        log.info("task: %s (inferred from the %s labels; --task sets it)", inferred,
                 "floating-point" if inferred == "regression" else "integer or string")
        return inferred
    if given == "regression" and inferred == "classification" and labels.dtype.kind not in "iub":
        raise LabelError(f"--task regression needs numeric labels; these are {labels.dtype} (e.g. {labels[0]!r})")
    if given == "classification" and inferred == "regression" and not np.all(labels == np.round(labels)):
        raise LabelError(f"--task classification needs class labels; {labels[~(labels == np.round(labels))][0]} "
                         "is not a class: drop --task to fine-tune for regression")
    return given


def label_vocabulary(train: Split, validation: Split) -> tuple[str, ...]:
    """Class names in index order: a hub ClassLabel's names, else the sorted distinct labels of train and validation."""
    if train.label_names:
        return train.label_names
    values = np.concatenate([train.labels, validation.labels])
    if values.dtype.kind == "f":
        values = values.astype(np.int64)
    return tuple(str(v) for v in sorted(set(values.tolist())))


def targets(split: Split, task: str, id2label: tuple[str, ...]) -> np.ndarray | None:
    if split.labels is None:
        return None
    if task == "regression":
        return split.labels.astype(np.float32)
    if split.label_names:
        return split.labels.astype(np.int32)
    values = split.labels.astype(np.int64) if split.labels.dtype.kind == "f" else split.labels
    index = {name: i for i, name in enumerate(id2label)}
    unknown = sorted({str(v) for v in values.tolist()} - set(index))
    if unknown:
        raise LabelError(f"the {split.name} split has labels {unknown[:5]} that the model's classes "
                         f"{list(id2label)[:10]} do not include")
    return np.array([index[str(v)] for v in values.tolist()], dtype=np.int32)


# ----------------------------------------------------------------------------- tokens and batches
def encode(split: Split, tokenizer, max_seq_length: int, target: np.ndarray | None, token_types: bool) -> Encoded:
    """`token_types`: keep the tokenizer's segment ids (a model with one token type, as RoBERTa, has no row for a
    second segment: a BERT tokenizer's 1s would index past its table)."""
    out = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_seq_length)
    types = out.get("token_type_ids") if token_types else None
    return Encoded([np.asarray(ids, np.int32) for ids in out["input_ids"]],
                   None if types is None else [np.asarray(t, np.int32) for t in types], target)


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Example indices per batch. Evaluation (no `rng`): sorted by length. Training: shuffled, then sorted by
    length within windows of SORT_WINDOW batches, and the batches shuffled, so each batch is near one length
    but the order stays random."""
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(len(lengths))
    window = batch_size * SORT_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(data: Encoded, indices: np.ndarray, batch_size: int, pad_token_id: int, max_seq_length: int) -> dict:
    """Rows `indices` padded to the next multiple of LENGTH_STEP (at most max_seq_length); a short batch is filled
    with empty rows of weight 0, so every batch has `batch_size` rows."""
    longest = max(len(data.input_ids[i]) for i in indices)
    length = min(max_seq_length, math.ceil(longest / LENGTH_STEP) * LENGTH_STEP)
    input_ids = np.full((batch_size, length), pad_token_id, np.int32)
    attention_mask = np.zeros((batch_size, length), np.int32)
    token_type_ids = np.zeros((batch_size, length), np.int32)
    for row, i in enumerate(indices):
        ids = data.input_ids[i]
        input_ids[row, :len(ids)], attention_mask[row, :len(ids)] = ids, 1
        if data.token_type_ids is not None:
            token_type_ids[row, :len(ids)] = data.token_type_ids[i]
    attention_mask[len(indices):, 0] = 1  # filler rows see one token, so no softmax is over nothing
    weights = np.zeros((batch_size,), np.float32)
    weights[:len(indices)] = 1.0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
             "weights": weights}
    if data.labels is not None:
        labels = np.zeros((batch_size,), data.labels.dtype)
        labels[:len(indices)] = data.labels[indices]
        batch["labels"] = labels
    return batch
