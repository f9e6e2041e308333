#!/usr/bin/env python
"""Pretrain a BERT, RoBERTa or ModernBERT masked-language model with flax-bert, with the flags of Hugging Face's
old `run_mlm_flax.py` example (and more: see --help). Same as `flax-bert train`."""
import sys

from flax_bert.cli import run_mlm_flax_main

if __name__ == "__main__":
    sys.exit(run_mlm_flax_main())
