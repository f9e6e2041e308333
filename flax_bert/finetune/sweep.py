"""A sweep: every setting (learning rate x epochs x weight decay) fine-tuned from every seed, each seed's
scores kept in OUTPUT_DIR as it finishes (a rerun skips them), the setting chosen by its mean validation
score, its best seed exported to OUTPUT_DIR/best, and results.json plus a table in the log.

OUTPUT_DIR/
  finetune_config.json        the options that decide the results (a rerun must match them)
  cells/SETTING/seed_S.json   one finished seed: its validation (and test) scores
  cells/SETTING/model/        the setting's best seed so far, a transformers folder
  results.json, best/, test_predictions.tsv
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil

import numpy as np

from flax_bert.errors import InputError
from flax_bert.finetune.data import Encoded
from flax_bert.finetune.metrics import score, summary
from flax_bert.finetune.trainer import ClassifierTrainer, Setting

log = logging.getLogger("flax_bert")

CONFIG_FILE = "finetune_config.json"


@dataclasses.dataclass
class Task:
    name: str                       # "classification" | "regression"
    metric: str                     # the score that picks the setting and the seed
    train: Encoded
    validation: Encoded
    test: Encoded | None = None


def _write_json(path: pathlib.Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def prepare_output_dir(output_dir: pathlib.Path, fixed: dict, overwrite: bool) -> None:
    """Start or resume: finished seeds are kept when the options that decide them are the same."""
    config_file = output_dir / CONFIG_FILE
    if overwrite:
        for name in ("cells", "best"):
            shutil.rmtree(output_dir / name, ignore_errors=True)
        for name in (CONFIG_FILE, "results.json", "test_predictions.tsv"):
            (output_dir / name).unlink(missing_ok=True)
    elif config_file.is_file():
        stored = json.loads(config_file.read_text())
        changed = sorted(key for key in set(stored) | set(fixed) if stored.get(key) != fixed.get(key))
        if changed:
            details = ", ".join(f"{key} {stored.get(key)!r} there, {fixed.get(key)!r} now" for key in changed[:3])
            raise InputError(f"{output_dir} holds fine-tuning results of other options ({details}): rerun with "
                             "those, pass another --output_dir, or --overwrite_output_dir to start over")
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        raise InputError(f"{output_dir} is not empty and holds no fine-tuning results: pass another --output_dir, "
                         "or --overwrite_output_dir to use it anyway")
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(config_file, fixed)


class Sweep:
    def __init__(self, output_dir, trainer: ClassifierTrainer, task: Task, tensors: dict, tokenizer,
                 fresh_mismatched_heads: bool = False):
        self.output_dir, self.trainer, self.task = pathlib.Path(output_dir), trainer, task
        self.tensors, self.tokenizer, self.fresh_mismatched_heads = tensors, tokenizer, fresh_mismatched_heads

    # ------------------------------------------------------------------ one seed
    def _finished(self, setting: Setting) -> dict[int, dict]:
        cell = self.output_dir / "cells" / setting.name
        return {record["seed"]: record for record in
                (json.loads(f.read_text()) for f in sorted(cell.glob("seed_*.json")))}

    def run_seed(self, setting: Setting, seed: int) -> dict:
        cell = self.output_dir / "cells" / setting.name
        cell.mkdir(parents=True, exist_ok=True)
        params = self.trainer.initial_params(self.tensors, seed, self.fresh_mismatched_heads)
        params = self.trainer.fit(params, self.task.train, setting, seed, label=setting.name)
        record = {"seed": seed, "setting": dataclasses.asdict(setting),
                  "validation": score(self.task.name, self.trainer.outputs(params, self.task.validation),
                                      self.task.validation.labels)}
        if self.task.test is not None and self.task.test.labels is not None:
            record["test"] = score(self.task.name, self.trainer.outputs(params, self.task.test), self.task.test.labels)
        log.info("%s seed %d: validation %s", setting.name, seed,
                 ", ".join(f"{k} {v:.4f}" for k, v in record["validation"].items()))
        earlier = [r["validation"][self.task.metric] for r in self._finished(setting).values()]
        if not earlier or record["validation"][self.task.metric] > max(earlier):
            self._save_model(params, cell / "model", record)
        _write_json(cell / f"seed_{seed}.json", record)  # last: a seed counts as finished once its model is in place
        return record

    def _save_model(self, params, folder: pathlib.Path, record: dict) -> None:
        """The setting's best seed so far, written beside the old one and then swapped in."""
        from flax_bert.models.convert import save_hf

        stage, old = folder.with_name(".model.tmp"), folder.with_name(".model.old")
        shutil.rmtree(stage, ignore_errors=True)
        save_hf(self.trainer.model(params), stage, tokenizer=self.tokenizer, overwrite=True,
                extra_files={"finetune.json": json.dumps(record, indent=2, sort_keys=True) + "\n"})
        if folder.exists():
            os.replace(folder, old)
        os.replace(stage, folder)
        shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ the grid
    def run(self, settings: list[Setting], seeds: list[int]) -> dict:
        cells = []
        for setting in settings:
            finished = self._finished(setting)
            if finished:
                kept = sorted(set(finished) & set(seeds))
                log.info("%s: seeds %s finished earlier, kept", setting.name, ", ".join(map(str, kept)) or "none asked")
            for seed in seeds:
                if seed not in finished:
                    finished[seed] = self.run_seed(setting, seed)
            cells.append(self._cell(setting, {seed: finished[seed] for seed in seeds}))
        best = max(cells, key=lambda cell: cell["mean"])
        results = {"metric": self.task.metric, "task": self.task.name, "setting": best["setting"],
                   "per_seed": best["per_seed"], "mean": best["mean"], "median": best["median"], "std": best["std"],
                   "best_seed": best["best_seed"], "cells": cells}
        if "test" in best:
            results["test"] = best["test"]
        self._export_best(Setting(**best["setting"]))
        _write_json(self.output_dir / "results.json", results)
        log.info("%s", results_table(cells, self.task.metric, best))
        return results

    def _cell(self, setting: Setting, records: dict[int, dict]) -> dict:
        metric = self.task.metric
        per_seed = {str(seed): record["validation"][metric] for seed, record in records.items()}
        best_seed = max(records, key=lambda seed: records[seed]["validation"][metric])
        cell = {"setting": dataclasses.asdict(setting), "per_seed": per_seed, **summary(list(per_seed.values())),
                "best_seed": best_seed, "validation": {str(s): r["validation"] for s, r in records.items()}}
        if all("test" in r for r in records.values()):
            test = {str(seed): record["test"][metric] for seed, record in records.items()}
            cell["test"] = {"per_seed": test, **summary(list(test.values()))}
        return cell

    def _export_best(self, setting: Setting) -> None:
        source = self.output_dir / "cells" / setting.name / "model"
        stage, target = self.output_dir / ".best.tmp", self.output_dir / "best"
        shutil.rmtree(stage, ignore_errors=True)
        shutil.copytree(source, stage)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(stage, target)
        log.info("exported the best seed (%s of %s) to %s", json.loads((target / "finetune.json").read_text())["seed"],
                 setting.name, target)

    def write_test_predictions(self, id2label: tuple[str, ...]) -> pathlib.Path | None:
        """The best model's predictions on the test split (labelled or not), one line per example."""
        from flax_bert.models.convert import read_hf_tensors

        if self.task.test is None:
            return None
        params = self.trainer.initial_params(read_hf_tensors(self.output_dir / "best", self.trainer.config), 0, False)
        outputs = self.trainer.outputs(params, self.task.test)
        rows = ([f"{value:.6g}" for value in outputs[:, 0]] if self.task.name == "regression"
                else [id2label[i] for i in np.argmax(outputs, axis=-1)])
        path = self.output_dir / "test_predictions.tsv"
        path.write_text("index\tprediction\n" + "".join(f"{i}\t{row}\n" for i, row in enumerate(rows)))
        log.info("wrote the best model's test predictions to %s", path)
        return path


def results_table(cells: list[dict], metric: str, best: dict) -> str:
    seeds = list(cells[0]["per_seed"])
    header = f"{'setting':<32}" + "".join(f"{'seed ' + s:>10}" for s in seeds) + f"{'mean':>10}{'median':>10}{'std':>10}"
    lines = [f"validation {metric} per seed (* = chosen by the mean; its best seed is exported):", header]
    for cell in cells:
        mark = "*" if cell is best else " "
        lines.append(f"{mark}{Setting(**cell['setting']).name:<31}" + "".join(f"{cell['per_seed'][s]:>10.4f}" for s in seeds)
                     + f"{cell['mean']:>10.4f}{cell['median']:>10.4f}{cell['std']:>10.4f}")
    return "\n".join(lines)
