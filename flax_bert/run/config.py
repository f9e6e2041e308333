"""The run configuration: the old `run_mlm_flax.py` flag names plus ours, from YAML and flags.

`parse_run_config(argv)` reads an optional YAML file (first argument), then flags override it.
Every field documents itself in `--help`. Secrets (`hub_token`) are never written anywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import typing
from typing import Any, get_type_hints

import yaml

from flax_bert.errors import InputError

SECRET_FIELDS = ("hub_token", "token", "use_auth_token")

# Options a command line or YAML file set explicitly are recorded on the parsed RunConfig under this
# attribute (not a field: never saved); a run directory's stored options fill in the others.
EXPLICIT = "explicit_options"


def _field(default, help: str, choices=None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class RunConfig:
    # ---- model
    model_type: str | None = _field(None, "architecture family of a fresh model (unset: the loaded model's, else roberta)",
                                    ["roberta", "bert", "modernbert"])
    config_name: str | None = _field(None, "Hugging Face config (folder or hub id) for a fresh model")
    use_fast_tokenizer: bool = _field(True, "load the fast (Rust) tokenizer; false is refused: packing needs its offsets")
    token: str | None = _field(None, "Hub token for private models, tokenizers and datasets (default: $HF_TOKEN or the "
                               "stored login); never logged or saved")
    use_auth_token: str | None = _field(None, "old name of --token (deprecated in the old script too)")
    trust_remote_code: bool = _field(False, "let transformers run a Hub tokenizer's own code (only for repositories you trust)")
    tokenizer_name: str | None = _field(None, "tokenizer folder or hub id; none: train one on the training data")
    model_name_or_path: str | None = _field(None, "start from these Hugging Face weights (folder or hub id)")
    vocab_size: int | None = _field(None, "vocabulary of a fresh model; default: the tokenizer's size")
    hidden_size: int = _field(768, "fresh model: hidden size")
    num_hidden_layers: int = _field(12, "fresh model: encoder layers")
    num_attention_heads: int = _field(12, "fresh model: attention heads")
    intermediate_size: int = _field(3072, "fresh model: feed-forward width (ModernBERT: the GLU's width, its input "
                                    "projection is twice it; ModernBERT-base uses 1152)")
    max_position_embeddings: int | None = _field(None, "fresh model: position table size (default 514 RoBERTa, 512 BERT, "
                                                 "8192 ModernBERT)")
    hidden_dropout_prob: float | None = _field(None, "dropout on hidden states (default 0.1 BERT/RoBERTa; 0 ModernBERT, "
                                               "its MLP dropout)")
    attention_probs_dropout_prob: float | None = _field(None, "dropout on attention probabilities (default 0.1 BERT/RoBERTa; "
                                                        "0 ModernBERT)")
    local_attention: int | None = _field(None, "fresh ModernBERT: sliding-window width in tokens, half on each side (default 128)")
    global_attn_every_n_layers: int | None = _field(None, "fresh ModernBERT: layers 0, n, 2n... attend globally, the others "
                                                    "in the window (default 3)")
    dtype: str = _field("float32", "compute dtype (parameters stay float32)", ["float32", "bfloat16", "float16"])
    scan_layers: bool = _field(True, "lax.scan over the encoder layers (fast compiles)")
    remat_policy: str = _field("none", "rematerialize layers in the backward pass to save memory",
                               ["none", "full", "dots", "dots_no_batch"])
    gradient_checkpointing: bool = _field(False, "the old script's name for --remat_policy full")
    attention: str = _field("auto", "attention kernel: xla (scores materialized), splash (Pallas TPU splash attention: "
                            "packed documents and ModernBERT's window without the scores), cudnn (cuDNN fused attention "
                            "on NVIDIA GPUs); auto: splash on TPU, cudnn on GPU where they can run the model, else xla",
                            ["auto", "xla", "splash", "cudnn"])
    # ---- data
    dataset_name: str | None = _field(None, "a Hugging Face datasets name (needs network); none and no files: the built-in corpus")
    dataset_config_name: str | None = _field(None, "the dataset's configuration, e.g. wikitext-2-raw-v1")
    train_file: str | None = _field(None, "training text: .txt, .json/.jsonl, .csv or .parquet (a path or a URL: gs://...)")
    validation_file: str | None = _field(None, "evaluation text, same formats")
    train_ref_file: str | None = _field(None, "accepted for the old script, which never read it either (Chinese whole-word "
                                        "masking refs); ignored with a warning")
    validation_ref_file: str | None = _field(None, "accepted and ignored, as --train_ref_file")
    blank_line_documents: bool = _field(False, ".txt files: a document is a block of lines ended by a blank line "
                                        "(BERT's create_pretraining_data layout, one sentence per line); default: every "
                                        "non-blank line is one document, as in the old script. --objective mlm+nsp turns "
                                        "it on unless set")
    text_column: str = _field("text", "column holding the text in json/csv/parquet/hub data")
    validation_split_percentage: int = _field(5, "percent of train held out for evaluation when no validation set is given")
    max_seq_length: int | None = _field(None, "tokens per row (unset: the tokenizer's model_max_length, at most what the "
                                        "model's positions allow, as in the old script)")
    line_by_line: bool = _field(False, "one document per row (padded) instead of packing documents into full rows")
    pad_to_max_length: bool = _field(False, "accepted; rows are always max_seq_length long (static shapes on accelerators)")
    mlm_probability: float = _field(0.15, "fraction of tokens selected for prediction in training")
    eval_mlm_probability: float | None = _field(None, "fraction selected in evaluation (default: --mlm_probability, as "
                                                "the old script; published ModernBERT/MosaicBERT numbers use 0.15)")
    whole_word_masking: bool = _field(False, "mask every sub-word of a selected word together")
    objective: str = _field("mlm", "training objective; mlm+nsp adds BERT's next-sentence prediction", ["mlm", "mlm+nsp"])
    preprocessing_num_workers: int | None = _field(None, "tokenizer threads (default: all cores); in `flax-bert prepare`, worker processes")
    streaming: bool = _field(False, "stream the dataset instead of loading it (corpora larger than disk or memory)")
    shuffle_buffer_size: int = _field(10000, "streaming: documents in the shuffle buffer (per process)")
    data_shards: int | None = _field(None, "logical data shards, each tokenized by one process; fixed, they keep the "
                                     "batches the same for any number of processes (default 16, at most the global batch)")
    cache_dir: str | None = _field(None, "where downloaded models, tokenizers and datasets, tokenized data and the "
                                   "built-in corpus are cached (a URL: tokenized data shared by hosts and runs)")
    overwrite_cache: bool = _field(False, "tokenize and pack again instead of reading the cache")
    skip_invalid_utf8: bool = _field(False, "skip undecodable lines (and count them) instead of stopping")
    max_train_samples: int | None = _field(None, "use the first N training documents")
    max_eval_samples: int | None = _field(None, "evaluate on the first N validation documents")
    tokenizer_vocab_size: int = _field(8192, "vocabulary of a tokenizer trained when --tokenizer_name is not given")
    # ---- training
    output_dir: str | None = _field(None, "where checkpoints, metrics and the exported model go (required; a path or a URL: gs://...)")
    overwrite_output_dir: bool = _field(False, "allow a run to reuse an output_dir that holds another run's files")
    reset_optimizer: bool = _field(False, "resume a checkpoint whose optimizer state does not fit this run's optimizer "
                                   "options: keep its parameters, step and data position, start a fresh optimizer state")
    do_train: bool = _field(False, "train (implied unless --do_train false or --do_eval alone is given, and by `flax-bert train`)")
    do_eval: bool = _field(False, "evaluate at the end; alone: evaluate the latest checkpoint of --output_dir, "
                           "--resume_from_checkpoint or --model_name_or_path and nothing else")
    per_device_train_batch_size: int = _field(8, "rows per device per step (global batch = this x all devices)")
    per_device_eval_batch_size: int = _field(8, "rows per device per eval batch")
    gradient_accumulation_steps: int = _field(1, "micro-batches per update (global batch = per-device batch x devices x this)")
    learning_rate: float = _field(5e-5, "peak learning rate")
    weight_decay: float = _field(0.0, "AdamW weight decay (not on biases and LayerNorm)")
    adam_beta1: float = _field(0.9, "Adam beta1")
    adam_beta2: float = _field(0.999, "Adam beta2 (RoBERTa 0.98, BERT 0.999)")
    adam_epsilon: float = _field(1e-8, "Adam epsilon")
    max_grad_norm: float | None = _field(None, "global-norm gradient clipping (unset or 0: none, as in the old script)")
    optimizer: str = _field("adamw", "optimizer; stableadamw is AdamW with each tensor's step clipped by its update RMS "
                            "(ModernBERT's)", ["adamw", "lamb", "stableadamw", "adafactor"])
    adafactor: bool = _field(False, "the old script's switch: optax.adafactor with its defaults and the schedule "
                             "(same as --optimizer adafactor)")
    lr_scheduler_type: str = _field("linear", "decay after warmup; wsd: warmup, stable at the peak, then 1-sqrt decay to 0 "
                                    "over the last --wsd_decay_fraction of the steps", ["linear", "cosine", "constant", "wsd"])
    wsd_decay_fraction: float = _field(0.1, "wsd schedule: fraction of the total steps spent decaying")
    warmup_steps: int = _field(0, "linear warmup steps")
    num_train_epochs: float = _field(3.0, "epochs (ignored when --max_steps > 0)")
    max_steps: int = _field(-1, "total optimizer steps; overrides num_train_epochs when > 0")
    logging_steps: int = _field(500, "log metrics every N steps")
    eval_steps: int | None = _field(None, "evaluate every N steps while training (unset: none; --do_eval evaluates at the end)")
    save_steps: int = _field(500, "checkpoint every N steps (0: only at the end)")
    save_minutes: float | None = _field(None, "also checkpoint every N minutes")
    save_total_limit: int = _field(3, "keep the last N checkpoints")
    keep_best: bool = _field(False, "also keep the checkpoint with the best eval loss")
    resume_from_checkpoint: str | None = _field(None, "a run directory or checkpoint to resume from")
    seed: int = _field(42, "seed for initialization, data order, masks and dropout")
    mesh: str = _field("data=-1,fsdp=1,tensor=1", "device mesh, e.g. data=-1 or data=2,fsdp=4,tensor=1")
    progress_bar: bool = _field(True, "show a progress bar")
    # ---- export and hub
    push_to_hub: bool = _field(False, "upload the exported model to the Hugging Face Hub")
    hub_model_id: str | None = _field(None, "the Hub repository, e.g. user/my-roberta")
    hub_token: str | None = _field(None, "Hub token (default: $HF_TOKEN); never logged or saved")
    hub_private_repo: bool = _field(False, "create the Hub repository private")
    # ---- several hosts
    coordinator_address: str | None = _field(None, "host:port of process 0 for jax.distributed (multi-host)")
    num_processes: int | None = _field(None, "number of processes (multi-host)")
    process_id: int | None = _field(None, "this process's index (multi-host)")

    def to_dict(self) -> dict[str, Any]:
        """Everything but secrets: safe to write into checkpoints, logs and model cards."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in SECRET_FIELDS}

    def validate(self) -> "RunConfig":
        checks = [
            (self.output_dir, "--output_dir is required: the folder for checkpoints, metrics and the exported model"),
            (self.max_seq_length is None or self.max_seq_length >= 8, "--max_seq_length must be at least 8"),
            (0 < self.mlm_probability < 1, "--mlm_probability must be between 0 and 1, e.g. 0.15"),
            (self.eval_mlm_probability is None or 0 < self.eval_mlm_probability < 1,
             "--eval_mlm_probability must be between 0 and 1, e.g. 0.15"),
            (0 < self.wsd_decay_fraction <= 1, "--wsd_decay_fraction must be in (0, 1], e.g. 0.1"),
            (self.model_type == "modernbert" or (self.local_attention is None and self.global_attn_every_n_layers is None),
             "--local_attention and --global_attn_every_n_layers apply to --model_type modernbert only"),
            (self.local_attention is None or (self.local_attention >= 2 and self.local_attention % 2 == 0),
             "--local_attention must be an even number of tokens, at least 2 (e.g. 128)"),
            (self.global_attn_every_n_layers is None or self.global_attn_every_n_layers >= 1,
             "--global_attn_every_n_layers must be at least 1"),
            (self.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be at least 1"),
            (self.per_device_eval_batch_size >= 1, "--per_device_eval_batch_size must be at least 1"),
            (self.data_shards is None or self.data_shards >= 1, "--data_shards must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
            (self.learning_rate > 0, "--learning_rate must be positive"),
            (self.warmup_steps >= 0, "--warmup_steps must be >= 0"),
            (self.logging_steps >= 1, "--logging_steps must be at least 1"),
            (self.save_steps >= 0, "--save_steps must be >= 0"),
            (self.save_total_limit >= 1, "--save_total_limit must be at least 1"),
            (self.max_steps > 0 or self.num_train_epochs > 0, "set --max_steps or a positive --num_train_epochs"),
            (0 <= self.validation_split_percentage < 100, "--validation_split_percentage must be in [0, 100)"),
            (self.objective == "mlm" or self.model_type == "bert" or self.model_name_or_path or self.config_name,
             "--objective mlm+nsp needs --model_type bert"),
            (not self.push_to_hub or self.hub_model_id, "--push_to_hub needs --hub_model_id"),
            (self.do_train or self.do_eval, "nothing to do: pass --do_train and/or --do_eval"),
            (not (self.token and self.use_auth_token), "--token and --use_auth_token both given: pass only --token"),
            (not (self.adafactor and self.optimizer != "adafactor"),
             f"--adafactor and --optimizer {self.optimizer} both given: choose one"),
            (self.use_fast_tokenizer, "--use_fast_tokenizer false is not supported: packing and whole-word masking need "
                                      "the fast (Rust) tokenizer; drop the flag"),
        ]
        for ok, message in checks:
            if not ok:
                raise RunConfigError(message)
        return self


class RunConfigError(InputError):
    """A YAML file or flag that does not describe a valid run."""


def _str2bool(value: str) -> bool:
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _parser_type(hint) -> Any:
    """bool / int / float / str, looking through `X | None`."""
    kinds = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    return {bool: _str2bool, int: int, float: float}.get(kinds[0], str)


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags end in one line naming the problem, not the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "run_mlm_flax.py") -> argparse.ArgumentParser:
    actions = {"flax-bert train": " Training is what this command does (--do_train and --do_eval default to true).",
               "flax-bert eval": " Evaluates only: `flax-bert eval RUN_DIR` scores the run's latest checkpoint with its "
                                 "own options and writes nothing but eval_results.json.",
               }.get(prog, " As in the old script, --do_train and --do_eval default to false; it trains unless "
                           "--do_train false or --do_eval alone is given (the old script trained whatever "
                           "--do_train said).")
    parser = OneLineErrorParser(
        prog=prog, description="Pretrain a BERT/RoBERTa masked-language model in JAX/Flax. "
        "An optional YAML run config comes first; flags override it." + actions,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("config_file", nargs="?", help="YAML run config (e.g. configs/tiny.yaml)")
    hints = get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        kind = _parser_type(hints[field.name])
        kwargs = dict(type=kind, default=argparse.SUPPRESS, help=field.metadata["help"], choices=field.metadata["choices"])
        if kind is _str2bool:  # `--flag` alone means true, `--flag false` turns it off
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        parser.add_argument(f"--{field.name}", **kwargs)
    return parser


def load_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    file = pathlib.Path(path)
    if not file.is_file():
        raise RunConfigError(f"run config {file} does not exist; pass a YAML file such as configs/tiny.yaml")
    values = yaml.safe_load(file.read_text()) or {}
    if not isinstance(values, dict):
        raise RunConfigError(f"{file} must hold a mapping of option: value")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RunConfigError(f"{file}: unknown option(s) {', '.join(unknown)}; see --help for the valid names")
    hints = get_type_hints(RunConfig)
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name, value in values.items():
        kind = _parser_type(hints[name])
        expected = {_str2bool: bool, int: int, float: (int, float), str: str}[kind]
        if value is not None and (not isinstance(value, expected) or (kind is not _str2bool and isinstance(value, bool))):
            raise RunConfigError(f"{file}: {name} must be a {getattr(kind, '__name__', 'bool').replace('_str2bool', 'bool')}, got {value!r}")
        choices = fields[name].metadata["choices"]
        if choices and value not in choices:
            raise RunConfigError(f"{file}: {name} must be one of {', '.join(choices)}, got {value!r}")
    return values


def parse_run_config(argv: list[str] | None = None, prog: str = "run_mlm_flax.py",
                     defaults: dict[str, Any] | None = None) -> RunConfig:
    """`defaults`, then the YAML (first positional argument), then flags; one-line message on bad input.
    The options the YAML or the flags set are kept in the result's `explicit_options`."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    config_file = args.pop("config_file", None)
    try:
        given = dict(load_yaml(config_file) if config_file else {})
        given.update(args)
        implied, decisions = implied_options(given, defaults or {})
        run = RunConfig(**{**(defaults or {}), **given, **implied}).validate()
    except ValueError as err:
        parser.error(str(err))
    # an old flag that spells a new option (--adafactor, --gradient_checkpointing) sets it as explicitly as
    # the new flag would: a continued run must not take the stored value over it
    setattr(run, EXPLICIT, frozenset(given) | {name for name in implied if name in ALIASED_OPTIONS})
    import logging

    for decision in decisions:
        logging.getLogger("flax_bert").info("%s", decision)
    return run


ALIASED_OPTIONS = ("optimizer", "adafactor", "remat_policy")  # options implied_options sets from an old flag's alias


def implied_options(given: dict[str, Any], defaults: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(options the given ones imply, the decisions to log) for the old script's flags."""
    implied: dict[str, Any] = {}
    decisions: list[str] = []
    asked = {**defaults, **given}
    if "do_train" not in asked and not asked.get("do_eval"):
        # the old run_mlm_flax.py trained whatever --do_train said (the flag only guarded --output_dir);
        # only an explicit --do_eval alone means "evaluate and nothing else"
        implied["do_train"] = True
        decisions.append("--do_train not given (and no --do_eval alone): training, as the old run_mlm_flax.py did")
    if given.get("use_auth_token"):
        if not given.get("token"):
            implied.update(token=given["use_auth_token"], use_auth_token=None)
    if given.get("adafactor") and given.get("optimizer", "adamw") == "adamw":
        implied["optimizer"] = "adafactor"
    if given.get("optimizer") == "adafactor":
        implied["adafactor"] = True
    if given.get("push_to_hub") and not given.get("hub_model_id") and given.get("output_dir"):
        # the old script named the repository after the output directory
        implied["hub_model_id"] = pathlib.Path(given["output_dir"]).absolute().name
        decisions.append(f"--push_to_hub without --hub_model_id: the repository {implied['hub_model_id']!r}, "
                         "named after --output_dir as the old run_mlm_flax.py did")
    if given.get("gradient_checkpointing") and given.get("remat_policy", "none") == "none":
        implied["remat_policy"] = "full"
        decisions.append("--gradient_checkpointing: --remat_policy full")
    if given.get("objective") == "mlm+nsp" and "blank_line_documents" not in given:
        implied["blank_line_documents"] = True
        decisions.append("--objective mlm+nsp: .txt documents are blocks of lines ended by a blank line "
                         "(--blank_line_documents; pass false to make every line a document)")
    return implied, decisions


def fresh_model_config(run: RunConfig, vocab_size: int, special_token_ids: dict[str, int | None] | None = None):
    """The ModelConfig of a model initialized from scratch with the run's sizes. `special_token_ids`
    (pad/bos/eos/cls/sep from the tokenizer) replace the family's, so the padding index, the
    position numbering and the exported config.json agree with the tokenizer the model is trained with."""
    from flax_bert.models.config import ModelConfig
    from flax_bert.models import global_every

    model_type = run.model_type or "roberta"
    sizes = dict(vocab_size=run.vocab_size or vocab_size, hidden_size=run.hidden_size,
                 num_hidden_layers=run.num_hidden_layers, num_attention_heads=run.num_attention_heads)
    sizes["intermediate_size"] = run.intermediate_size
    for name in ("max_position_embeddings", "hidden_dropout_prob", "attention_probs_dropout_prob",
                 "local_attention"):
        if getattr(run, name) is not None:  # None: the family's default
            sizes[name] = getattr(run, name)
    if model_type == "modernbert":
        sizes["layer_types"] = global_every(run.num_hidden_layers, run.global_attn_every_n_layers)
    from flax_bert.models import family

    config_fields = family(model_type).hf_fields  # only the ids this family's config.json has
    sizes.update({k: v for k, v in (special_token_ids or {}).items()
                  if k in config_fields and (k != "pad_token_id" or v is not None)})
    return ModelConfig.for_family(model_type, **sizes, **runtime_overrides(run))


def runtime_overrides(run: RunConfig) -> dict:
    """How to run any model (fresh or loaded): dtype, scan, remat, attention kernel."""
    return dict(dtype=run.dtype, scan_layers=run.scan_layers, remat_policy=run.remat_policy, attention=run.attention)
