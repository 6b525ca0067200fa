"""Single-device ``jax.numpy`` references for the sequence-parallel attentions (the ground truth
their tests compare against): the whole softmax materialised in float32, obviously correct rather
than fast. Head order is the engine's: q head ``h`` reads KV head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.paged_attention.reference import masked_softmax_matmul

_PV = "bhgqk,bhkd->bhgqd"  # probabilities [B, Hkv, G, Tq, Tk] times values [B, Hkv, Tk, D]


def _grouped(q, k, v):
    """float32 ``q [B, Hkv, G, Tq, D]`` and ``k, v [B, Hkv, Tk, D]`` from ``[B, T, H, D]`` inputs."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"num_q_heads {Hq} is not a multiple of num_kv_heads {Hkv}")
    qg = q.astype(jnp.float32).reshape(B, Tq, Hkv, Hq // Hkv, D).transpose(0, 2, 3, 1, 4)
    return qg, k.astype(jnp.float32).transpose(0, 2, 1, 3), v.astype(jnp.float32).transpose(0, 2, 1, 3)


def causal_attention(q, k, v, lengths=None, *, sm_scale=None, sliding_window=None):
    """Causal self-attention of a batch of sequences padded to one length.

    ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]``; ``lengths`` int ``[B]`` (default ``T``): sequence
    ``b`` is positions ``[0, lengths[b])``, the rest padding. Position ``p`` sees positions ``<= p``
    (and ``> p - sliding_window`` if given) below the length; padding rows output 0. Returns
    ``[B, T, Hq, D]`` in q's dtype.
    """
    B, T, Hq, D = q.shape
    sm_scale = D**-0.5 if sm_scale is None else sm_scale
    lengths = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    qg, kt, vt = _grouped(q, k, v)
    pos = jnp.arange(T)
    mask = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < lengths[:, None, None])
    mask &= pos[None, :, None] < lengths[:, None, None]
    if sliding_window is not None:
        mask &= (pos[None, :] > pos[:, None] - sliding_window)[None]
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, kt, precision=lax.Precision.HIGHEST) * sm_scale
    out = masked_softmax_matmul(s, mask[:, None, None], vt, _PV)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D).astype(q.dtype)


def decode_attention(q, k, v, kv_lens, *, sm_scale=None):
    """One decode query per row over its whole KV.

    ``q [B, Hq, D]``, ``k, v [B, L, Hkv, D]``, ``kv_lens`` int ``[B]``: row ``b`` sees positions
    ``[0, kv_lens[b])`` (its own token included); a row with ``kv_lens == 0`` outputs 0. Returns
    ``[B, Hq, D]`` in q's dtype.
    """
    B, Hq, D = q.shape
    sm_scale = D**-0.5 if sm_scale is None else sm_scale
    qg, kt, vt = _grouped(q[:, None], k, v)
    mask = jnp.arange(k.shape[1])[None, :] < jnp.asarray(kv_lens)[:, None]  # [B, L]
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, kt, precision=lax.Precision.HIGHEST) * sm_scale
    out = masked_softmax_matmul(s, mask[:, None, None, None], vt, _PV)
    return out.reshape(B, Hq, D).astype(q.dtype)
