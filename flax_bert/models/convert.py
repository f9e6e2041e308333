"""Weights between Hugging Face folders (PyTorch safetensors / .bin, transformers-4 Flax msgpack) and ours.

Each model family's module (`flax_bert/models/`) has one explicit name table (`name_table`) that
pairs every Hugging Face tensor with a path in our NNX state and says how to transform it; this
module reads and writes files with it, whatever the family. Our encoder layers are stacked on a
leading axis, so the table's per-layer rows carry the layer index.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_bert.errors import InputError, InputFileExistsError, InputFileNotFoundError, MissingDependencyError
from flax_bert.models.config import ConfigError, ModelConfig
from flax_bert.models import all_architectures, architecture_of, family, model_class_for, name_table, normalize_names
from flax_bert.models.layers import Entry  # noqa: F401  (the table rows, re-exported)

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "flax_model.msgpack")


class WeightsError(InputError):
    """A checkpoint whose tensors do not fit the model its config describes."""


# ----------------------------------------------------------------------------- reading files
def is_local_path(path) -> bool:
    """`path` names a folder on this machine (./x, /x, ~/x, a/b/c), not a hub id (roberta-base, user/model)."""
    return pathlib.Path(path).exists() or str(path).count("/") > 1 or str(path).startswith((".", "/", "~"))


def check_local_model_folder(path) -> None:
    """A --model_name_or_path on this machine is a folder with a readable config.json: said before a run writes
    anything, and as itself (not as a tokenizer that cannot be loaded from it)."""
    if path and is_local_path(path):
        from flax_bert.models.config import read_config_json

        folder = resolve_model_folder(path)
        if (folder / "config.json").is_file():
            read_config_json(folder / "config.json")


def resolve_model_folder(path: str | os.PathLike, token: str | None = None, cache_dir: str | None = None) -> pathlib.Path:
    """A local folder as is; a hub id downloaded (with `token` for private models) into `cache_dir`."""
    folder = pathlib.Path(path)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise InputFileNotFoundError(f"{folder} is a file: pass the Hugging Face model folder that holds "
                                     "config.json")
    if is_local_path(path):
        raise InputFileNotFoundError(f"no model folder at {path}: pass a Hugging Face model folder (config.json, "
                                     "weights, tokenizer) or a hub id such as roberta-base")
    try:  # a hub model id such as "roberta-base"
        import huggingface_hub

        return pathlib.Path(huggingface_hub.snapshot_download(
            str(path), token=token, cache_dir=cache_dir, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "pytorch_model.bin", "flax_model.msgpack"]))
    except Exception as err:  # offline, unknown id, no permission
        raise InputFileNotFoundError(
            f"no local folder {folder} and the hub model {path!r} could not be fetched ({type(err).__name__}); "
            "check the name and network, or pass a local folder") from None


def _read_weight_files(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """Tensors by Hugging Face name, as numpy arrays, from the best weight file present."""
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy: how safetensors.numpy reads BF16 without torch)
        from safetensors.numpy import load_file

        return {k: v for f in _shards(folder, "model.safetensors") for k, v in load_file(f).items()}
    if (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        try:
            import torch
        except ImportError:
            raise MissingDependencyError(f"{folder} holds PyTorch .bin weights; install torch "
                                         "(pip install 'flax-bert[torch]') to read them") from None
        tensors = {}
        for f in _shards(folder, "pytorch_model.bin"):
            state = torch.load(f, map_location="cpu", weights_only=True)  # never plain pickle
            tensors.update({k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()})
        return tensors
    if (folder / "flax_model.msgpack").is_file():
        return _msgpack_to_hf_names(folder / "flax_model.msgpack")
    raise InputFileNotFoundError(
        f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def read_hf_tensors(folder: str | os.PathLike, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """A local folder's tensors under the names its family's table uses."""
    return normalize_names(_read_weight_files(pathlib.Path(folder)), cfg)


def _shards(folder: pathlib.Path, single: str) -> Iterator[pathlib.Path]:
    index = folder / f"{single}.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for name in files:
            if not (folder / name).is_file():
                raise InputFileNotFoundError(f"{index} names the shard {name}, which is missing from {folder}")
            yield folder / name
    else:
        yield folder / single


def _msgpack_to_hf_names(file: pathlib.Path) -> dict[str, np.ndarray]:
    """transformers-4 Flax checkpoints use our leaf names (kernel [in, out], scale, embedding)."""
    from flax import serialization
    from flax import traverse_util

    tree = serialization.msgpack_restore(file.read_bytes())
    tensors = {}
    for key_path, value in traverse_util.flatten_dict(tree).items():
        *module, leaf = key_path
        value = np.asarray(value)
        if leaf == "kernel":
            tensors[".".join(module) + ".weight"] = value.T
        elif leaf in ("scale", "embedding"):
            tensors[".".join(module) + ".weight"] = value
        else:
            tensors[".".join(key_path)] = value
    return tensors


# ----------------------------------------------------------------------------- load / save
def load_hf(path: str | os.PathLike, dtype: str | None = None, architecture: str | None = None,
            fresh_mismatched_heads: bool = False, **config_overrides: Any):
    """Load a Hugging Face folder (or hub id) of a registered family into our model.

    `dtype` is the compute dtype; parameters stay in `param_dtype` (fp32 by default).
    `architecture`: "RobertaForMaskedLM" | "BertForMaskedLM" | "BertForPreTraining" or a family's
    *ForSequenceClassification; by default the config's, falling back to the masked-LM model of the family.
    `fresh_mismatched_heads`: a head tensor of another shape (another task's classifier, other
    `id2label`) is left freshly initialized instead of refused.
    """
    folder = resolve_model_folder(path)
    if dtype is not None:
        config_overrides["dtype"] = dtype
    cfg = ModelConfig.from_pretrained(folder, **config_overrides)
    from flax_bert.models.config import read_config_json

    hf_archs = read_config_json(folder / "config.json").get("architectures") or []
    if architecture is None:
        nsp, classifier = family(cfg.model_type).nsp_architecture, family(cfg.model_type).classifier_architecture
        objective = "mlm+nsp" if nsp and nsp in hf_archs else "mlm"
        architecture = classifier if classifier in hf_archs else model_class_for(cfg, objective).__name__
    if architecture not in family(cfg.model_type).all_architectures:
        raise ConfigError(f"architecture {architecture!r} is not a {cfg.model_type} model; use one of "
                          f"{', '.join(family(cfg.model_type).all_architectures)}")
    tensors = normalize_names(_read_weight_files(folder), cfg)
    model = all_architectures()[architecture](cfg, rngs=nnx.Rngs(0))
    fresh = assign_hf_tensors(model, tensors, source=str(folder), fresh_mismatched_heads=fresh_mismatched_heads)
    if fresh:
        log.warning("%s has no %s weights: %s freshly initialized (fine-tune or pretrain before use)",
                    folder, architecture, ", ".join(sorted(fresh)))
    return model


def assign_hf_tensors(model, tensors: dict[str, np.ndarray], source: str = "checkpoint",
                      fresh_mismatched_heads: bool = False) -> set[str]:
    """Copy Hugging Face-named tensors into `model` in place; return the head modules left fresh."""
    cfg: ModelConfig = model.config
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    stacked: dict[tuple, np.ndarray] = {}
    fresh_heads: set[str] = set()
    for entry in name_table(cfg, architecture_of(model)):
        target = flat[entry.path]
        expected = target.shape[1:] if entry.layer is not None else target.shape
        if entry.hf_name not in tensors:
            if entry.head:
                fresh_heads.add(entry.hf_name.rsplit(".", 1)[0])
                continue
            raise WeightsError(f"{source} is missing the tensor {entry.hf_name}")
        value = tensors[entry.hf_name]
        value = value.T if entry.transform == "linear" else value
        if value.shape != tuple(expected) and entry.head and fresh_mismatched_heads:
            fresh_heads.add(entry.hf_name.rsplit(".", 1)[0])
            continue
        if value.shape != tuple(expected):
            raise WeightsError(
                f"{entry.hf_name} in {source} has shape {tuple(tensors[entry.hf_name].shape)} but the config needs "
                f"{tuple(expected[::-1]) if entry.transform == 'linear' else tuple(expected)}")
        if entry.layer is None:
            target.set_value(jnp.asarray(value, dtype=target.dtype))
        else:
            stacked.setdefault(entry.path, np.array(target.get_value()))[entry.layer] = value
    for path, value in stacked.items():
        flat[path].set_value(jnp.asarray(value, dtype=flat[path].dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return fresh_heads


def to_hf_tensors(model, architecture: str | None = None) -> dict[str, np.ndarray]:
    """Our parameters as Hugging Face names and layouts (fp32 numpy, tied decoder left out as HF does)."""
    architecture = architecture or architecture_of(model)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for entry in name_table(model.config, architecture):
        value = np.asarray(flat[entry.path].get_value(), dtype=np.float32)
        if entry.layer is not None:
            value = value[entry.layer]
        out[entry.hf_name] = np.ascontiguousarray(value.T if entry.transform == "linear" else value)
    return out


def save_hf(model, path: str | os.PathLike, tokenizer=None, architecture: str | None = None,
            overwrite: bool = False, extra_files: dict[str, str] | None = None) -> pathlib.Path:
    """Write `config.json`, `model.safetensors` (and the tokenizer) that transformers loads.

    `architecture="BertForMaskedLM"` exports a BertForPreTraining model without its NSP head.
    Files are written under temporary names and renamed, so a crash leaves no half-written model.
    """
    from safetensors.numpy import save_file

    folder = pathlib.Path(path)
    architecture = architecture or architecture_of(model)
    if architecture != architecture_of(model) and (architecture not in family(model.config.model_type).architectures
                                                   or architecture == family(model.config.model_type).nsp_architecture):
        raise ConfigError(f"a {architecture_of(model)} cannot be exported as {architecture}"
                          " (only a model trained with the NSP head can be exported as BertForPreTraining)")
    if not overwrite and any((folder / name).exists() for name in ("config.json", "model.safetensors")):
        raise InputFileExistsError(f"{folder} already holds a model; pass overwrite=True (flax-bert export: "
                                   "--overwrite) to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode()
    files = {
        "model.safetensors": lambda f: save_file(to_hf_tensors(model, architecture), f, metadata={"format": "pt"}),
        "config.json": lambda f: pathlib.Path(f).write_text(
            json.dumps(model.config.to_hf_dict(architecture), indent=2, sort_keys=True) + "\n"),
    }
    for name, text in (extra_files or {}).items():
        files[name] = lambda f, text=text: pathlib.Path(f).write_text(text)
    for name, write in files.items():
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", delete=False) as tmp:
            pass
        try:
            write(tmp.name)
            os.chmod(tmp.name, mode)  # a temporary file is created 0600; the model's files are as any other
            os.replace(tmp.name, folder / name)
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def _new_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask
