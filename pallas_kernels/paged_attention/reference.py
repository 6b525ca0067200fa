"""Plain ``jax.numpy`` reference for paged decode attention (the ground truth for the kernel).

Gathers every sequence's pages into contiguous K/V, masks positions ``>= kv_len``, and takes a
float32 softmax. Obviously correct rather than fast: it materialises ``[num_kv_heads, num_seqs,
pages_per_seq * page_size, head_dim]`` K and V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import check_paged_shapes


def gather_pages(pages: jax.Array, page_indices: jax.Array) -> jax.Array:
    """``[num_kv_heads, total_num_pages, page_size, head_dim]`` pages -> contiguous
    ``[num_kv_heads, num_rows, pages_per_seq * page_size, head_dim]`` for each row of the page table
    (page indices clamped into range; what a padded entry points at is masked by the caller)."""
    num_kv_heads, total_num_pages, page_size, head_dim = pages.shape
    rows, pages_per_seq = page_indices.shape
    idx = jnp.clip(page_indices.astype(jnp.int32), 0, total_num_pages - 1)
    return pages[:, idx].reshape(num_kv_heads, rows, pages_per_seq * page_size, head_dim)


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    *,
    sm_scale: float | None = None,
) -> jax.Array:
    """Decode attention: one query token per sequence over its paged KV cache.

    Args:
      q: ``[num_seqs, num_q_heads, head_dim]``, float32 or bfloat16; the query of each sequence's
        newest token.
      k_pages, v_pages: ``[num_kv_heads, total_num_pages, page_size, head_dim]``, q's dtype.
      kv_lens: int32 ``[>= num_seqs]``: tokens in KV for each sequence, including this step's token
        (whose K/V are already written). Sequence ``s`` attends to positions ``0 .. kv_lens[s]-1``;
        a sequence with ``kv_lens[s] == 0`` (padding) gets a zero output.
      page_indices: int32 ``[>= num_seqs, pages_per_seq]``: row ``s`` lists sequence ``s``'s pages in
        order; entries past its length are ignored.
      sm_scale: logit scale, default ``1 / sqrt(head_dim)``.

    Returns ``[num_seqs, num_q_heads, head_dim]`` in q's dtype (softmax computed in float32).
    Rows of ``kv_lens`` / ``page_indices`` past ``num_seqs`` are ignored.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    check_paged_shapes(num_q_heads, head_dim, k_pages, v_pages, page_indices)
    num_kv_heads = k_pages.shape[0]
    group = num_q_heads // num_kv_heads
    if sm_scale is None:
        sm_scale = head_dim**-0.5

    k = gather_pages(k_pages, page_indices[:num_seqs]).astype(jnp.float32)  # [Hkv, S, L, D]
    v = gather_pages(v_pages, page_indices[:num_seqs]).astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(num_seqs, num_kv_heads, group, head_dim)
    scores = jnp.einsum("shgd,hsld->shgl", qg, k, precision=lax.Precision.HIGHEST) * sm_scale
    positions = jnp.arange(k.shape[2])
    mask = (positions[None, :] < kv_lens[:num_seqs, None])[:, None, None, :]  # [S, 1, 1, L]
    out = masked_softmax_matmul(scores, mask, v, "shgl,hsld->shgd")
    return out.reshape(num_seqs, num_q_heads, head_dim).astype(q.dtype)


def masked_softmax_matmul(scores, mask, v, spec):
    """softmax(scores) over the last axis restricted to ``mask``, times v; all-masked rows -> 0."""
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    return jnp.einsum(spec, p, v, precision=lax.Precision.HIGHEST)
