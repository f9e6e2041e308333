"""`flax-bert finetune MODEL ...`: its options, and the run from them (data, model, trainer, sweep)."""
from __future__ import annotations

import argparse
import logging
import pathlib

from flax_bert.errors import InputError
from flax_bert.finetune.data import TASKS
from flax_bert.finetune.metrics import METRICS

log = logging.getLogger("flax_bert")

DESCRIPTION = """Fine-tune an encoder for sequence classification or regression over a grid of settings x seeds;
write OUTPUT_DIR/results.json (the chosen setting's per-seed validation scores, mean, median, std) and export
its best seed to OUTPUT_DIR/best, a folder transformers' AutoModelForSequenceClassification loads. A rerun of the
same command skips the seeds already finished."""


def _floats(flag: str):
    def parse(text: str) -> list[float]:
        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{flag} takes numbers separated by commas, e.g. 1e-5,3e-5") from None
        if not values:
            raise argparse.ArgumentTypeError(f"--{flag} is empty")
        return values
    return parse


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("--seeds takes integers separated by commas, e.g. 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError("--seeds needs distinct integers, e.g. 1,2,3")
    return seeds


def build_parser():
    from flax_bert.run.config import OneLineErrorParser

    parser = OneLineErrorParser(prog="flax-bert finetune", description=DESCRIPTION)
    parser.add_argument("model", help="a run directory, an exported folder or a Hugging Face folder "
                                      "(BERT, RoBERTa or ModernBERT)")
    data = parser.add_argument_group("data")
    for role in ("train", "validation", "test"):
        data.add_argument(f"--{role}_file", help="a .csv, .tsv, .jsonl/.json or .parquet file"
                          + (" (labels optional: predictions go to OUTPUT_DIR/test_predictions.tsv)" if role == "test" else ""))
    data.add_argument("--dataset_name", help="a hub dataset instead of files, e.g. glue (needs the Hub)")
    data.add_argument("--dataset_config_name", help="its configuration, e.g. sst2")
    data.add_argument("--train_split", default="train")
    data.add_argument("--validation_split", default="validation", help="e.g. validation_matched for MNLI")
    data.add_argument("--test_split", help="a hub split to predict (and score when it has labels)")
    data.add_argument("--text_column", default="sentence")
    data.add_argument("--text_pair_column", help="the second text of a pair task (MRPC, RTE, MNLI, ...)")
    data.add_argument("--label_column", default="label")
    data.add_argument("--task", choices=TASKS, help="default: inferred from the labels (integers or strings: "
                                                    "classification; floats: regression)")
    data.add_argument("--max_seq_length", type=int, default=128, help="longer examples are truncated")
    data.add_argument("--cache_dir", help="the hub datasets' cache")
    data.add_argument("--token", help="Hub token for a private --dataset_name; never saved")
    sweep = parser.add_argument_group("settings and seeds (comma lists make a grid)")
    sweep.add_argument("--learning_rate", type=_floats("learning_rate"), default=[2e-5], help="default 2e-5")
    sweep.add_argument("--num_train_epochs", type=_floats("num_train_epochs"), default=[3.0], help="default 3")
    sweep.add_argument("--weight_decay", type=_floats("weight_decay"), default=[0.01], help="default 0.01")
    sweep.add_argument("--seeds", type=_seeds, default=[1, 2, 3], help="default 1,2,3")
    sweep.add_argument("--metric", choices=METRICS, help="the validation score that picks the setting and the seed "
                                                         "(default: accuracy; pearson for regression)")
    loop = parser.add_argument_group("training")
    loop.add_argument("--per_device_train_batch_size", type=int, default=32)
    loop.add_argument("--warmup_ratio", type=float, default=0.06, help="linear warmup over this share of the steps, "
                                                                       "then linear decay to 0")
    loop.add_argument("--max_grad_norm", type=float, default=1.0, help="0 turns clipping off")
    loop.add_argument("--adam_beta1", type=float, default=0.9)
    loop.add_argument("--adam_beta2", type=float, default=0.98)
    loop.add_argument("--adam_epsilon", type=float, default=1e-6)
    loop.add_argument("--classifier_dropout", type=float, help="default: the model's (BERT/RoBERTa: its hidden "
                                                               "dropout; ModernBERT: 0)")
    loop.add_argument("--classifier_pooling", choices=["cls", "mean"], help="ModernBERT only (default: the model's)")
    loop.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="compute dtype; parameters and optimizer state stay float32")
    loop.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1", help="device mesh, as train's --mesh")
    loop.add_argument("--init_from", help="start from another task's fine-tuned folder (e.g. MNLI's OUTPUT_DIR/best): "
                                          "its encoder, and its classifier when the label count fits")
    loop.add_argument("--progress_bar", action=argparse.BooleanOptionalAction, default=True,
                      help="a bar on a terminal, a line every tenth of the steps elsewhere")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", required=True)
    out.add_argument("--overwrite_output_dir", action="store_true",
                     help="delete the results already there and start over (default: resume from them)")
    return parser


def check_options(args) -> None:
    if args.per_device_train_batch_size < 1:
        raise InputError("--per_device_train_batch_size must be at least 1")
    if not 0 <= args.warmup_ratio < 1:
        raise InputError(f"--warmup_ratio must be in [0, 1), not {args.warmup_ratio}")
    for flag in ("learning_rate", "num_train_epochs"):
        if any(value <= 0 for value in getattr(args, flag)):
            raise InputError(f"--{flag} values must be > 0")
    if any(value < 0 for value in args.weight_decay):
        raise InputError("--weight_decay values must be >= 0")
    if args.max_seq_length < 2:
        raise InputError("--max_seq_length must be at least 2")
    if args.test_split and not args.dataset_name:
        raise InputError("--test_split names a split of --dataset_name; for a file pass --test_file")
    if args.dataset_name is None and not (args.train_file and args.validation_file):
        raise InputError("pass --train_file and --validation_file, or --dataset_name (with --dataset_config_name)")


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    check_options(args)
    from flax_bert.finetune.run import finetune

    results = finetune(args)
    print(f"{results['metric']} {results['mean']:.4f} mean (median {results['median']:.4f}, std {results['std']:.4f}) "
          f"over seeds {', '.join(results['per_seed'])} at {results['setting']}; best seed exported to "
          f"{pathlib.Path(args.output_dir) / 'best'}")
    return 0
