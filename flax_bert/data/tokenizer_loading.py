"""Loading a tokenizer as `AutoTokenizer.from_pretrained` does, without importing PyTorch where that is exact.

Importing `AutoTokenizer` imports transformers' model configuration code, and with it PyTorch when it is
installed: 1.0-1.6 s of every train and eval start on a 2-core CPU, for a run that never uses PyTorch.
A local folder whose `tokenizer_config.json` names one of the classes below, and which holds no model
`config.json` (whose model type AutoTokenizer may prefer) and no `auto_map` (custom code), is loaded
by that class directly: the same class AutoTokenizer picks for it. Everything else goes to AutoTokenizer.
"""
from __future__ import annotations

import json
import os
import pathlib

# the classes of the tokenizers flax-bert trains and exports, plus the generic fast tokenizer
DIRECT_CLASSES = frozenset({"RobertaTokenizer", "BertTokenizer", "PreTrainedTokenizerFast", "TokenizersBackend"})


def direct_class_name(source: str | os.PathLike) -> str | None:
    """The class to load `source` with directly, or None where AutoTokenizer must decide."""
    folder = pathlib.Path(source)
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):  # not a local folder, no config, or an unreadable one: AutoTokenizer says why
        return None
    if (folder / "config.json").exists() or not isinstance(config, dict) or "auto_map" in config:
        return None
    name = config.get("tokenizer_class")
    return name if name in DIRECT_CLASSES else None


def load_tokenizer(source: str | os.PathLike, **options):
    """`AutoTokenizer.from_pretrained(source, **options)`, by the named class where `direct_class_name` allows."""
    name = direct_class_name(source)
    if name is not None:
        import transformers

        # AutoTokenizer consumes these itself (v5 tokenizers are always fast; no auto_map here to trust);
        # passed to a class, they would be kept as its init arguments and saved with it
        options = {key: value for key, value in options.items() if key not in ("use_fast", "trust_remote_code")}
        return getattr(transformers, name).from_pretrained(str(source), **options)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **options)
