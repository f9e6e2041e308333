"""The one place that decides how arrays lie on the device mesh.

Mesh axes: `data` (pure data parallelism), `fsdp` (batch split too, and parameters / optimizer
state sharded), `tensor` (heads and MLP split). Parameters carry logical axis names from the
model; `LOGICAL_RULES` (in `models.partitioning`, beside the activations' rules) maps them onto mesh axes.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from flax_bert.errors import InputError
# the axis names and their rules belong to the models, which name their parameters' and activations' axes
from flax_bert.models.partitioning import BATCH_AXES, LOGICAL_RULES, MESH_AXES  # noqa: F401


class MeshError(InputError):
    """A mesh shape that does not fit the devices."""


def parse_mesh(spec: str | dict[str, int] | None) -> dict[str, int]:
    """`"data=-1,fsdp=1,tensor=1"` (or a dict) -> sizes for every mesh axis; -1 takes what is left."""
    if spec is None or spec == "":
        spec = {}
    if isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in MESH_AXES or not value.strip().lstrip("-").isdigit():
                raise MeshError(f"bad --mesh entry {part!r}: write e.g. data=-1,fsdp=1,tensor=1 (axes {', '.join(MESH_AXES)})")
            sizes[name] = int(value)
        spec = sizes
    unknown = set(spec) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; the axes are {', '.join(MESH_AXES)}")
    sizes = {"data": -1, "fsdp": 1, "tensor": 1} if not spec else {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}
    return sizes


def make_mesh(spec: str | dict[str, int] | None = None, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec)
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise MeshError("only one mesh axis may be -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if len(devices) % known:
            raise MeshError(f"mesh {sizes} does not divide the {len(devices)} devices")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise MeshError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {len(devices)} are available")
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    # Auto axes: the compiler propagates shardings from the inputs and the few constraints we set.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except Exception:  # layouts make_mesh cannot optimize (e.g. a subset of devices): plain reshape
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def spec_for(logical_axes: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Map logical axes to a PartitionSpec; a dimension the mesh axis does not divide is replicated."""
    spec = []
    used = set()
    for name, dim in zip(logical_axes, shape):
        axis = LOGICAL_RULES.get(name) if name is not None else None
        if axis is not None and (axis in used or dim % mesh.shape[axis] or mesh.shape[axis] == 1):
            axis = None
        if axis is not None:
            used.add(axis)
        spec.append(axis)
    # FSDP shards every parameter it can: one with no "embed" axis (a bias, a LayerNorm scale, a
    # stacked layer's leading axis) is split over fsdp along its largest divisible free dimension.
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and "fsdp" not in used:
        free = [i for i, axis in enumerate(spec) if axis is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def logical_axes_of(model) -> dict:
    """A pure-dict tree of each parameter's logical axes (stacked layers get a leading "layers")."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = tuple(var.get_metadata().get("logical_axes") or ())
        if len(axes) < var.get_value().ndim:  # the stacked layer axis
            axes = ("layers",) + axes
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = axes
    return out


def param_shardings(model, params_shape: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pure-dict parameter tree of `model`'s parameters."""
    axes = logical_axes_of(model)
    return jax.tree.map(
        lambda ax, leaf: NamedSharding(mesh, spec_for(ax, leaf.shape, mesh)),
        axes, params_shape, is_leaf=lambda x: isinstance(x, tuple))


def tree_bytes_per_device(tree: Any) -> dict:
    """Bytes of `tree` that each device holds (for checking that FSDP really shards)."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device
