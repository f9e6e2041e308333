"""From a run to a Hugging Face folder (config, safetensors, tokenizer, model card) and the Hub."""
from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil

from flax_bert import storage
from flax_bert.errors import InputError, InputFileExistsError
from flax_bert.run.layout import EVALUATION_FILE
from flax_bert.run.options import evaluation_settings
from flax_bert.run.start import claim_written

log = logging.getLogger("flax_bert")

CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: fill-mask
tags: [flax-bert, {model_type}, masked-lm]
---
# {name}

A {architecture} ({layers} layers, hidden size {hidden}, {heads} heads, {params:,} parameters)
pretrained from scratch with [flax-bert](https://pypi.org/project/flax-bert/) in JAX/Flax.

## Training
- data: {data}
- objective: {objective}{wwm}, mask rate {mlm_probability}
- steps: {steps:,}; global batch {global_batch} sequences of {seq_len} tokens; tokens seen: about {tokens_seen:,}
- optimizer: {optimizer}, peak learning rate {learning_rate}, {scheduler} schedule, {warmup} warmup steps

## Final evaluation
{eval_table}

## How to load
```python
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

model = AutoModelForMaskedLM.from_pretrained("{load_path}")
tokenizer = AutoTokenizer.from_pretrained("{load_path}")
fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
print(fill("The capital of France is {mask}."))
```
"""


def model_card(model, tokenizer, run: dict, steps: int, global_batch: int, eval_results: dict | None,
               load_path: str) -> str:
    from flax_bert.models.convert import architecture_of
    from flax_bert.models import count_parameters

    cfg = model.config
    data = run.get("dataset_name") or run.get("train_file") or "the built-in corpus (Python standard library docstrings)"
    if run.get("dataset_config_name"):
        data += f" ({run['dataset_config_name']})"
    metrics = {k: v for k, v in (eval_results or {}).items() if k.startswith("eval") or k == "perplexity"}
    eval_table = "\n".join(f"- {k}: {v:.4f}" for k, v in metrics.items()) or "- not evaluated"
    return CARD_TEMPLATE.format(
        name=pathlib.Path(load_path).name or "model", model_type=cfg.model_type, architecture=architecture_of(model),
        layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
        params=count_parameters(model), data=data, objective=run.get("objective", "mlm"),
        wwm=" with whole-word masking" if run.get("whole_word_masking") else "",
        mlm_probability=run.get("mlm_probability"), steps=steps, global_batch=global_batch,
        seq_len=run.get("max_seq_length"),
        tokens_seen=run.get("tokens_seen") or steps * global_batch * int(run.get("max_seq_length") or 0),
        optimizer=run.get("optimizer"), learning_rate=run.get("learning_rate"), scheduler=run.get("lr_scheduler_type"),
        warmup=run.get("warmup_steps"), eval_table=eval_table, load_path=load_path,
        mask=getattr(tokenizer, "mask_token", "<mask>") or "<mask>")


def write_model_folder(model, folder, tokenizer, run: dict, steps: int, global_batch: int,
                       eval_results: dict | None, overwrite: bool, architecture: str | None = None,
                       load_path: str | None = None) -> pathlib.Path:
    """`folder` may be a URL (flax_bert.storage): written locally, then uploaded (upload_export).
    `load_path`: where the folder will be loaded from, for the model card (default: `folder`)."""
    from flax_bert.models.convert import save_hf

    if storage.is_url(folder):
        if not overwrite and any(storage.exists(storage.join(folder, name)) for name in ("config.json", "model.safetensors")):
            raise InputFileExistsError(f"{folder} already holds a model; pass --overwrite to replace it")
        stage = storage.local_stage(folder)  # transformers writes local folders only
        try:
            write_model_folder(model, stage, tokenizer, run, steps, global_batch, eval_results, True, architecture,
                               load_path=load_path or folder)
            upload_export(stage, folder)
            claim_written(folder, *storage.listdir(stage))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return folder

    card = model_card(model, tokenizer, run, steps, global_batch, eval_results, load_path or str(folder))
    extra_files = {"README.md": card, EVALUATION_FILE: json.dumps(evaluation_settings(run), indent=2, sort_keys=True)}
    save_hf(model, folder, architecture=architecture, overwrite=overwrite, extra_files=extra_files)
    written = ["config.json", "model.safetensors", *extra_files]
    if tokenizer is not None:
        written += [pathlib.Path(name).name for name in tokenizer.save_pretrained(str(folder))]
    claim_written(folder, *[name for name in written if (pathlib.Path(folder) / name).exists()])  # a run's output_dir records what its export wrote
    return pathlib.Path(folder)


def card_options(job, step: int) -> dict:
    """The options an export of `step` states (model card, evaluation settings): its phase's length and rates
    (what evaluating the export scores) and the tokens trained up to it."""
    return {**job.phase_run.to_dict(), "tokens_seen": job.plan.tokens_until(step)}


def export_run(job, params, eval_results: dict | None = None) -> pathlib.Path | None:
    """At the end of training: the final model into OUTPUT_DIR itself (checkpoints live in a subfolder).
    Every process must call it: parameters split over several processes' devices are gathered first."""
    params = gathered_on_every_process(params)
    step = int(gathered_on_every_process(job.final_state.step))
    if not job.is_main:
        return None
    model = job.trainer.model(params)  # the last phase's model: its RoPE theta and positions
    folder = write_model_folder(model, job.output_dir, job.tokenizer, card_options(job, step), step,
                                job.plan.global_batch_at(step - 1),
                                eval_results, overwrite=True)
    log.info("exported the final model (step %d) to %s", step, folder)
    if job.run.push_to_hub:
        # the final checkpoint is the exported step: exporting it again in place gives the same folder
        retry = export_command(job.run.output_dir, job.run.output_dir, job.run.hub_model_id, job.run.hub_private_repo)
        push_to_hub(folder, job.run.hub_model_id, job.run.hub_token, job.run.hub_private_repo, retry=retry)
    return folder


def upload_export(stage, url: str) -> None:
    """A Hugging Face folder to a URL so that it is never mistaken for finished while incomplete: the old
    config.json (if any) is deleted first, config.json is copied last, and nothing loads without it."""
    names = storage.upload_marker_last(stage, url, "config.json")
    log.info("uploaded the export (%d files, config.json last) to %s", len(names), url)


def gathered_on_every_process(tree):
    """`tree` as host NumPy arrays, whatever the mesh: a leaf whose shards sit on other processes' devices
    (fsdp or tensor spanning hosts) cannot be fetched by one process alone, so all processes gather it
    together (a collective: call it on every process)."""
    import jax
    import numpy as np

    leaves = jax.tree.leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated for x in leaves):
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def export_command(run_dir, to, hub_model_id: str, private: bool = False, step: int | None = None,
                   revision: str | None = None) -> str:
    """The `flax-bert export` command that exports `run_dir` into `to` again and uploads it: what to run after a
    failed upload (the exported folder holds no checkpoint to export from)."""
    return (f"flax-bert export {run_dir}" + (f" --step {step}" if step is not None else "")
            + f" --to {to} --overwrite --push_to_hub --hub_model_id {hub_model_id}"
            + (" --hub_private_repo" if private else "") + (f" --hub_revision {revision}" if revision else ""))


def revision_branch(step: int) -> str:
    """The Hub branch of an intermediate checkpoint: zero-padded, so that the branches sort by step."""
    return f"step-{step:07d}"


def push_revision(job, params, step: int) -> None:
    """--hub_revision_steps: an export of `step` to its own branch of --hub_model_id. Every process calls it
    (parameters on several processes' devices are gathered together); process 0 uploads. A failed upload is a
    warning naming the command that retries it, and training goes on."""
    params = gathered_on_every_process(params)
    if not job.is_main:
        return
    import tempfile

    branch = revision_branch(step)
    stage = pathlib.Path(tempfile.mkdtemp(prefix=f"flax-bert-{branch}-"))
    try:
        folder = write_model_folder(job.trainer.model(params), stage, job.tokenizer, card_options(job, step), step,
                                    job.plan.global_batch_at(step - 1), None, overwrite=True,
                                    load_path=f"{job.run.hub_model_id} (revision {branch})")
        retry = export_command(job.run.output_dir, f"{job.run.output_dir}-{branch}", job.run.hub_model_id,
                               job.run.hub_private_repo, step, branch)
        push_to_hub(folder, job.run.hub_model_id, job.run.hub_token, job.run.hub_private_repo, retry=retry,
                    revision=branch)
    except HubUploadError as err:
        log.warning("step %d not on the Hub, training goes on: %s (while checkpoints/%d is kept)", step, err, step)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class HubUploadError(InputError, RuntimeError):
    """The local export is complete, but the upload failed."""


def push_to_hub(folder, repo_id: str, token: str | None = None, private: bool = False, retry: str | None = None,
                revision: str | None = None) -> str:
    """Upload an exported folder; the token comes from the argument or $HF_TOKEN and is never printed.
    `retry`: the command that exports and uploads again, named in the error when the upload fails. `revision`: a
    branch, created from main where it does not exist yet (default: main itself)."""
    import huggingface_hub

    token = token or os.environ.get("HF_TOKEN")
    folder = storage.fetch_folder(folder)  # the Hub client uploads local files
    files = ["config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "vocab.json", "merges.txt", "vocab.txt"]
    try:
        api = huggingface_hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=files, revision=revision,
                          commit_message="Upload model pretrained with flax-bert" + (f" ({revision})" if revision else ""))
    except Exception as err:  # offline, bad token, no permission: say so without the token
        message = str(err).replace(token, "***") if token else str(err)
        raise HubUploadError(f"the model is exported to {folder}, but uploading it to {repo_id} failed "
                             f"({type(err).__name__}: {message.splitlines()[0][:200] if message else 'no details'}); "
                             f"check the network and token (--hub_token or $HF_TOKEN), then run: "
                             f"{retry or export_command('RUN_DIR', folder, repo_id, private)}") from None
    url = f"https://huggingface.co/{repo_id}" + (f"/tree/{revision}" if revision else "")
    log.info("uploaded to %s", url)
    return url
