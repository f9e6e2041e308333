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

from flax_bert.errors import InputError, InputFileNotFoundError

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
                                               "its MLP dropout); set, it applies to a continued or loaded model too")
    attention_probs_dropout_prob: float | None = _field(None, "dropout on attention probabilities (default 0.1 BERT/RoBERTa; "
                                                        "0 ModernBERT); set, it applies to a continued or loaded model too")
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
    phases: list | None = _field(None, "training phases, a YAML list (docs/phases.md): each ends at until_step or "
                                 "until_tokens and may set max_seq_length, global_rope_theta (ModernBERT), "
                                 "mlm_probability, its learning rate (schedule: warmup|stable|decay, decay_shape: "
                                 "linear|1-sqrt) and mixture weights; the last one ends the run")
    batch_size_warmup_tokens: int = _field(0, "grow the global batch from --batch_size_warmup_start rows to the full "
                                           "batch linearly over this many tokens (rows x max_seq_length); 0: off")
    batch_size_warmup_start: int | None = _field(None, "the global batch, in rows, that a batch-size warmup starts "
                                                 "from (a multiple of devices x gradient_accumulation_steps)")
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
    train_sources: list | None = _field(None, "a training mixture (YAML; the flag takes the same list as inline YAML): "
                                        "[{name: wiki, train_file: wiki.txt, weight: 2}, {name: web, dataset_name: "
                                        "DATASET, weight: 1}], each source with train_file or dataset_name, and optionally "
                                        "dataset_config_name, text_column, validation_file, max_train_samples, "
                                        "max_eval_samples (unset: the run's), weight (every source or none); instead of --train_file/"
                                        "--dataset_name. Every batch draws from source i with probability p_i "
                                        "proportional to w_i ** (1 / --mixture_temperature), w_i its weight, or its "
                                        "size in tokens when no source has one (docs/data.md)")
    mixture_temperature: float = _field(1.0, "train_sources: p_i proportional to w_i ** (1 / T); 1 keeps the weights, "
                                        "a large T goes towards uniform (mmBERT's temperature sampling)")
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
    eval_steps: int | None = _field(None, "evaluate every N steps and at the last step while training (unset: none; "
                                    "--do_eval evaluates at the end)")
    save_steps: int = _field(500, "checkpoint every N steps (0: only at the end)")
    save_minutes: float | None = _field(None, "also checkpoint every N minutes")
    save_total_limit: int = _field(3, "keep the last N checkpoints")
    keep_best: bool = _field(False, "also keep the checkpoint with the best eval loss (every evaluation then saves one)")
    downstream_eval: str | None = _field(None, "a TASK.yaml of `flax-bert finetune` options: fine-tune a copy of the model "
                                         "on it every --downstream_eval_steps and at the last step, and log its "
                                         "validation score beside the MLM loss (docs/finetune.md)")
    downstream_eval_steps: int = _field(0, "with --downstream_eval: every N steps (0: at the last step only)")
    resume_from_checkpoint: str | None = _field(None, "a run directory or checkpoint to resume from (the output_dir's own "
                                                "checkpoints come first; an earlier step of them is refused)")
    seed: int = _field(42, "seed for initialization, data order, masks and dropout")
    mesh: str = _field("data=-1,fsdp=1,tensor=1", "device mesh, e.g. data=-1 or data=2,fsdp=4,tensor=1")
    progress_bar: bool = _field(True, "show a progress bar")
    # ---- export and hub
    push_to_hub: bool = _field(False, "upload the exported model to the Hugging Face Hub")
    hub_model_id: str | None = _field(None, "the Hub repository, e.g. user/my-roberta")
    hub_token: str | None = _field(None, "Hub token (default: $HF_TOKEN); never logged or saved")
    hub_private_repo: bool = _field(False, "create the Hub repository private")
    hub_revision_steps: int = _field(0, "with --push_to_hub: every N steps also push an export of that step to the "
                                     "branch step-NNNNNNN of --hub_model_id (intermediate checkpoints, as released "
                                     "model suites publish them); the final model goes to main; 0: off")
    # ---- several hosts
    coordinator_address: str | None = _field(None, "host:port of process 0 for jax.distributed (multi-host)")
    num_processes: int | None = _field(None, "number of processes (multi-host)")
    process_id: int | None = _field(None, "this process's index (multi-host)")

    def to_dict(self) -> dict[str, Any]:
        """Everything but secrets: safe to write into checkpoints, logs and model cards."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in SECRET_FIELDS}

    def validate(self) -> "RunConfig":
        return check_run_config(self)


class RunConfigError(InputError):
    """A YAML file or flag that does not describe a valid run."""


class RunConfigFileNotFoundError(RunConfigError, InputFileNotFoundError):
    """The YAML run config named is not there."""


# ----------------------------------------------------------------------------- validation
def check_run_config(run: RunConfig) -> RunConfig:
    """Refuses, in one line naming the flag, a combination of options that does not describe a valid run."""
    checks = [
        (run.output_dir, "--output_dir is required: the folder for checkpoints, metrics and the exported model"),
        (run.max_seq_length is None or run.max_seq_length >= 8, "--max_seq_length must be at least 8"),
        (0 < run.mlm_probability < 1, "--mlm_probability must be between 0 and 1, e.g. 0.15"),
        (run.eval_mlm_probability is None or 0 < run.eval_mlm_probability < 1,
         "--eval_mlm_probability must be between 0 and 1, e.g. 0.15"),
        (0 < run.wsd_decay_fraction <= 1, "--wsd_decay_fraction must be in (0, 1], e.g. 0.1"),
        (run.model_type == "modernbert" or (run.local_attention is None and run.global_attn_every_n_layers is None),
         "--local_attention and --global_attn_every_n_layers apply to --model_type modernbert only"),
        (run.local_attention is None or (run.local_attention >= 2 and run.local_attention % 2 == 0),
         "--local_attention must be an even number of tokens, at least 2 (e.g. 128)"),
        (run.global_attn_every_n_layers is None or run.global_attn_every_n_layers >= 1,
         "--global_attn_every_n_layers must be at least 1"),
        (run.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be at least 1"),
        (run.per_device_eval_batch_size >= 1, "--per_device_eval_batch_size must be at least 1"),
        (run.data_shards is None or run.data_shards >= 1, "--data_shards must be at least 1"),
        (run.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
        (run.learning_rate > 0, "--learning_rate must be positive"),
        (run.warmup_steps >= 0, "--warmup_steps must be >= 0"),
        (run.logging_steps >= 1, "--logging_steps must be at least 1"),
        (run.save_steps >= 0, "--save_steps must be >= 0"),
        (run.save_total_limit >= 1, "--save_total_limit must be at least 1"),
        (run.downstream_eval_steps >= 0, "--downstream_eval_steps must be >= 0"),
        (run.downstream_eval or not run.downstream_eval_steps, "--downstream_eval_steps needs --downstream_eval TASK.yaml"),
        (run.max_steps > 0 or run.num_train_epochs > 0, "set --max_steps or a positive --num_train_epochs"),
        (0 <= run.validation_split_percentage < 100, "--validation_split_percentage must be in [0, 100)"),
        (run.objective == "mlm" or run.model_type == "bert" or run.model_name_or_path or run.config_name,
         "--objective mlm+nsp needs --model_type bert"),
        (not run.push_to_hub or run.hub_model_id, "--push_to_hub needs --hub_model_id"),
        (run.hub_revision_steps >= 0, "--hub_revision_steps must be >= 0"),
        (not run.hub_revision_steps or run.push_to_hub,
         "--hub_revision_steps needs --push_to_hub and --hub_model_id (the repository whose branches it writes)"),
        (run.do_train or run.do_eval, "nothing to do: pass --do_train and/or --do_eval"),
        (not (run.token and run.use_auth_token), "--token and --use_auth_token both given: pass only --token"),
        (not (run.adafactor and run.optimizer != "adafactor"),
         f"--adafactor and --optimizer {run.optimizer} both given: choose one"),
        (not (run.phases and run.max_steps > 0), "phases decide the run's length (the last one's until_step or "
         "until_tokens): drop max_steps"),
        (run.batch_size_warmup_tokens >= 0, "--batch_size_warmup_tokens must be >= 0"),
        (not run.batch_size_warmup_tokens or run.batch_size_warmup_start,
         "--batch_size_warmup_tokens needs --batch_size_warmup_start ROWS, the global batch it starts from"),
        (not run.batch_size_warmup_start or run.batch_size_warmup_tokens,
         "--batch_size_warmup_start needs --batch_size_warmup_tokens N, the tokens over which the batch grows"),
        (not (run.batch_size_warmup_tokens and run.streaming),
         "a batch-size warmup needs the cached pipeline: drop --streaming (or the warmup)"),
        (run.use_fast_tokenizer, "--use_fast_tokenizer false is not supported: packing and whole-word masking need "
                                  "the fast (Rust) tokenizer; drop the flag"),
    ]
    for ok, message in checks:
        if not ok:
            raise RunConfigError(message)
    if run.phases is not None:
        _check_phases(run)
    if run.train_sources is not None:
        check_train_sources(run)
    return run


def _check_phases(run: RunConfig) -> None:
    from flax_bert.training.phases import parse_phases

    phases = parse_phases(run.phases, max_seq_length=run.max_seq_length or 512, mlm_probability=run.mlm_probability)
    if phases[0].schedule and (run.warmup_steps or run.lr_scheduler_type != "linear"):
        raise RunConfigError("the phases set the learning-rate schedule (schedule: warmup|stable|decay): drop "
                             "--warmup_steps and --lr_scheduler_type")
    if any(phase.mixture for phase in phases) and not run.train_sources:
        raise RunConfigError("a phase sets mixture weights, but the run has no train_sources to weigh: add them "
                             "(docs/data.md) or drop the phase's mixture")
    names = {source.get("name") for source in run.train_sources or [] if isinstance(source, dict)}
    for phase in phases:
        unknown = sorted(set(phase.mixture or {}) - names)
        if unknown:
            raise RunConfigError(f"phases[{phase.index}]'s mixture names {unknown[0]!r}, which is no train_sources "
                                 f"entry (they are {', '.join(sorted(map(str, names)))})")


MIXTURE_EXCLUDES = ("train_file", "dataset_name", "dataset_config_name", "validation_file")  # per source instead


def check_train_sources(run: RunConfig) -> None:
    """A mixture (train_sources) replaces the run's own text options; each entry is checked by the data layer."""
    from flax_bert.data.mixture import parse_sources

    given = [f"--{name}" for name in MIXTURE_EXCLUDES if getattr(run, name)]
    if given:
        raise RunConfigError(f"train_sources and {given[0]} both given: move the text into a train_sources entry "
                             "(train_file, dataset_name, dataset_config_name, validation_file are per source)")
    if run.streaming:
        raise RunConfigError("train_sources cannot be streamed: drop --streaming (each source is tokenized into the cache)")
    if not run.mixture_temperature > 0:
        raise RunConfigError("--mixture_temperature must be positive, e.g. 1.0")
    parse_sources(run.train_sources)


def str2bool(value: str) -> bool:
    """A BOOL flag's value: true/false, yes/no, on/off, 1/0; anything else is refused."""
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def integer(value: str) -> int:
    """An integer flag, also written as 1e3 (as in a YAML file)."""
    try:
        return int(value)
    except ValueError:
        number = float(value)  # a ValueError here: argparse says "invalid integer value"
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def yaml_list(value: str) -> list:
    """A list option (phases, train_sources) given as a flag: inline YAML or JSON, as in a YAML run config."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = None
    if not isinstance(parsed, list):
        raise argparse.ArgumentTypeError(f"expected a YAML list as in a YAML run config, e.g. '[{{a: 1}}, {{b: 2}}]' "
                                         f"(or put it in the YAML file), got {value!r}")
    return parsed


def _parser_type(hint) -> Any:
    """bool / int / float / list / str, looking through `X | None`."""
    kinds = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    return {bool: str2bool, int: int, float: float, list: yaml_list}.get(kinds[0], str)


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags end in one line naming the problem, not the whole usage block."""

    def error(self, message):
        hint = "" if "--help" in message else " (see --help)"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def build_parser(prog: str = "run_mlm_flax.py") -> argparse.ArgumentParser:
    pretrain = "Pretrain a BERT, RoBERTa or ModernBERT masked-language model in JAX/Flax. "
    yaml_first = "An optional YAML run config comes first (a path or a name from configs/, e.g. tiny); flags override it."
    description = {
        "flax-bert train": pretrain + yaml_first + " Training is what this command does (--do_train and --do_eval "
                           "default to true).",
        "flax-bert eval": "Evaluate a run's latest checkpoint (`flax-bert eval RUN_DIR`, with the run's own options), "
                          "an exported Hugging Face folder (`flax-bert eval FOLDER`) or --model_name_or_path with "
                          "--validation_file; writes nothing but eval_results.json. Flags override the run's options.",
        "flax-bert prepare": "Tokenize and pack the data of `flax-bert train` into the cache ahead of the run, and "
                             "nothing else: pass the same YAML run config and options as train. " + yaml_first,
    }.get(prog, pretrain + yaml_first + " As in the old script, --do_train and --do_eval default to false; it trains "
          "unless --do_train false or --do_eval alone is given (the old script trained whatever --do_train said).")
    parser = OneLineErrorParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if prog == "flax-bert eval":
        parser.add_argument("config_file", nargs="?", metavar="RUN_DIR",
                            help="the run directory (a train run's --output_dir) or exported folder to evaluate")
    else:
        parser.add_argument("config_file", nargs="?", help="YAML run config: a path, or a name from configs/ (e.g. tiny)")
    from flax_bert import __version__

    parser.add_argument("--version", action="version", version=f"flax-bert {__version__}")
    hints = get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        kind = _parser_type(hints[field.name])
        kwargs = dict(type=integer if kind is int else kind, default=argparse.SUPPRESS, help=field.metadata["help"], choices=field.metadata["choices"])
        if kind is str2bool:  # `--flag` alone means true, `--flag false` turns it off
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        parser.add_argument(f"--{field.name}", **kwargs)
    return parser


CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"  # the configs/ of a checkout


def resolve_config_file(config: str) -> pathlib.Path:
    """A YAML path, or the name of a file in configs/ (`roberta-base`, `tiny.yaml`): the same for every command."""
    path = pathlib.Path(config)
    if path.is_file():
        return path
    named = CONFIGS_DIR / f"{config.removesuffix('.yaml')}.yaml"
    if named.is_file() and not path.parent.name:  # a bare name; a path to a missing file stays missing
        return named
    names = ", ".join(sorted(f.stem for f in CONFIGS_DIR.glob("*.yaml"))) or "none here"
    raise RunConfigFileNotFoundError(f"no run config {config!r}: pass a YAML file such as configs/tiny.yaml or a name from "
                         f"configs/ ({names})")


def _yaml_values(file: pathlib.Path) -> Any:
    """The parsed file; a YAML syntax error becomes one line naming the file, the line and the problem."""
    try:
        return yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        # where the unfinished construct began (an unclosed `[`), else where the parser stopped
        mark = getattr(err, "context_mark", None) or getattr(err, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else str(file)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        raise RunConfigError(f"{where}: not valid YAML ({f'{context}: ' if context else ''}{problem}); "
                             "write one `option: value` per line") from None


def _yaml_number(value: Any, kind) -> Any:
    """A number PyYAML left as text (YAML 1.1 reads `1e3` and `2e-3` as strings): the number it spells; a whole
    float (`50.0e+9`) where an integer is expected: that integer."""
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, str) or kind not in (int, float):
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    if kind is int:
        return int(number) if number.is_integer() else value
    return number


_TYPE_NAMES = {str2bool: "true or false", int: "an integer", float: "a number", str: "a string", yaml_list: "a list"}


def load_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    file = resolve_config_file(str(path))
    values = _yaml_values(file) or {}
    if not isinstance(values, dict):
        raise RunConfigError(f"{file} must hold a mapping of option: value")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RunConfigError(f"{file}: unknown option(s) {', '.join(unknown)}; the valid names are the flags of --help")
    hints = get_type_hints(RunConfig)
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name, value in list(values.items()):
        kind = _parser_type(hints[name])
        value = values[name] = _yaml_number(value, kind)
        expected = {str2bool: bool, int: int, float: (int, float), str: str, yaml_list: list}[kind]
        if value is not None and (not isinstance(value, expected) or (kind is not str2bool and isinstance(value, bool))):
            raise RunConfigError(f"{file}: {name} must be {_TYPE_NAMES[kind]}, got {value!r}")
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
        if run.phases and "num_train_epochs" in given:
            raise RunConfigError("phases decide the run's length (the last one's until_step or until_tokens): "
                                 "drop num_train_epochs")
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


DROPOUT_OPTIONS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def model_overrides(run: RunConfig) -> dict:
    """What the run sets on any model it trains, also one it continues (a checkpoint, --model_name_or_path, an
    import): how it runs (runtime_overrides) and the dropout rates the command set (unset: the model's own)."""
    rates = {name: getattr(run, name) for name in DROPOUT_OPTIONS if getattr(run, name) is not None}
    return {**runtime_overrides(run), **rates}
