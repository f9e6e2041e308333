"""The `flax-bert` command: train, eval, prepare, export, import, train-tokenizer, fill-mask, plot, bench, finetune, compile."""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback

# transformers' advisory notes (e.g. "PyTorch was not found" on an install without torch) say nothing about a
# flax-bert run; its real warnings still show
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from flax_bert.run.config import OneLineErrorParser  # noqa: E402

USAGE = """usage: flax-bert COMMAND [options]

commands:
  train            pretrain and evaluate at the end (run_mlm_flax.py's options, with --do_train and --do_eval
                   on by default; a YAML run config may come first: a path or a name from configs/)
  eval             evaluate a run's latest checkpoint (`flax-bert eval RUN_DIR`) or a Hugging Face model
                   (--model_name_or_path); writes nothing but eval_results.json
  prepare          tokenize and pack train's data into the cache ahead of the run (train's options)
  export           a run's checkpoint -> Hugging Face folder (config.json, model.safetensors, tokenizer, card)
  import           a Hugging Face folder -> a run directory whose checkpoint `train` continues from
  train-tokenizer  train a byte-level BPE (RoBERTa) or WordPiece (BERT) tokenizer
  fill-mask        top-k predictions for a sentence with the mask token
  plot             draw a run's curves to a PNG
  bench            time the train step (and PyTorch's) on this machine
  finetune         fine-tune for classification or regression over settings x seeds; export the best to transformers
  compile          compile the train and eval steps for a TPU topology (no TPU needed): memory, fit, collectives

`flax-bert COMMAND --help` documents each command; `flax-bert --version` prints the version."""


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("jax._src", "datasets", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for chatty in ("absl", "orbax"):  # Orbax reports routine events (read-only restores) as warnings
        logging.getLogger(chatty).setLevel(logging.ERROR)


# ----------------------------------------------------------------------------- train / eval
def train_main(argv=None, prog="run_mlm_flax.py", defaults: dict | None = None) -> int:
    """SIGINT (ctrl-C) and SIGTERM alike: in the train loop the run saves and exits 0; before and after it
    (tokenizer, data, compile, final evaluation and export) it stops where it is and exits 0 too."""
    from flax_bert.training.preemption import Preempted, stop_outside_the_loop

    try:
        with stop_outside_the_loop():
            from flax_bert.run.config import parse_run_config

            run = parse_run_config(argv, prog=prog, defaults=defaults)
            from flax_bert.models.convert import check_local_model_folder
            from flax_bert.run.options import reconcile_with_stored

            check_local_model_folder(run.model_name_or_path)

            run = reconcile_with_stored(run)  # before any tokenizer, data or compile
            from flax_bert.run.pretrain import run_pretraining

            results = run_pretraining(run, downstream=_downstream_scorer(run))
    except Preempted as signal_name:
        print(f"stopped by {signal_name} outside the train loop; the checkpoints written are complete — rerun the "
              "same command to go on", file=sys.stderr)
        return 0
    if results.get("preempted"):
        print(f"stopped at step {results['step']} by a signal; checkpoint saved — rerun the same command to resume")
    return 0


def _downstream_scorer(run):
    """--downstream_eval TASK.yaml: its options are checked now, before any training; the score is finetune's."""
    if not run.downstream_eval or not run.do_train:
        return None
    from flax_bert.finetune.downstream import downstream_score, load_task

    load_task(run.downstream_eval)
    return lambda model, tokenizer, mesh: downstream_score(model, tokenizer, run.downstream_eval, mesh)


def prepare_main(argv) -> int:
    """Tokenize and pack the data of `train ARGS` into the cache (this process's shards), nothing else. SIGINT
    (ctrl-C) and SIGTERM alike stop it and exit 0, as train: the shards in the cache are whole, the same command
    prepares the rest."""
    from flax_bert.training.preemption import Preempted, stop_outside_the_loop

    try:
        with stop_outside_the_loop():
            return _prepare(argv)
    except Preempted as signal_name:
        print(f"stopped by {signal_name}: the shards prepared so far are whole in the cache — rerun the same command "
              "to prepare the rest", file=sys.stderr)
        return 0


def _prepare(argv) -> int:
    from flax_bert.run.config import parse_run_config

    run = parse_run_config(argv, prog="flax-bert prepare", defaults={"do_train": True, "do_eval": True})
    from flax_bert.models.convert import check_local_model_folder
    from flax_bert.run.options import reconcile_with_stored

    check_local_model_folder(run.model_name_or_path)

    run = reconcile_with_stored(run)  # as train: a run directory's stored options are the ones to prepare for

    import jax

    from flax_bert.training import distributed
    from flax_bert.errors import InputError
    from flax_bert.data.pipeline import resolve_data_shards
    from flax_bert.data.prepare import prepare_data
    from flax_bert.run.build import (data_args_from_run, decide_batch_warmup, default_max_seq_length,
                                     resolve_model_config, resolve_tokenizer, smallest_global_batch)
    from flax_bert.training.phases import parse_phases

    distributed.initialize(run)
    from flax_bert import storage
    run_tokenizer = storage.join(run.output_dir, "tokenizer")  # a local path or a URL
    if not (run.tokenizer_name or run.model_name_or_path or storage.isfile(storage.join(run_tokenizer, "tokenizer_config.json"))):
        raise InputError("prepare needs the run's tokenizer: pass --tokenizer_name (train one with "
                         "`flax-bert train-tokenizer`) or --model_name_or_path")
    tokenizer = resolve_tokenizer(run, storage.absolute(run.output_dir))
    data_args = data_args_from_run(run)
    if data_args.max_seq_length is None:  # as train decides it, so that train finds these rows
        data_args.max_seq_length = default_max_seq_length(tokenizer, resolve_model_config(run, tokenizer))
    global_batch = run.per_device_train_batch_size * jax.device_count() * run.gradient_accumulation_steps
    phases = parse_phases(run.phases, max_seq_length=data_args.max_seq_length,
                          mlm_probability=run.mlm_probability) if run.phases else None
    smallest = smallest_global_batch(run, phases, decide_batch_warmup(run, global_batch, phases), global_batch)
    data_args.data_shards = resolve_data_shards(run.data_shards, jax.process_count(), smallest)
    logging.getLogger("flax_bert").info(
        "preparing process %d of %d: %d logical shards (smallest global batch %d on %d devices; train must use the same)",
        jax.process_index(), jax.process_count(), data_args.data_shards, smallest, jax.device_count())
    every = {"": data_args}
    if run.train_sources:  # a mixture: every source into its own cache entries, as train reads them
        from flax_bert.data.mixture import parse_sources

        every = {f"{spec.name} ": spec.data_args(data_args) for spec in parse_sources(run.train_sources)}
    lengths = sorted({data_args.max_seq_length} | {phase.max_seq_length for phase in phases or []})
    for source, args in every.items():
        for length in lengths:  # every phase's rows: a phase with another max_seq_length trains on rows packed for it
            for result in prepare_data(dataclasses.replace(args, max_seq_length=length), tokenizer, run.seed,
                                       jax.process_index(), jax.process_count(), workers=run.preprocessing_num_workers):
                print(f"prepared {source}{result.describe()}")
    return 0


def eval_main(argv) -> int:
    argv = list(argv)
    from flax_bert import storage
    from flax_bert.errors import InputError, InputFileNotFoundError

    if argv and not argv[0].startswith("-") and not storage.isdir(argv[0]) and not _is_run_config(argv[0]):
        raise InputFileNotFoundError(f"no run directory {argv[0]}: `flax-bert eval RUN_DIR` takes a train run's "
                                     "--output_dir or an exported model folder")
    if not (argv and not argv[0].startswith("-")) and not {"-h", "--help", "--version", "--output_dir"} & {
            arg.split("=")[0] for arg in argv}:
        raise InputError("nothing to evaluate: pass a run directory (`flax-bert eval runs/tiny`), or "
                         "--model_name_or_path MODEL --validation_file FILE --output_dir DIR")
    if argv and not argv[0].startswith("-") and storage.isdir(argv[0]):  # `flax-bert eval RUN_DIR`
        folder = argv[0]
        exported = (not storage.isdir(storage.join(folder, "checkpoints"))
                    and storage.isfile(storage.join(folder, "config.json")))
        # an exported (Hugging Face) folder has no checkpoint: its weights are the model to evaluate
        argv = ["--output_dir", folder, *(["--model_name_or_path", folder] if exported else []), *argv[1:]]
    return train_main(argv, prog="flax-bert eval", defaults={"do_train": False, "do_eval": True})


def _is_run_config(name: str) -> bool:
    """A YAML run config, by path or by a name from configs/ (as train, prepare and bench take it)."""
    from flax_bert.run.config import RunConfigFileNotFoundError, resolve_config_file

    try:
        return resolve_config_file(name).suffix in (".yaml", ".yml")
    except RunConfigFileNotFoundError:
        return False


def train_command(argv) -> int:
    """`flax-bert train`: our own command, so training is what it does (and evaluating at the end)."""
    return train_main(argv, prog="flax-bert train", defaults={"do_train": True, "do_eval": True})


# ----------------------------------------------------------------------------- export / import
def export_main(argv) -> int:
    parser = OneLineErrorParser(prog="flax-bert export", description="Export a run's checkpoint as a Hugging Face folder.")
    parser.add_argument("run_dir", help="the run's --output_dir")
    parser.add_argument("--to", required=True, help="the folder to write (must not hold a model already)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    from flax_bert.models import FAMILIES

    parser.add_argument("--architecture", choices=[a for family in FAMILIES.values() for a in family.architectures],
                        help="export a BertForPreTraining run as BertForMaskedLM (drops the NSP head)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --to")
    parser.add_argument("--push_to_hub", action="store_true", help="upload the folder to the Hub")
    parser.add_argument("--hub_model_id", help="the Hub repository, e.g. user/my-roberta")
    parser.add_argument("--hub_token", help="Hub token (default: $HF_TOKEN); never printed")
    parser.add_argument("--hub_private_repo", action="store_true")
    parser.add_argument("--hub_revision", help="upload to this branch of the repository (created from main), e.g. "
                        "step-0001000 as --hub_revision_steps names them; default: main")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.hub_revision and not args.push_to_hub:
        parser.error("--hub_revision needs --push_to_hub")
    from flax_bert.run.export import export_command, push_to_hub, write_model_folder
    from flax_bert.run.directory import load_run_model

    model, tokenizer, run, step = load_run_model(args.run_dir, args.step)
    global_batch = (run.get("per_device_train_batch_size", 0) * run.get("gradient_accumulation_steps", 1)
                    * run.get("device_count", 1))
    folder = write_model_folder(model, args.to, tokenizer, run, step, global_batch,
                                final_evaluation(args.run_dir, step), overwrite=args.overwrite,
                                architecture=args.architecture)
    print(f"exported step {step} of {args.run_dir} to {folder}")
    if args.push_to_hub:
        retry = export_command(args.run_dir, args.to, args.hub_model_id, args.hub_private_repo, args.step,
                               args.hub_revision)
        print(push_to_hub(folder, args.hub_model_id, args.hub_token, args.hub_private_repo, retry=retry,
                          revision=args.hub_revision))
    return 0


def final_evaluation(run_dir, step: int) -> dict | None:
    """The run's eval_results.json when it scored the exported step (the model card reports it)."""
    import json

    from flax_bert import storage
    path = storage.join(str(run_dir), "eval_results.json")
    if not storage.isfile(path):
        return None
    results = json.loads(storage.read_text(path))
    return results if results.get("step") == step else None


def import_main(argv) -> int:
    parser = OneLineErrorParser(prog="flax-bert import",
                     description="Turn a Hugging Face BERT, RoBERTa or ModernBERT folder into a run directory to continue pretraining: "
                                 "then `flax-bert train --output_dir RUN_DIR ...` resumes from it.")
    parser.add_argument("hf_folder", help="Hugging Face model folder (or hub id when online)")
    parser.add_argument("--to", required=True, help="the run directory to create")
    from flax_bert.training.optim import OPTIMIZERS

    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                        help="the optimizer whose (fresh) state the checkpoint holds")
    parser.add_argument("--max_grad_norm", type=float, help="gradient clipping the continuing run uses (default none)")
    args = parser.parse_args(argv)
    from flax_bert.run.directory import import_hf_model

    step_dir = import_hf_model(args.hf_folder, args.to, args.optimizer, args.max_grad_norm)
    print(f"imported {args.hf_folder} into {step_dir}; continue pretraining with: "
          f"flax-bert train --output_dir {args.to}")
    print("(it takes the model and tokenizer from there; add --train_file FILE, --max_steps N or other options as needed)")
    return 0


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer_main(argv) -> int:
    parser = OneLineErrorParser(prog="flax-bert train-tokenizer",
                     description="Train a tokenizer on the same sources as `train` (the built-in corpus by default).")
    parser.add_argument("--kind", choices=["bpe", "wordpiece"], default="bpe",
                        help="byte-level BPE (RoBERTa: <s> <pad> </s> <unk> <mask>) or WordPiece (BERT)")
    parser.add_argument("--vocab_size", type=int, help="default 50265 (bpe) / 30522 (wordpiece)")
    parser.add_argument("--min_frequency", type=int, default=2)
    parser.add_argument("--output_dir", required=True, help="folder to write (AutoTokenizer loads it)")
    for name in ("dataset_name", "dataset_config_name", "train_file", "text_column", "cache_dir"):
        parser.add_argument(f"--{name}", default="text" if name == "text_column" else None)
    parser.add_argument("--max_train_samples", type=int)
    parser.add_argument("--token", help="Hub token for a private --dataset_name (as train's --token); never saved")
    args = parser.parse_args(argv)
    from flax_bert.data.pipeline import DataArgs
    from flax_bert.data.tokenizer_training import train_tokenizer_from_args

    data_args = DataArgs(dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
                         train_file=args.train_file, text_column=args.text_column, cache_dir=args.cache_dir,
                         max_train_samples=args.max_train_samples, validation_split_percentage=0,
                         token=args.token)
    tokenizer = train_tokenizer_from_args(data_args, kind=args.kind, vocab_size=args.vocab_size,
                                          min_frequency=args.min_frequency, output_dir=args.output_dir)
    print(f"trained a {len(tokenizer)}-token {args.kind} tokenizer into {args.output_dir}")
    return 0


# ----------------------------------------------------------------------------- fill-mask
def fill_mask_main(argv) -> int:
    parser = OneLineErrorParser(prog="flax-bert fill-mask", description="Top-k predictions for the mask token(s) in a sentence.")
    parser.add_argument("model", help="an exported Hugging Face folder or a run directory (latest checkpoint)")
    parser.add_argument("text", nargs="+", help="sentence(s) with the mask token, e.g. 'Paris is the <mask> of France.'")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--step", type=int, help="run directory: this checkpoint instead of the latest")
    args = parser.parse_args(argv)
    from flax_bert.fill_mask import fill_mask, format_probability, load_for_inference

    model, tokenizer = load_for_inference(args.model, args.step)
    for text in args.text:
        print(text)
        predictions = fill_mask(model, tokenizer, text, args.top_k)
        for number, ranked in enumerate(predictions, 1):
            if len(predictions) > 1:
                print(f"  mask {number} of {len(predictions)}:")
            for rank, (token, score) in enumerate(ranked, 1):
                print(f"  {rank}. {token!r:20} {format_probability(score)}")
    return 0


# ----------------------------------------------------------------------------- plot / bench
def plot_main(argv) -> int:
    parser = OneLineErrorParser(prog="flax-bert plot", description="Draw a run's training curves (metrics.jsonl) to a PNG.")
    parser.add_argument("run_dir")
    parser.add_argument("--output", help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    from flax_bert.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.output)}")
    return 0


def bench_main(argv) -> int:
    from flax_bert import bench
    return bench.main(argv)


def compile_main(argv) -> int:
    from flax_bert.tpu_compile import main

    return main(argv)


def finetune_main(argv) -> int:
    from flax_bert.finetune.command import main
    return main(argv)


COMMANDS = {"train": train_command, "eval": eval_main, "prepare": prepare_main, "export": export_main,
            "import": import_main, "train-tokenizer": train_tokenizer_main, "fill-mask": fill_mask_main,
            "plot": plot_main, "bench": bench_main, "finetune": finetune_main,
            "compile": compile_main}


def run_command(function, argv, resumes: bool = False) -> int:
    """One-line errors with a nonzero exit for the project's own input errors (errors.InputError and its
    subclasses); anything else prints its traceback and a last line naming it an internal failure, which
    for a command that `resumes` (train) says that the same command goes on from the latest checkpoint."""
    _setup_logging()
    from flax_bert.errors import InputError

    try:
        return function(argv)
    except InputError as err:
        if os.environ.get("FLAX_BERT_DEBUG"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - not a mistake in the input: the traceback is what a fix needs
        if os.environ.get("FLAX_BERT_DEBUG"):
            raise
        traceback.print_exc()
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        resume = ("; completed checkpoints are kept: the same command resumes the run from the latest" if resumes else "")
        print(f"error: {type(err).__name__}: {first_line} -- an internal failure, not a problem with the options "
              f"(traceback above){resume}", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    from_command_line = argv is None  # not a call from Python (tests, scripts): those never re-execute
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from flax_bert import __version__

        print(f"flax-bert {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"flax-bert: error: unknown command {command!r}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    _quiet_libtpu_without_a_tpu()
    if command in REEXEC_COMMANDS and from_command_line:
        _ensure_hugepages()
        _ignore_signals_at_the_end_of_shutdown()
    code = run_command(COMMANDS[command], rest, resumes=command == "train")
    if command in ("train", "eval") and from_command_line:
        _exit_at_once_on_a_further_signal(code)
    return code


def run_mlm_flax_main(argv=None) -> int:
    _quiet_libtpu_without_a_tpu()
    if argv is None:  # the real command line, not a call from Python
        _ensure_hugepages()
        _ignore_signals_at_the_end_of_shutdown()
    code = run_command(train_main, sys.argv[1:] if argv is None else argv, resumes=True)
    if argv is None:
        _exit_at_once_on_a_further_signal(code)
    return code


def _exit_at_once_on_a_further_signal(code: int) -> None:
    """The run is over (checkpoint saved, or stopped): a ctrl-C or SIGTERM while the interpreter shuts down
    (Orbax and JAX's exit hooks) exits at once with the run's status instead of a traceback from those hooks."""
    import signal

    def exit_now(signum, frame):
        os.write(2, f"\n{signal.Signals(signum).name}: the run has already stopped; exiting now\n".encode())
        os._exit(code)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, exit_now)


def _ignore_signals_at_the_end_of_shutdown() -> None:
    """Registered first, so it runs after the exit hooks registered later (JAX, Orbax): from there on the
    interpreter only tears down, and Python would reset the handler above to the default, which would end an
    exit-0 run with SIGINT's status."""
    import atexit
    import signal

    atexit.register(lambda: [signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)])


REEXEC_COMMANDS = ("train", "eval")  # the ones that run train/eval steps on the host allocator


def _quiet_libtpu_without_a_tpu() -> None:
    """Before JAX is imported: libtpu (the tpu extra) on a machine without a TPU gets its compile-only settings
    instead of printing its probing errors at every start; JAX runs on the CPU either way."""
    from flax_bert.training import accelerators
    accelerators.quiet_libtpu_without_a_tpu()


def _ensure_hugepages() -> None:
    """Before anything heavy is imported: the train command gets glibc's huge pages on CPU by itself."""
    from flax_bert.training import host_allocator
    host_allocator.ensure_hugepages()


if __name__ == "__main__":
    sys.exit(main())
