"""Plain ``jax.numpy`` reference for ragged paged attention (the ground truth for the kernel).

Each query token is mapped to its sequence and absolute position, the sequence's pages are gathered
into a contiguous K/V, and a float32 softmax is taken over the positions the token may see (causal,
optionally within a sliding window). Obviously correct rather than fast: it materialises K and V per
query token, ``[num_kv_heads, num_tokens, pages_per_seq * page_size, head_dim]``, which is fine for
the small models the CPU engine runs and for tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import check_paged_shapes
from pallas_kernels.paged_attention.reference import gather_pages, masked_softmax_matmul


def token_layout(cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, num_tokens: int):
    """Where each query token sits: ``(seq, position, valid)``, each ``[num_tokens]``.

    ``seq[t]`` is the sequence whose ``[cu_q_lens[s], cu_q_lens[s+1])`` holds token ``t``,
    ``position[t] = kv_lens[s] - q_len_s + (t - cu_q_lens[s])`` its absolute position in the
    sequence, and ``valid[t]`` is False for padding tokens (``t >= cu_q_lens[num_seqs]``).
    Entries of ``cu_q_lens`` past ``num_seqs`` are ignored (treated as empty sequences).
    """
    max_num_seqs = kv_lens.shape[0]
    n = jnp.clip(num_seqs.reshape(-1)[0].astype(jnp.int32), 0, max_num_seqs)
    cu = cu_q_lens.astype(jnp.int32)[jnp.minimum(jnp.arange(max_num_seqs + 1), n)]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu[1:], t, side="right"), 0, max_num_seqs - 1).astype(jnp.int32)
    q_len = cu[seq + 1] - cu[seq]
    position = kv_lens.astype(jnp.int32)[seq] - q_len + (t - cu[seq])
    valid = t < cu[n]
    return seq, position, valid


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Attention for a ragged batch of prefill chunks and decodes over a paged KV cache.

    Args:
      q: ``[num_tokens, num_q_heads, head_dim]`` float32 or bfloat16: the new tokens of all
        sequences back to back (sequence ``s`` owns rows ``cu_q_lens[s]:cu_q_lens[s+1]``), then any
        padding rows.
      k_pages, v_pages: ``[num_kv_heads, total_num_pages, page_size, head_dim]``, q's dtype, already
        holding this step's new K/V.
      kv_lens: int32 ``[max_num_seqs]``: tokens in KV per sequence, including this step's.
      page_indices: int32 ``[max_num_seqs, pages_per_seq]``: each sequence's pages in order.
      cu_q_lens: int32 ``[max_num_seqs + 1]``: cumulative query lengths, ``cu_q_lens[0] == 0``.
      num_seqs: int32 ``[1]``: sequences in use; rows past it are padding and ignored.
      sm_scale: logit scale, default ``1 / sqrt(head_dim)``.
      sliding_window: if given, a token at position ``p`` sees only positions ``> p - sliding_window``.

    Token ``t`` of sequence ``s`` sits at position ``kv_lens[s] - q_len_s + (t - cu_q_lens[s])`` and
    attends to KV positions ``<=`` that. Returns ``[num_tokens, num_q_heads, head_dim]`` in q's
    dtype (softmax in float32); padding tokens get 0.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    check_paged_shapes(num_q_heads, head_dim, k_pages, v_pages, page_indices)
    num_kv_heads = k_pages.shape[0]
    group = num_q_heads // num_kv_heads
    if sm_scale is None:
        sm_scale = head_dim**-0.5

    seq, position, valid = token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens)
    k = gather_pages(k_pages, page_indices[seq]).astype(jnp.float32)  # [Hkv, T, L, D]
    v = gather_pages(v_pages, page_indices[seq]).astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("thgd,htld->thgl", qg, k, precision=lax.Precision.HIGHEST) * sm_scale

    kv_pos = jnp.arange(k.shape[2])[None, :]
    mask = (kv_pos <= position[:, None]) & valid[:, None]
    if sliding_window is not None:
        mask &= kv_pos > position[:, None] - sliding_window
    out = masked_softmax_matmul(scores, mask[:, None, None, :], v, "thgl,htld->thgd")
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
