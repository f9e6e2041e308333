"""Train a RoBERTa-style byte-level BPE or a BERT-style WordPiece tokenizer and save a folder that
``transformers.AutoTokenizer.from_pretrained`` loads as ``RobertaTokenizer`` / ``BertTokenizer``.

The folder holds ``tokenizer.json`` (the full ``tokenizers`` pipeline) and ``tokenizer_config.json``
(the transformers class and the special tokens); the CLI's ``flax-bert train-tokenizer`` calls
:func:`train_tokenizer_from_args`, which reads the same sources as training (see ``flax_bert.data.sources``).
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import shutil
import tempfile
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from flax_bert.errors import InputError

# Ids 0..4 in this order, like roberta-base (<s>=0, <pad>=1, </s>=2, <unk>=3) with <mask> next.
BPE_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
WORDPIECE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_VOCAB_SIZE = {"bpe": 50265, "wordpiece": 30522}


def trained_special_ids(kind: str) -> dict[str, int | None]:
    """pad/bos/eos/cls/sep ids of a tokenizer trained here (the special tokens come first, in the order above),
    for a model built before or without one (the benchmark)."""
    if kind == "bpe":
        bos, pad, eos = (BPE_SPECIAL_TOKENS.index(t) for t in ("<s>", "<pad>", "</s>"))
        return {"pad_token_id": pad, "bos_token_id": bos, "eos_token_id": eos, "cls_token_id": bos, "sep_token_id": eos}
    pad, cls, sep = (WORDPIECE_SPECIAL_TOKENS.index(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
    return {"pad_token_id": pad, "bos_token_id": None, "eos_token_id": None, "cls_token_id": cls, "sep_token_id": sep}


class TokenizerTrainingError(InputError):
    """Bad input to tokenizer training; the message names the problem and the fix."""


def _byte_level_bpe(vocab_size: int, min_frequency: int):
    tokenizer = Tokenizer(models.BPE())  # byte-level: every byte is in the alphabet, no unknowns
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # lstrip on <mask> makes "a <mask>" put the space into the mask, as roberta-base does.
    specials = [AddedToken(t, special=True, lstrip=(t == "<mask>")) for t in BPE_SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    config = {
        "tokenizer_class": "RobertaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
        "add_prefix_space": False, "trim_offsets": True,
    }
    return tokenizer, trainer, config


def _wordpiece(vocab_size: int, min_frequency: int, lowercase: bool):
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(WORDPIECE_SPECIAL_TOKENS),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": lowercase,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]", "tokenize_chinese_chars": True, "strip_accents": None,
    }
    return tokenizer, trainer, config


def _add_post_processor(tokenizer: Tokenizer, kind: str) -> None:
    ids = {token: tokenizer.token_to_id(token) for token in (*BPE_SPECIAL_TOKENS, *WORDPIECE_SPECIAL_TOKENS)}
    if kind == "bpe":
        tokenizer.post_processor = processors.RobertaProcessing(
            ("</s>", ids["</s>"]), ("<s>", ids["<s>"]), trim_offsets=True, add_prefix_space=False
        )
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
        )


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bpe",
    vocab_size: int | None = None,
    min_frequency: int = 2,
    output_dir: str | os.PathLike = "tokenizer",
    model_max_length: int = 512,
    lowercase: bool = True,
):
    """Trains a tokenizer on ``texts`` and saves it to ``output_dir``; returns it loaded back through
    ``AutoTokenizer`` (so the caller holds exactly what a later run will load).

    kind: "bpe" (byte-level BPE, RoBERTa; vocab 50265 by default) or "wordpiece" (BERT; 30522;
    ``lowercase`` applies to WordPiece only). Nothing is written when the input is bad.
    """
    if kind not in DEFAULT_VOCAB_SIZE:
        raise TokenizerTrainingError(f"unknown tokenizer kind {kind!r}: use 'bpe' (RoBERTa) or 'wordpiece' (BERT)")
    vocab_size = vocab_size or DEFAULT_VOCAB_SIZE[kind]
    minimum = 256 + len(BPE_SPECIAL_TOKENS) if kind == "bpe" else len(WORDPIECE_SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise TokenizerTrainingError(f"vocab_size={vocab_size} is too small for a {kind} tokenizer: "
                                     f"use at least {minimum}")
    texts = iter(texts)
    first = next((t for t in texts if t and t.strip()), None)
    if first is None:
        raise TokenizerTrainingError("no text to train the tokenizer on: check the dataset or --train_file")
    if kind == "bpe":
        tokenizer, trainer, config = _byte_level_bpe(vocab_size, min_frequency)
    else:
        tokenizer, trainer, config = _wordpiece(vocab_size, min_frequency, lowercase)
    tokenizer.train_from_iterator(itertools.chain([first], texts), trainer)
    _add_post_processor(tokenizer, kind)
    config["model_max_length"] = model_max_length

    # Write into a temp folder beside the target, then move, so a failure leaves no half folder.
    output_dir = pathlib.Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    try:
        tokenizer.save(str(staging / "tokenizer.json"))
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        special_map = {k: v for k, v in config.items() if k.endswith("_token")}
        (staging / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
        output_dir.mkdir(exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_and_check(output_dir, expected_size=tokenizer.get_vocab_size(), kind=kind)


def load_and_check(folder: str | os.PathLike, expected_size: int, kind: str):
    """Loads as AutoTokenizer does and checks class and size (transformers silently builds a 5-token
    tokenizer from a wrong keyword, so the size check is what catches a bad folder)."""
    from flax_bert.data.tokenizer_loading import load_tokenizer

    loaded = load_tokenizer(str(folder))
    expected_class = "RobertaTokenizer" if kind == "bpe" else "BertTokenizer"
    if not type(loaded).__name__.startswith(expected_class) or len(loaded) != expected_size:
        raise TokenizerTrainingError(
            f"{folder} reloads as {type(loaded).__name__} with {len(loaded)} tokens, expected {expected_class} with "
            f"{expected_size}: upgrade transformers/tokenizers or report a bug"
        )
    return loaded


def train_tokenizer_from_args(data_args, kind: str = "bpe", vocab_size: int | None = None, min_frequency: int = 2,
                              output_dir: str | os.PathLike = "tokenizer", model_max_length: int = 512,
                              lowercase: bool = True):
    """``flax-bert train-tokenizer``: trains on the training split of the sources in ``data_args``
    (a ``flax_bert.data.pipeline.DataArgs``: hub dataset, local files or the built-in corpus; a list of them:
    the sources of a mixture, one after the other)."""
    from flax_bert.data.sources import training_documents

    every = data_args if isinstance(data_args, list) else [data_args]
    texts = (text for args in every for batch in training_documents(args).batches() for text in batch)
    return train_tokenizer(texts, kind=kind, vocab_size=vocab_size, min_frequency=min_frequency,
                           output_dir=output_dir, model_max_length=model_max_length, lowercase=lowercase)
