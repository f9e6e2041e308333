"""Every command in README.md and docs/*.md runs as typed.

Each shell command in a ```bash block that starts with `flax-bert` or `python run_mlm_flax.py` is parsed by the
command's own parser (every flag exists, the values parse, a YAML run config loads and validates). The ones of
the main job and the quick start that need nothing but this checkout (no data files, no model folder, no
marker) also run end to end, shortened (fewer steps, smaller rows, a sample of the built-in corpus), in order.
A command that needs what a test machine lacks carries a marker on its line, `# needs: tpu|gpu|hub|bucket|hosts`,
and is parsed only. `--step N` of a run directory must name a checkpoint its documented training command saves.
"""
import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.xla_env import one_device_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
END_TO_END_DOCS = ("README.md", "quickstart.md")
NEEDS = {"tpu", "gpu", "hub", "bucket", "hosts"}
TRAIN_LIKE = {"train": ("flax-bert train", {"do_train": True, "do_eval": True}),
              "prepare": ("flax-bert prepare", {"do_train": True, "do_eval": True}),
              "eval": ("flax-bert eval", {"do_train": False, "do_eval": True}),
              "run_mlm_flax.py": ("run_mlm_flax.py", None)}
# the shortened run: a sample of the built-in corpus, small rows, checkpoints at steps 4 and 8
SHORT_TRAIN = ["--max_steps", "8", "--save_steps", "4", "--eval_steps", "4", "--logging_steps", "4",
               "--max_train_samples", "300", "--max_eval_samples", "32", "--tokenizer_vocab_size", "600",
               "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_seq_length", "64"]
SHORT_STEP = "4"
NEEDS_LOCAL_FILES = ("--train_file", "--validation_file", "--tokenizer_name", "--model_name_or_path",
                     "--resume_from_checkpoint", "--config_name")


@dataclass
class DocCommand:
    doc: str
    line: str            # as written, variables of its block substituted
    argv: list[str]      # after `flax-bert` (the subcommand first) or after `python` (run_mlm_flax.py first)
    needs: str | None

    @property
    def command(self) -> str:
        return self.argv[0]

    def __str__(self):
        return f"{self.doc}: {self.line}"


def doc_commands() -> list[DocCommand]:
    found = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", doc.read_text(), re.S):
            block = re.sub(r"\\\n\s*", " ", block)  # continuation lines
            variables = {name: value.strip("'\"") for name, value in  # NAME=value or NAME="several words"
                         re.findall(r"^\s*([A-Za-z_]\w*)=(\"[^\"]*\"|'[^']*'|\S+)\s*$", block, re.M)}
            for line in block.splitlines():
                needs = re.search(r"#\s*needs:\s*([\w, ]+)", line)
                code = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
                for part in re.split(r"\s*(?:&&|;)\s*", code):
                    part = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], "0"), part.strip().rstrip("&").strip())
                    if part.startswith("flax-bert "):
                        argv = shlex.split(part)[1:]
                    elif part.startswith("python run_mlm_flax.py"):
                        argv = shlex.split(part)[1:]
                    else:
                        continue
                    found.append(DocCommand(doc.name, part, argv, needs[1].strip() if needs else None))
    return found


COMMANDS = doc_commands()


class Parsed(Exception):
    """Raised in place of running a command once its arguments parsed."""


def parse_only(command: DocCommand, monkeypatch) -> None:
    from flax_bert import cli
    from flax_bert.run.config import parse_run_config, resolve_config_file

    name, rest = command.command, list(command.argv[1:])
    if name in TRAIN_LIKE:
        prog, defaults = TRAIN_LIKE[name]
        if name == "eval" and rest and not rest[0].startswith("-") and not rest[0].endswith(".yaml"):
            rest = ["--output_dir", rest[0], *rest[1:]]  # `flax-bert eval RUN_DIR`, as eval_main does
        parse_run_config(rest, prog=prog, defaults=defaults)
        return
    assert name in cli.COMMANDS, f"no command {name!r}"
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed) as parsed:
        cli.COMMANDS[name](rest)
    if name == "bench":
        resolve_config_file(parsed.value.args[0].config)


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 30 and {c.doc for c in COMMANDS} >= {"README.md", "quickstart.md", "modernbert.md"}


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.doc}:{i}" for i, c in enumerate(COMMANDS)])
def test_every_documented_command_parses(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    try:
        parse_only(command, monkeypatch)
    except SystemExit as stop:
        pytest.fail(f"{command} does not parse (exit {stop.code})")


def test_commands_that_need_a_machine_or_service_say_so():
    for command in COMMANDS:
        wants = ({"hub"} if "--push_to_hub" in command.argv or "--dataset_name" in command.argv else set()) | (
            {"bucket"} if re.search(r"\b(gs|s3)://", command.line) else set()) | (
            {"hosts"} if "--coordinator_address" in command.argv and "127.0.0.1" not in command.line else set())
        marked = set(re.split(r"[, ]+", command.needs)) if command.needs else set()
        assert marked <= NEEDS, f"{command}: unknown marker {command.needs!r} (use {', '.join(sorted(NEEDS))})"
        assert wants <= marked, f"{command}: mark it `# needs: {', '.join(sorted(wants))}`"


def saved_steps(train: DocCommand) -> tuple[str, set[int]]:
    """(output_dir, the steps whose checkpoints the documented training keeps)."""
    from flax_bert.run.config import parse_run_config

    prog, defaults = TRAIN_LIKE[train.command]
    run = parse_run_config(list(train.argv[1:]), prog=prog, defaults=defaults)
    steps = sorted({s for s in range(run.save_steps, run.max_steps + 1, run.save_steps or run.max_steps)}
                   | {run.max_steps})
    return os.path.normpath(run.output_dir), set(steps[-run.save_total_limit:])


def test_a_documented_step_is_one_the_documented_run_saves(monkeypatch):
    monkeypatch.chdir(ROOT)
    runs: dict[str, set[int]] = {}
    for command in COMMANDS:
        if command.command in ("train", "run_mlm_flax.py") and "--do_eval" not in command.argv[1:2]:
            out, steps = saved_steps(command)
            runs.setdefault(out, set()).update(steps)
    checked = 0
    for command in COMMANDS:
        if "--step" in command.argv and command.command in ("export", "fill-mask"):
            run_dir = os.path.normpath(command.argv[1])
            step = int(command.argv[command.argv.index("--step") + 1])
            if run_dir in runs:
                assert step in runs[run_dir], f"{command}: {run_dir} keeps checkpoints {sorted(runs[run_dir])}"
                checked += 1
    assert checked >= 3


def runs_end_to_end(command: DocCommand, produced: set[str]) -> bool:
    if command.doc not in END_TO_END_DOCS or command.needs or command.command in ("import", "train-tokenizer", "bench"):
        return False
    if any(flag in command.argv for flag in NEEDS_LOCAL_FILES):
        return False
    if command.command in ("train", "run_mlm_flax.py", "prepare"):
        return True
    return os.path.normpath(command.argv[1]) in produced


def test_the_main_job_and_the_quick_start_run_as_typed(tmp_path, monkeypatch):
    """The commands run in order in one folder (configs/ beside them, as in a checkout), each once."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = one_device_env()
    env.update(HF_HUB_OFFLINE="1", FLAX_BERT_HUGEPAGES="0", FLAX_BERT_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT))
    monkeypatch.chdir(tmp_path)
    produced, ran, seen = set(), [], set()
    for command in COMMANDS:
        if command.line in seen or not runs_end_to_end(command, produced):
            continue
        seen.add(command.line)
        argv = list(command.argv)
        if command.command in ("train", "run_mlm_flax.py"):
            argv += SHORT_TRAIN
            produced.add(saved_steps(command)[0])
        if "--step" in argv:
            argv[argv.index("--step") + 1] = SHORT_STEP
        if "--to" in argv:
            produced.add(os.path.normpath(argv[argv.index("--to") + 1]))
        program = [str(ROOT / "run_mlm_flax.py")] if command.command == "run_mlm_flax.py" else ["-m", "flax_bert.cli"]
        done = subprocess.run([sys.executable, *program, *(argv[1:] if command.command == "run_mlm_flax.py" else argv)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        ran.append(command.command)
    assert {"train", "eval", "export", "fill-mask", "plot"} <= set(ran), ran
