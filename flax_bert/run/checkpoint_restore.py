"""Restoring one checkpoint bundle: the full train state onto any mesh, the parameters alone onto the host, or
the parameters and step with a fresh optimizer state; and telling a different model or optimizer (a mistake to
report, CheckpointMismatchError) from a bundle that fits. Which bundle to try is flax_bert.run.checkpoint_search's
job; writing them is flax_bert.run.checkpoint's."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from flax_bert.errors import InputError


class CheckpointMismatchError(InputError):
    """The checkpoint is intact but holds a different model or optimizer than the one to restore into.
    `optimizer_only`: the parameters and step fit, only the optimizer state differs (--reset_optimizer helps)."""

    def __init__(self, message: str, optimizer_only: bool = False):
        super().__init__(message)
        self.optimizer_only = optimizer_only


@dataclasses.dataclass
class Restored:
    state: Any
    data_state: dict
    run_config: dict
    step: int
    rng_key: jax.Array | None = None
    metrics: dict | None = None
    path: str = ""
    optimizer_reset: bool = False  # the saved optimizer state did not fit: parameters kept, optimizer state fresh

    def __iter__(self):  # `state, data_state, run_config, step = checkpointer.restore(...)`
        return iter((self.state, self.data_state, self.run_config, self.step))


def restore_bundle(manager: ocp.CheckpointManager, directory: epath.Path, step: int, abstract,
                   reset_optimizer: Callable | None = None) -> Restored:
    """One bundle onto the shardings of `abstract`; a different model or optimizer raises
    CheckpointMismatchError (or, with `reset_optimizer` and only the optimizer differing, keeps the rest)."""
    path = directory / str(step)
    mismatch = incompatibility(path, abstract, offer_reset=reset_optimizer is None)
    if mismatch is not None and not (reset_optimizer and mismatch.optimizer_only):
        raise mismatch
    if mismatch is not None:
        return restore_with_fresh_optimizer(path, abstract, reset_optimizer)
    items = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    state = jax.block_until_ready(items.state)
    meta = dict(items.meta or {})
    return Restored(state=state, data_state=dict(items.data or {}), run_config=dict(items.config or {}), step=step,
                    rng_key=_rng_key(meta.get("rng")), metrics=meta.get("metrics"),
                    path=str(path))


def restore_with_fresh_optimizer(path: epath.Path, abstract, reset_optimizer: Callable) -> Restored:
    """Step and parameters from the checkpoint (onto the target's shardings), the optimizer state new."""
    wanted = {"step": abstract.step, "params": abstract.params}
    kept = ocp.PyTreeCheckpointer().restore(path / "state", args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted), partial_restore=True))
    step = local_scalar(kept["step"])
    state = abstract.replace(step=kept["step"], params=kept["params"],
                             opt_state=reset_optimizer(kept["params"], step))
    json_items = {name: read_json_item(path / name) for name in ("data", "config", "meta")}
    meta = dict(json_items["meta"] or {})
    return Restored(state=jax.block_until_ready(state), data_state=dict(json_items["data"] or {}),
                    run_config=dict(json_items["config"] or {}), step=step, rng_key=_rng_key(meta.get("rng")),
                    metrics=meta.get("metrics"), path=str(path), optimizer_reset=True)


def restore_params_only(directory: epath.Path, step: int) -> Restored:
    """The parameters as host NumPy arrays and the run config, without a model, a mesh or the optimizer state."""
    path = directory / str(step)
    tree = tree_metadata(path / "state")
    if "params" not in tree:
        raise CheckpointMismatchError(f"{path} holds no 'params' item: not a flax-bert checkpoint")
    params = read_arrays_on_host(path / "state", {"params": tree["params"]})["params"]
    return Restored(state=params, data_state={}, run_config=dict(read_json_item(path / "config")), step=step,
                    path=str(path))


def incompatibility(path: epath.Path, abstract, offer_reset: bool = True) -> CheckpointMismatchError | None:
    """A different model or optimizer is a mistake to report, not damage to skip past. Compares every array's
    name, shape and dtype in the saved tree metadata with the tree this run builds, named the way Orbax names
    them (ocp.tree.serialize_tree), before anything is read."""
    saved = {_path_key(k): (tuple(m.shape), np.dtype(m.dtype)) for k, m in
             jax.tree_util.tree_flatten_with_path(tree_metadata(path / "state"))[0]}
    wanted = {_path_key(k): (tuple(a.shape), np.dtype(a.dtype)) for k, a in
              jax.tree_util.tree_flatten_with_path(ocp.tree.serialize_tree(abstract, keep_empty_nodes=True))[0]}
    if saved == wanted:
        return None

    def shown(spec):
        return "absent" if spec is None else f"{spec[1]}{list(spec[0])}"
    differing = [k for k in sorted(set(saved) | set(wanted), key=lambda k: (k[:1] != ("params",), k))  # params first
                 if saved.get(k) != wanted.get(k)]
    details = "; ".join(f"{'.'.join(k)}: {shown(saved.get(k))} saved, {shown(wanted.get(k))} wanted"
                        for k in differing[:3]) + ("; ..." if len(differing) > 3 else "")
    if all(k[:1] == ("opt_state",) for k in differing):
        fix = ("resume with the optimizer options it was saved with (--optimizer, --max_grad_norm, ...)"
               + (", or pass --reset_optimizer to keep its parameters, step and data position with a fresh "
                  "optimizer state" if offer_reset else ""))
        return CheckpointMismatchError(f"checkpoint {path} holds another optimizer state than this run builds "
                                       f"({len(differing)} arrays differ: {details}): {fix}", optimizer_only=True)
    return CheckpointMismatchError(f"checkpoint {path} holds a different model ({details}): resume with the model "
                                   "options it was saved with, or start over in another --output_dir")


def read_arrays_on_host(item_dir: epath.Path, tree: dict) -> dict:
    """The arrays of `tree` (saved-metadata leaves) read from a bundle's state item into host NumPy arrays."""
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    return ocp.PyTreeCheckpointer().restore(item_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=as_numpy, partial_restore=True))


def read_json_item(item_dir) -> dict:
    """A bundle's JSON item (data, config or meta)."""
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(epath.Path(item_dir))


def tree_metadata(item_dir: epath.Path) -> dict:
    metadata = ocp.StandardCheckpointHandler().metadata(item_dir)
    return dict(getattr(metadata, "tree", metadata))


def _path_key(key_path) -> tuple[str, ...]:
    """The same leaf named the same way in a restored target and in Orbax's metadata dicts."""
    return tuple(re.findall(r"[A-Za-z0-9_]+", jax.tree_util.keystr(key_path)))


def abstract_leaf(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        raise ValueError("restore needs the target shardings: pass jax.ShapeDtypeStruct(shape, dtype, sharding=...) "
                         "leaves (Trainer.abstract_state with Trainer.state_shardings) or arrays")
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def local_scalar(x) -> int:
    """A replicated scalar's value; this process's copy, as the array may span several processes."""
    return int(np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x))


def _rng_key(record: dict | None):
    if not record:
        return None
    return jax.random.wrap_key_data(np.asarray(record["key_data"], np.uint32), impl=record["impl"])
