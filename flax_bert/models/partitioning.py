"""Logical axis names and the mesh axes they lie on, for parameters and for activations.

The models name the axes of their parameters (`logical_axes` metadata) and of their activations
(`constrain(x, "batch", "length", "embed")`); `LOGICAL_RULES` and `ACTIVATION_RULES` map those names
onto the mesh axes `data`, `fsdp` and `tensor`. Parameters shard their `embed` axis over `fsdp`;
activations never do: they stay split over the batch axes through every layer, so the compiler
all-gathers each layer's weights and reduce-scatters their gradients (FSDP) instead of carrying the
parameters' sharding into the activations (which would move the whole global batch between devices).

`constrain` is a no-op outside `use_mesh(mesh)`: the training steps enter it while tracing; a model
called on its own (fill-mask, conversion) runs unconstrained.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# parameters: logical axis -> mesh axis (None = replicated). Stacked encoder layers add a leading "layers" axis.
LOGICAL_RULES: dict[str, str | tuple | None] = {
    "batch": BATCH_AXES,
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "embed_out": None,
    "heads": "tensor",
    "mlp": "tensor",
    "norm": None,
}

# activations: the batch over both batch axes, heads / MLP / vocabulary columns over tensor; the rest
# (length, embed, head_dim) whole on every device
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
}

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("flax_bert_activation_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    """Within this block (while tracing a step), `constrain` pins activations onto `mesh`."""
    token = _MESH.set(mesh)
    try:
        yield mesh
    finally:
        _MESH.reset(token)


def current_mesh() -> Mesh | None:
    return _MESH.get()


def activation_spec(mesh: Mesh, shape: tuple[int, ...], names: tuple[str | None, ...]) -> P:
    """The PartitionSpec of an activation: each named dimension over its rule's mesh axes (those of size > 1),
    whole where the axes do not divide it."""
    spec = []
    for name, dim in zip(names, shape):
        axes = tuple(a for a in ACTIVATION_RULES.get(name, ()) if mesh.shape.get(a, 1) > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        spec.append(None if not axes or dim % size else (axes if len(axes) > 1 else axes[0]))
    return P(*spec)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Pin `x`'s sharding by the logical names of its dimensions (see ACTIVATION_RULES); a no-op without a mesh."""
    mesh = _MESH.get()
    if mesh is None or mesh.size == 1 or len(names) != x.ndim:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(mesh, x.shape, names)))
