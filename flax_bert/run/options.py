"""A run directory knows its own options: what continuing, evaluating or exporting it takes from the run's
stored configuration, and which options may change when a run is continued.

`reconcile_with_stored(run)` is called right after parsing, before any tokenizer, data or compile:
  * options the command line (or YAML file) did not set are taken from the stored configuration (the
    run's `run_config.json`, else the run configuration saved in its newest checkpoint, which is all a
    directory made by `flax-bert import` has), so `flax-bert eval RUN_DIR` needs no other option;
  * options it set that differ from the stored ones are either accepted with a log line (MUTABLE: they
    change how the run goes on, not what it is) or refused with one line (IMMUTABLE: they fix the
    model's shapes, the tokenizer, which rows are read in which order, the masks, the objective or the
    optimizer's state).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib

from flax_bert.run.config import EXPLICIT, MIXTURE_EXCLUDES, RunConfig, RunConfigError
from flax_bert.run.layout import EVALUATION_FILE, RUN_CONFIG_FILE, complete_steps, locate_checkpoints

log = logging.getLogger("flax_bert")

# Never taken from the stored configuration: what this command does, where, and on which machines.
PER_COMMAND = frozenset({
    "do_train", "do_eval", "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "push_to_hub",
    "hub_model_id", "hub_token", "hub_private_repo", "hub_revision_steps", "token", "use_auth_token", "coordinator_address",
    "num_processes", "process_id", "progress_bar", "cache_dir", "preprocessing_num_workers", "overwrite_cache",
    "gradient_checkpointing", "adafactor", "train_ref_file", "validation_ref_file", "pad_to_max_length",
    "use_fast_tokenizer", "trust_remote_code", "reset_optimizer", "downstream_eval", "downstream_eval_steps"})

# Options that may not change when a run is continued: the model's shapes, the tokenizer, the data and
# its order, the masks, the objective, and the optimizer (whose state the checkpoint holds).
IMMUTABLE = {
    "model_type": "the model's family", "config_name": "the model's shapes", "vocab_size": "the model's shapes",
    "hidden_size": "the model's shapes", "num_hidden_layers": "the model's shapes",
    "num_attention_heads": "the model's shapes", "intermediate_size": "the model's shapes",
    "max_position_embeddings": "the model's shapes", "local_attention": "the model's attention window",
    "global_attn_every_n_layers": "which layers attend globally", "model_name_or_path": "the starting weights and tokenizer",
    "tokenizer_name": "the tokenizer", "tokenizer_vocab_size": "the tokenizer",
    "dataset_name": "the training data", "dataset_config_name": "the training data",
    "train_file": "the training data", "text_column": "the training data",
    "validation_split_percentage": "which documents are trained on", "max_train_samples": "the training data",
    "streaming": "how the data is read", "blank_line_documents": "what a document is",
    "max_seq_length": "the rows", "line_by_line": "the rows", "data_shards": "the order of the rows",
    "mlm_probability": "the masks", "whole_word_masking": "the masks", "seed": "the data order and masks",
    "objective": "the objective and its head", "optimizer": "the optimizer state in the checkpoint",
    "train_sources": "the training data (a source's weight may change)",
}
# Refused unless --reset_optimizer starts a fresh optimizer state.
OPTIMIZER_STATE = frozenset({"optimizer"})

# What `flax-bert import` decides (the model, its objective, the optimizer state its checkpoint holds): the
# options a run directory it made stores. The data, rows and masks are left to its first training run.
IMPORTED = ("model_type", "model_name_or_path", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "intermediate_size", "max_position_embeddings", "objective", "optimizer",
            "max_grad_norm")

# Stored as None (the default, resolved when the run started) they are decided by the data state the
# checkpoint holds, which refuses another value in one line ("resume with --data_shards 16"): a continuing
# run may then name the value.
DECIDED_BY_THE_CHECKPOINT = frozenset({"data_shards"})

# What an evaluation scores: the validation rows (their data, documents, length, layout) and the masks (rate,
# whole words). An export carries them (EVALUATION_FILE), so that evaluating it scores what its run did.
EVALUATION_SETTINGS = ("dataset_name", "dataset_config_name", "train_file", "train_sources", "validation_file", "text_column",
                       "validation_split_percentage", "max_eval_samples", "blank_line_documents", "skip_invalid_utf8",
                       "max_seq_length", "line_by_line", "streaming", "mlm_probability", "eval_mlm_probability",
                       "whole_word_masking", "seed")


def evaluation_settings(run: dict) -> dict:
    """The options of a run (its to_dict()) that its evaluation scores with (EVALUATION_SETTINGS)."""
    return {"options": {name: run[name] for name in EVALUATION_SETTINGS if name in run}}


class StoredOptionError(RunConfigError):
    """An option that may not change differs from the run directory's stored configuration."""


def mutable_options() -> list[str]:
    """Every option that may change when a run is continued (listed in the docs)."""
    return [f.name for f in dataclasses.fields(RunConfig)
            if f.name not in IMMUTABLE and f.name not in PER_COMMAND and f.name != "max_grad_norm"]


def stored_options(output_dir, resume_from_checkpoint: str | None = None) -> tuple[dict | None, str]:
    """(the stored run options, where they came from) of the run that --output_dir (or else
    --resume_from_checkpoint) continues; (None, "") for a new run."""
    from flax_bert import storage
    out = (output_dir if storage.is_url(output_dir) else pathlib.Path(output_dir)) if output_dir else None
    if out is not None and storage.isfile(storage.join(out, RUN_CONFIG_FILE)):
        try:
            stored = json.loads(storage.read_text(storage.join(out, RUN_CONFIG_FILE)))
        except ValueError:
            return None, ""  # the output-directory guard reports a run_config.json it cannot read
        return (stored, str(storage.join(out, RUN_CONFIG_FILE))) if isinstance(stored, dict) else (None, "")
    for source in ([out] if out is not None else []) + ([resume_from_checkpoint if storage.is_url(resume_from_checkpoint)
                                                        else pathlib.Path(resume_from_checkpoint)]
                                                       if resume_from_checkpoint else []):
        bundle, path = newest_bundle_config(source)
        if bundle is not None:
            return dict(bundle.get("run") or {}), path
    return None, ""


def newest_bundle_config(path) -> tuple[dict | None, str]:
    """The `config` item ({"run": ..., "model": ...}) of the newest complete checkpoint under `path` (a run
    directory, its checkpoints/ folder or one checkpoints/STEP folder), or (None, "")."""
    try:
        directory, step = locate_checkpoints(path)
    except FileNotFoundError:
        return None, ""
    step = complete_steps(directory)[-1] if step is None else step
    return bundle_config(directory / str(step)), str(directory / str(step))


def bundle_config(step_dir) -> dict | None:
    from flax_bert.run.checkpoint_restore import read_json_item

    try:
        return dict(read_json_item(f"{step_dir}/config"))
    except Exception:  # noqa: BLE001 - an unreadable bundle is the checkpoint reader's to report
        return None


def fixed_options(reset_optimizer: bool) -> list[str]:
    """The options a continued run keeps: IMMUTABLE, less the optimizer's when its state is reset."""
    return [name for name in IMMUTABLE if not (reset_optimizer and name in OPTIMIZER_STATE)]


def same_setting(old, new) -> bool:
    """Equal, or two spellings of one existing path (relative here, absolute there)."""
    if old == new:
        return True
    return (isinstance(old, str) and isinstance(new, str) and os.path.exists(old) and os.path.exists(new)
            and os.path.realpath(old) == os.path.realpath(new))


def _other_text_given(name: str, explicit) -> bool:
    """A stored text option the command replaced by the other kind: train_sources against the options it stands
    for (e.g. `flax-bert eval RUN_DIR --validation_file new.txt` of a mixture run), and the other way round."""
    if name == "train_sources":
        return bool(set(MIXTURE_EXCLUDES) & set(explicit))
    return name in MIXTURE_EXCLUDES and "train_sources" in explicit


def _without_weights(sources) -> list | None:
    """A train_sources value less its weights: what may not change on resume."""
    if not isinstance(sources, list):
        return sources
    return [{k: v for k, v in entry.items() if k != "weight"} if isinstance(entry, dict) else entry for entry in sources]


def _weights(sources) -> dict:
    return {entry.get("name"): entry.get("weight") for entry in sources or [] if isinstance(entry, dict)}


def reconcile_with_stored(run: RunConfig) -> RunConfig:
    """`run` with the options it did not set taken from the run it continues; refuses immutable changes."""
    if run.overwrite_output_dir:
        return run  # starting over: the stored run is about to be removed
    stored, source = stored_options(run.output_dir, run.resume_from_checkpoint)
    if not stored:
        return with_export_evaluation(run)
    explicit = getattr(run, EXPLICIT, frozenset())
    reset_optimizer = getattr(run, "reset_optimizer", False)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    inherited, changed = {}, []
    for name, old in stored.items():
        if name not in fields or name in PER_COMMAND:
            continue
        new = getattr(run, name)
        if name not in explicit:
            if new != old and not _other_text_given(name, explicit):
                inherited[name] = old
            continue
        if same_setting(old, new) or (name == "max_grad_norm" and not old and not new):
            continue
        if name == "train_sources" and _without_weights(old) == _without_weights(new):
            changed.append(f"train_sources weights {_weights(old)} -> {_weights(new)}")  # the data iterator takes them
            continue
        if old is None and name in DECIDED_BY_THE_CHECKPOINT:
            changed.append(f"{name} unset -> {new!r} (checked against the checkpoint's data position)")
            continue
        clipping_switched = name == "max_grad_norm" and bool(old) != bool(new)  # the optimizer state's structure
        if name in fixed_options(reset_optimizer) or (clipping_switched and not reset_optimizer):
            what = IMMUTABLE.get(name, "the optimizer state in the checkpoint")
            if not run.do_train:  # evaluating: there is nothing to continue or start over
                raise StoredOptionError(f"--{name} {new!r} differs from the run's {old!r} ({source}); it fixes "
                                        f"{what}: evaluate with --{name} {old!r} or leave it out")
            raise StoredOptionError(
                f"--{name} {new!r} differs from the run's {old!r} ({source}); it fixes {what}: continue with "
                f"--{name} {old!r} (or leave it out), "
                + ("or pass --reset_optimizer to keep the parameters, step and data position with a fresh optimizer "
                   "state, " if name in OPTIMIZER_STATE or clipping_switched else "")
                + "or start a new run in another --output_dir (or over this one with --overwrite_output_dir)")
        changed.append(f"{name} {old!r} -> {new!r}")
    if inherited or changed:
        run = dataclasses.replace(run, **inherited)
        setattr(run, EXPLICIT, explicit)
        run.validate()
    if inherited:
        log.info("continuing the run of %s: took %d options from it (%s)", source, len(inherited),
                 ", ".join(sorted(inherited)))
    for change in changed:
        log.info("changed on resume: %s", change)
    return run


def with_export_evaluation(run: RunConfig) -> RunConfig:
    """Evaluating an exported folder (--model_name_or_path, no run directory): the options it did not set are
    taken from the export's EVALUATION_FILE, the settings its run evaluated with."""
    from flax_bert import storage

    if run.do_train or not run.model_name_or_path:
        return run
    settings_file = storage.join(run.model_name_or_path, EVALUATION_FILE)
    try:
        settings = json.loads(storage.read_text(settings_file))["options"] if storage.isfile(settings_file) else {}
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s is unreadable: evaluating with the options given", settings_file)
        return run
    explicit = getattr(run, EXPLICIT, frozenset())
    inherited = {name: value for name, value in settings.items()
                 if name in EVALUATION_SETTINGS and name not in explicit and getattr(run, name) != value
                 and not _other_text_given(name, explicit)}
    if not inherited:
        return run
    run = dataclasses.replace(run, **inherited)
    setattr(run, EXPLICIT, explicit)
    log.info("evaluating with the settings its run evaluated with (%s): %s", settings_file,
             ", ".join(f"{name} {value!r}" for name, value in sorted(inherited.items())))
    return run.validate()


def option_tables() -> str:
    """The docs' lists of options that may and may not change on resume (docs/configuration.md)."""
    immutable = ", ".join(f"`--{name}`" for name in IMMUTABLE)
    mutable = ", ".join(f"`--{name}`" for name in mutable_options())
    return (f"**May not change** (the run stops with one line naming the option, both values and what to do): "
            f"{immutable} (but a `train_sources` entry's `weight` may change); and switching gradient clipping on "
            f"or off (`--max_grad_norm` unset/0 vs a value). "
            f"`--optimizer` and clipping may change with `--reset_optimizer`, which starts a fresh optimizer "
            f"state.\n\n"
            f"**May change** (accepted with a log line `changed on resume: OPTION old -> new`): {mutable}; "
            f"and `--max_grad_norm` from one value to another; `--phases` and the batch-size warmup only in the steps "
            f"not yet trained (docs/phases.md).\n\n"
            f"**Per command** (never taken from the stored run): "
            + ", ".join(f"`--{name}`" for name in sorted(PER_COMMAND & {f.name for f in dataclasses.fields(RunConfig)}))
            + ".\n")
