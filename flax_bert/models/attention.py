"""The attention core both families share, and the kernels that compute it (`--attention`):

- `xla`: jax.nn.dot_product_attention under a dense [batch, 1, length, length] mask (spelled out when the
  probabilities get dropout); the scores are materialized.
- `splash`: JAX's Pallas TPU splash attention, block-sparse and never materializing the scores: packed
  documents are its segment ids, ModernBERT's sliding window its `LocalMask`. Off a TPU it runs in Pallas
  interpret mode (slow; for tests and checks). It has no dropout on the probabilities.
- `cudnn`: jax.nn.dot_product_attention(implementation="cudnn"), cuDNN's fused attention on NVIDIA GPUs,
  which takes our document and window masks as its (dense) mask; bfloat16/float16, no dropout.
- `auto`: splash on TPU, cudnn on GPU, each where it can run the model; xla otherwise.

`resolve` decides an implementation for a platform (the Trainer logs it); `attend` computes attention.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from flax_bert.errors import InputError
from flax_bert.models import partitioning
from flax_bert.models.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from flax_bert.models.layers import dropout

Array = jax.Array
SPLASH_BLOCK = 128  # splash's tile along the sequence: rows of up to 128 tokens, or a multiple of it


class AttentionError(InputError):
    """An --attention implementation that cannot run this model here."""


@flax.struct.dataclass
class Segments:
    """Who may attend to whom. `ids` [batch, length]: each token's document, 0 for padding. `packed`: a
    query sees its own document's keys; otherwise every non-padding key (transformers' attention_mask)."""

    ids: Array
    packed: bool = flax.struct.field(pytree_node=False, default=True)

    @classmethod
    def of(cls, input_ids: Array, attention_mask: Array | None, segment_ids: Array | None) -> "Segments":
        if segment_ids is not None:
            return cls(segment_ids.astype(jnp.int32), packed=True)
        keys = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        return cls(keys.astype(jnp.int32), packed=False)

    def dense_mask(self) -> Array:
        """[batch, query, key] booleans."""
        ids = self.ids
        if self.packed:
            return (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] > 0)
        return jnp.broadcast_to(ids[:, None, :] > 0, (*ids.shape, ids.shape[1]))


def window_mask(length: int, window: int) -> Array:
    """[length, length]: |query - key| <= window // 2 (transformers' ModernBERT sliding-window rule)."""
    index = jnp.arange(length)
    return jnp.abs(index[:, None] - index[None, :]) <= window // 2


# ----------------------------------------------------------------------------- choosing
TPU_LANES = 128  # the splash kernel's key blocks on a TPU are whole multiples of this


def splash_problem(cfg, platform: str, length: int | None = None) -> str | None:
    if platform == "tpu" and length is not None and length % TPU_LANES:
        return (f"splash on a TPU needs rows of a multiple of {TPU_LANES} tokens, not {length}: change "
                f"--max_seq_length or pass --attention xla")
    if cfg.attention_probs_dropout_prob:
        return (f"splash has no dropout on the attention probabilities (attention_probs_dropout_prob "
                f"{cfg.attention_probs_dropout_prob}): pass --attention_probs_dropout_prob 0 or --attention xla")
    if platform == "gpu":
        return "splash is a TPU kernel: on a GPU pass --attention cudnn or --attention xla"
    return None


def cudnn_problem(cfg, platform: str, length: int | None = None) -> str | None:
    if platform != "gpu":
        return f"cuDNN attention runs on NVIDIA GPUs, not on {platform}: pass --attention xla"
    if cfg.dtype == "float32":
        return "cuDNN fused attention takes bfloat16 or float16: pass --dtype bfloat16 (or --attention xla)"
    if cfg.attention_probs_dropout_prob:
        return (f"cuDNN attention here has no dropout on the probabilities (attention_probs_dropout_prob "
                f"{cfg.attention_probs_dropout_prob}): pass --attention_probs_dropout_prob 0 or --attention xla")
    if cfg.head_dim > 128 or cfg.head_dim % 8:
        return f"cuDNN fused attention takes head sizes up to 128 in steps of 8, not {cfg.head_dim}: pass --attention xla"
    return None


def resolve(requested: str, cfg, platform: str, length: int | None = None) -> tuple[str, str]:
    """(implementation, why) of --attention `requested` for `cfg` on `platform` ("cpu", "gpu", "tpu") with rows of
    `length` tokens; an explicit choice that cannot run is refused in one line."""
    if requested not in IMPLEMENTATIONS:
        raise AttentionError(f"unknown --attention {requested!r}; use one of {', '.join(IMPLEMENTATIONS)}")
    problems = {"splash": splash_problem, "cudnn": cudnn_problem}
    if requested == "auto":
        preferred = {"tpu": "splash", "gpu": "cudnn"}.get(platform)
        if preferred is None:
            return "xla", f"auto on {platform}"
        problem = problems[preferred](cfg, platform, length)
        return ("xla", f"auto on {platform}: not {preferred}, since {problem.split(':')[0]}") if problem else (
            preferred, f"auto on {platform}")
    problem = problems[requested](cfg, platform, length) if requested in problems else None
    if problem:
        raise AttentionError(f"--attention {requested}: {problem}")
    interpret = requested == "splash" and platform != "tpu"
    return requested, f"--attention {requested}" + (f" (Pallas interpret mode on {platform}: slow)" if interpret else "")


def _platform() -> str:
    mesh = partitioning.current_mesh()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


# ----------------------------------------------------------------------------- computing
def attend(q, k, v, segments: Segments, implementation: str = "xla", *, window: int | None = None,
           use_window=True, dropout_rate: float = 0.0, dropout_key=None):
    """Attention of [batch, length, heads, head_dim] q, k, v: each query sees the keys `segments` allows,
    and with `window` only those within window // 2 positions when `use_window` (a bool, or a traced flag:
    ModernBERT's layers choose inside the scan)."""
    if implementation == "auto":  # a model called outside the Trainer (which resolves --attention and logs it)
        implementation = "splash" if _platform() == "tpu" and not dropout_rate else "xla"
    if implementation == "splash":
        return _splash(q, k, v, segments, window, use_window)
    mask = segments.dense_mask()
    if window is not None:
        mask = mask & jnp.where(use_window, window_mask(q.shape[1], window), True)
    mask = mask[:, None]
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if dropout_key is None or dropout_rate == 0.0:
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    scores = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, dropout_key)
    return jnp.einsum("bnqk,bknh->bqnh", probs.astype(v.dtype), v)


def _splash(q, k, v, segments: Segments, window: int | None, use_window):
    """Splash attention, one kernel call per device (shard_map over the batch and the heads) when a mesh is set."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    from jax.sharding import PartitionSpec as P

    batch, length, heads, head_dim = q.shape
    block = min(SPLASH_BLOCK, length)
    if length % block:
        raise AttentionError(f"--attention splash needs rows of at most {SPLASH_BLOCK} tokens or a multiple of "
                             f"{SPLASH_BLOCK}, not {length}: change --max_seq_length or pass --attention xla")
    interpret = _platform() != "tpu"
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # splash takes [heads, length, head_dim] per example and does not scale the scores itself
    q = q * (head_dim ** -0.5)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    kv_ids = segments.ids if segments.packed else (segments.ids > 0).astype(jnp.int32)
    q_ids = segments.ids if segments.packed else jnp.ones_like(kv_ids)  # unpacked: every query sees every real key
    local = jnp.asarray(use_window if window is not None else False)

    def per_device(q, k, v, q_ids, kv_ids, local):
        def run(mask):
            kernel = splash.make_splash_mha(splash.MultiHeadMask([mask] * q.shape[1]), head_shards=1, q_seq_shards=1,
                                            block_sizes=sizes, interpret=interpret)
            return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q_ids, kv_ids))

        full = lambda: run(splash.FullMask((length, length)))  # noqa: E731
        if window is None:
            return full()
        half = window // 2
        return jax.lax.cond(local, lambda: run(splash.LocalMask((length, length), (half, half), 0)), full)

    mesh = partitioning.current_mesh()
    if mesh is None or mesh.size == 1:
        out = per_device(q, k, v, q_ids, kv_ids, local)
    else:
        rows = partitioning.activation_spec(mesh, (batch, heads), ("batch", "heads"))
        qkv_spec, ids_spec = P(rows[0], rows[1], None, None), P(rows[0], None)
        out = jax.shard_map(per_device, mesh=mesh, in_specs=(qkv_spec,) * 3 + (ids_spec,) * 2 + (P(),),
                            out_specs=qkv_spec, check_vma=False)(q, k, v, q_ids, kv_ids, local)
    return out.transpose(0, 2, 1, 3)
