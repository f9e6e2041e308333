"""Scoring the validation rows: the eval step's sums over every row of every process, the metrics they give
(eval_loss, perplexity, eval_accuracy, NSP's), and for a mixture each source's own loss and accuracy."""
from __future__ import annotations

import logging
from collections.abc import Callable

import jax

from flax_bert.data.mixture import MixtureRows
from flax_bert.training import distributed
from flax_bert.training.step import eval_summary

log = logging.getLogger("flax_bert")


def eval_sums(trainer, params, rows, batch_size: int, to_global: Callable) -> dict[str, float]:
    """The eval step's sums over every row of `rows` (every process's), e.g. mlm_loss and mlm_count. A collective:
    processes may hold different numbers of rows, so each goes on (with empty batches) while any has some."""
    totals: dict[str, float] = {}
    local_batches = rows.eval_batches(batch_size)
    while True:
        local = next(local_batches, None)
        if not distributed.any_process(local is not None):
            break
        if local is None:
            local = rows.empty_batch(batch_size)
        sums = trainer.eval_step(params, to_global(local))
        distributed.settle_before_host_collectives(sums)  # the next any_process is a collective
        sums = jax.device_get(sums)
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def evaluate_rows(trainer, params, eval_rows, batch_size: int, to_global: Callable) -> dict[str, float]:
    """The metrics of `eval_rows` ({} with a warning when there are none); a mixture's sources each on their own
    (eval_loss_NAME, eval_accuracy_NAME), their sums the overall metrics."""
    if eval_rows is None:
        log.warning("no evaluation data: pass --validation_file or --validation_split_percentage > 0")
        return {}
    parts = eval_rows.parts() if isinstance(eval_rows, MixtureRows) else [(None, eval_rows)]
    totals, per_source = {}, {}
    for source, rows in parts:
        per_source[source] = eval_sums(trainer, params, rows, batch_size, to_global)
        for name, value in per_source[source].items():
            totals[name] = totals.get(name, 0.0) + value
    if not totals:
        log.warning("the validation split has no rows: no evaluation")
        return {}
    results = eval_summary(totals)
    for source, sums in per_source.items():
        if source is not None and sums.get("mlm_count"):  # global sums: the same keys on every process
            summary = eval_summary(sums)
            results.update({f"eval_loss_{source}": summary["eval_loss"], f"eval_accuracy_{source}": summary["eval_accuracy"]})
    return results
