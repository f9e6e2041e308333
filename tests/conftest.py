"""Test setup: no network, 8 simulated CPU devices and the test run's compile options (set before jax is imported)."""
import os
import pathlib

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
from tests.xla_env import SWITCH  # noqa: E402

os.environ.setdefault(SWITCH, "1")  # cheaper compiles for the tiny models (tests/xla_env.py)

# One persistent XLA compilation cache for the whole test run: the pytest process, its xdist workers and every
# run they start as a subprocess inherit this variable, so a train step compiled once (same program, same
# devices) is read from disk by the next test that builds it. The process that made the folder removes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="flax-bert-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

# libtpu, which the test extra installs for the TPU compile tests, probes for a TPU at every JAX start and
# prints five lines of warnings on a machine without one, before the one-line errors the tests read. The
# compile-only settings keep it quiet, in every process of the test run whichever test runs first.
from flax_bert.training.accelerators import use_compile_only_settings  # noqa: E402  (imports no JAX)

use_compile_only_settings()

import pytest  # noqa: E402

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DIR = PROJECT_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared (WikiText-2 raw, the GPT-2 BPE); skip when this checkout has none."""
    if not (SHARED_DIR / "data" / "wikitext-2-raw" / "wiki.valid.raw").is_file():
        pytest.skip("../shared/data is absent")
    return SHARED_DIR


@pytest.fixture(scope="session")
def gpt2_bpe_dir(shared_dir) -> pathlib.Path:
    path = shared_dir / "tokenizers" / "gpt2-bpe"
    if not (path / "vocab.json").is_file():
        pytest.skip("../shared/tokenizers/gpt2-bpe is absent")
    return path
