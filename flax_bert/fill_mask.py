"""Top-k predictions for the mask token, with our JAX model (no PyTorch needed)."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from flax_bert.errors import InputError


def load_for_inference(path: str, step: int | None = None):
    """(model, tokenizer) from an exported Hugging Face folder, or a run directory's checkpoint."""
    from transformers import AutoTokenizer

    from flax_bert.models.convert import WEIGHT_FILES, load_hf

    from flax_bert import storage
    if step is None and storage.isfile(storage.join(path, "config.json")) and any(
            storage.isfile(storage.join(path, f)) for f in WEIGHT_FILES):
        folder = storage.fetch_folder(path)  # a URL: a downloaded copy
        return load_hf(folder), AutoTokenizer.from_pretrained(str(folder))
    folder = path if storage.is_url(path) else pathlib.Path(path)
    from flax_bert.run.directory import load_run_model

    model, tokenizer, _, _ = load_run_model(folder, step)
    return model, tokenizer


def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For every mask token in `text`, in order, its top-k predictions, best first: (token text, probability).
    The masks are predicted together, each seeing the others as masks (as transformers' fill-mask pipeline)."""
    mask = tokenizer.mask_token
    if mask is None or mask not in text:
        raise InputError(f"the text has no mask token: write {mask!r} where the missing word goes")
    encoded = tokenizer(text, return_tensors="np")
    ids = jnp.asarray(encoded["input_ids"])
    positions = [int(i) for i in jnp.flatnonzero(ids[0] == tokenizer.mask_token_id)]
    logits = model(ids, attention_mask=jnp.asarray(encoded["attention_mask"]),
                   masked_positions=jnp.array([positions])).logits[0]
    probs = jax.nn.softmax(logits, axis=-1)
    top = jnp.argsort(-probs, axis=-1)[:, :top_k]
    # a whitespace-only token (a newline) keeps its text, so it does not print as ''
    return [[(_shown(tokenizer.decode([int(i)])), float(row_probs[i])) for i in row_top]
            for row_top, row_probs in zip(top, probs)]


def format_probability(probability: float) -> str:
    """Enough digits that a small probability (an untrained model's 1/vocabulary) does not print as 0.000."""
    return f"{probability:.3f}" if probability >= 0.01 else f"{probability:.2e}"


def _shown(token_text: str) -> str:
    return token_text.strip() or token_text
