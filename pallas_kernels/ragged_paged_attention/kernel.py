"""Ragged paged attention as a Pallas kernel: one call for a mixed batch of prefill chunks and decodes.

The wrapper cuts every sequence's query tokens into blocks of ``block_q`` tokens (a block never spans
two sequences) and computes, with ordinary jnp ops under jit, a small work list: for each block its
sequence, first query position, number of valid tokens and the range of KV compute blocks it needs
(causal, and the sliding window if any). The number of blocks is bounded statically by
``min(num_tokens, cdiv(num_tokens, block_q) + max_num_seqs)``; unused blocks do nothing.

One program per ``(query block, kv head)`` handles ``block_q`` tokens times all q heads of the GQA
group (``block_q * group_rows`` rows), running a flash-style online softmax over the KV pages up to
the block's last position. Queries are gathered into that block layout before the call and the
outputs gathered back to token order after it, so every program reads and writes only its own block
(no masked stores, which keeps the kernel portable). Launch variants (``loop`` for GPU, ``grid``
with scalar prefetch for TPU) are described in ``pallas_kernels/_common.py``; ``reference.py`` is
the definition this must match.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    check_paged_shapes,
    grid_page_steps,
    group_rows,
    init_state,
    normalize,
    online_softmax_step,
    pad_page_table,
    pages_per_block,
    resolve_variant,
    split_shapes,
    triton_shape_problems,
)

# Work-list columns (int32), one row per query block.
_SEQ, _POS0, _NQ, _KV_LO, _KV_HI = range(5)
_META = 8  # row width (padded to a power of two for Triton)
_STATS_LANES = 128


def default_block_q(group: int) -> int:
    """Query tokens per block: 64 rows of (token, head) per program, at least 1 token."""
    return max(1, 64 // group_rows(group))


def num_query_blocks(num_tokens: int, max_num_seqs: int, block_q: int) -> int:
    """Static upper bound on the blocks any ragged batch of this shape can need."""
    return max(1, min(num_tokens, -(-num_tokens // block_q) + max_num_seqs))


def block_metadata(
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    num_tokens: int,
    block_q: int,
    kv_block: int,
    num_kv_blocks: int,
    sliding_window: int | None,
):
    """The work list and the token -> block-row map (all jnp, traceable).

    Returns ``(meta, q_index, q_valid, out_index, out_valid)``:
      meta: int32 ``[num_blocks, 8]`` with columns seq, first query position, valid tokens, first and
        one-past-last KV compute block (``kv_block`` tokens each);
      q_index, q_valid: ``[num_blocks, block_q]`` the token each block row reads (0 when invalid);
      out_index, out_valid: ``[num_tokens]`` where each token's output lands in the flattened
        ``[num_blocks * block_q]`` block rows, and whether the token is real (not padding).
    """
    max_num_seqs = kv_lens.shape[0]
    n = jnp.clip(num_seqs.reshape(-1)[0].astype(jnp.int32), 0, max_num_seqs)
    cu = cu_q_lens.astype(jnp.int32)[jnp.minimum(jnp.arange(max_num_seqs + 1), n)]
    kv_lens = kv_lens.astype(jnp.int32)
    q_lens = jnp.maximum(cu[1:] - cu[:-1], 0)
    blocks = (q_lens + block_q - 1) // block_q
    blk_end = jnp.cumsum(blocks)
    blk_start = blk_end - blocks

    nb = num_query_blocks(num_tokens, max_num_seqs, block_q)
    b = jnp.arange(nb, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(blk_end, b, side="right"), 0, max_num_seqs - 1).astype(jnp.int32)
    q_off = (b - blk_start[seq]) * block_q
    nq = jnp.where(b < blk_end[-1], jnp.clip(q_lens[seq] - q_off, 0, block_q), 0)
    pos0 = kv_lens[seq] - q_lens[seq] + q_off
    kv_hi = jnp.clip((pos0 + nq + kv_block - 1) // kv_block, 0, num_kv_blocks)
    if sliding_window is None:
        kv_lo = jnp.zeros_like(kv_hi)
    else:
        kv_lo = jnp.maximum(pos0 - sliding_window + 1, 0) // kv_block
    kv_hi = jnp.where(nq > 0, kv_hi, 0)
    kv_lo = jnp.where(nq > 0, jnp.minimum(kv_lo, kv_hi), 0)
    zeros = jnp.zeros_like(seq)
    meta = jnp.stack([seq, pos0, nq, kv_lo, kv_hi] + [zeros] * (_META - 5), axis=1)

    rows = jnp.arange(block_q, dtype=jnp.int32)[None, :]
    q_valid = rows < nq[:, None]
    q_index = jnp.where(q_valid, cu[seq][:, None] + q_off[:, None] + rows, 0)

    t = jnp.arange(num_tokens, dtype=jnp.int32)
    tok_seq = jnp.clip(jnp.searchsorted(cu[1:], t, side="right"), 0, max_num_seqs - 1)
    local = t - cu[tok_seq]
    out_valid = t < cu[n]
    out_index = jnp.where(out_valid, (blk_start[tok_seq] + local // block_q) * block_q + local % block_q, 0)
    out_index = jnp.clip(out_index, 0, nb * block_q - 1)
    return meta, q_index, q_valid, out_index, out_valid


def _block_mask(pos0, nq, kv_start, rows: int, block_k: int, rows_per_token: int, sliding_window):
    """bool ``[rows, block_k]``: row r (token ``r // rows_per_token`` of the block; rows_per_token is a
    power of two, so a shift) may see key ``kv_start + c``."""
    shift = rows_per_token.bit_length() - 1
    token = lax.shift_right_logical(lax.broadcasted_iota(jnp.int32, (rows, block_k), 0), jnp.int32(shift))
    q_pos = pos0 + token
    kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    mask = (token < nq) & (kv_pos <= q_pos)
    if sliding_window is not None:
        mask &= kv_pos > q_pos - sliding_window
    return mask


def _ragged_loop_kernel(
    meta_ref,  # int32 [8]: this block's work-list row
    q_ref,  # [rows, head_dim]
    k_ref,  # [total_num_pages, page_size, head_dim]: this kv head's whole page array
    v_ref,  # [total_num_pages, page_size, head_dim]
    pages_ref,  # int32 [max_num_seqs, padded_pages_per_seq]
    o_ref,  # [rows, head_dim]
    *,
    sm_scale: float,
    pages_per_block: int,
    rows_per_token: int,
    sliding_window: int | None,
):
    rows, head_dim = q_ref.shape
    page_size = k_ref.shape[1]
    block_k = pages_per_block * page_size
    seq, pos0, nq = meta_ref[_SEQ], meta_ref[_POS0], meta_ref[_NQ]
    q = q_ref[...]

    def body(j, state):
        ids = pages_ref[seq, pl.ds(j * pages_per_block, pages_per_block)]
        k = k_ref[ids].reshape(block_k, head_dim)
        v = v_ref[ids].reshape(block_k, head_dim)
        mask = _block_mask(pos0, nq, j * block_k, rows, block_k, rows_per_token, sliding_window)
        return online_softmax_step(q, k, v, mask, *state, sm_scale=sm_scale)

    _, l, acc = lax.fori_loop(meta_ref[_KV_LO], meta_ref[_KV_HI], body, init_state(rows, head_dim))
    o_ref[...] = normalize(acc, l).astype(o_ref.dtype)


def _ragged_grid_kernel(
    meta_ref,  # SMEM int32 [num_blocks * 8]
    pages_ref,  # SMEM int32 [max_num_seqs * padded_pages_per_seq]
    q_ref,  # [rows, head_dim]
    *refs,  # pages_per_block k page refs [page_size, head_dim], as many v refs, o_ref, 3 scratch
    sm_scale: float,
    pages_per_block: int,
    rows_per_token: int,
    sliding_window: int | None,
):
    del pages_ref  # used by the index maps only
    k_refs = refs[:pages_per_block]
    v_refs = refs[pages_per_block : 2 * pages_per_block]
    o_ref, m_sc, l_sc, acc_sc = refs[2 * pages_per_block :]
    rows, head_dim = q_ref.shape
    page_size = k_refs[0].shape[0]
    b, j = pl.program_id(0), pl.program_id(2)
    pos0, nq = meta_ref[b * _META + _POS0], meta_ref[b * _META + _NQ]
    kv_lo, kv_hi = meta_ref[b * _META + _KV_LO], meta_ref[b * _META + _KV_HI]

    def mask_for(start):
        return _block_mask(pos0, nq, start, rows, page_size, rows_per_token, sliding_window)

    grid_page_steps(
        j, q_ref, k_refs, v_refs, o_ref, (m_sc, l_sc, acc_sc),
        active=(j >= kv_lo) & (j < kv_hi), mask_for=mask_for, sm_scale=sm_scale,
    )


def supports(
    q_shape,
    k_pages_shape,
    *,
    pages_per_seq: int | None = None,
    block_q: int | None = None,
    pages_per_compute_block: int = 8,
    variant: str | None = None,
) -> list[str]:
    """Why the compiled (non-interpret) kernel cannot take these shapes; [] when it can.

    ``pages_per_seq`` (columns of the page table) matters because it caps the pages per compute
    block; when omitted the requested ``pages_per_compute_block`` is assumed to fit.
    """
    variant = resolve_variant(variant)
    problems, num_q_heads, num_kv_heads, head_dim, page_size = split_shapes(q_shape, k_pages_shape)
    if problems or variant == "grid":
        return problems
    group = num_q_heads // num_kv_heads
    bq = block_q or default_block_q(group)
    return triton_shape_problems(
        rows=bq * group_rows(group),
        head_dim=head_dim,
        page_size=page_size,
        pages_per_block=pages_per_block(pages_per_compute_block, pages_per_seq or pages_per_compute_block, variant),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "block_q",
        "pages_per_compute_block",
        "variant",
        "interpret",
        "num_warps",
        "num_stages",
    ),
)
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
    block_q: int | None = None,
    pages_per_compute_block: int = 8,
    variant: str | None = None,
    interpret: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Ragged paged attention (Pallas). Same contract as ``reference.ragged_paged_attention``.

    Args:
      q: ``[num_tokens, num_q_heads, head_dim]`` float32 or bfloat16 (padding rows allowed at the end).
      k_pages, v_pages: ``[num_kv_heads, total_num_pages, page_size, head_dim]``, normally q's
        dtype (q is cast to theirs for the matmuls).
      kv_lens: int32 ``[max_num_seqs]``, tokens in KV per sequence including this step's.
      page_indices: int32 ``[max_num_seqs, pages_per_seq]``.
      cu_q_lens: int32 ``[max_num_seqs + 1]``.
      num_seqs: int32 ``[1]``.
      sm_scale: logit scale, default ``1 / sqrt(head_dim)``.
      sliding_window: optional window (positions ``> p - sliding_window`` are visible from ``p``).
      block_q: query tokens per program (default: 64 rows of (token, q head) per program). A
        decode uses one token of its block; a long prefill chunk spreads over many blocks.
      pages_per_compute_block: KV pages folded into the online softmax per step (clamped to
        ``pages_per_seq``; rounded down to a power of two on ``loop``).
      variant: ``"loop"`` or ``"grid"``; default ``"grid"`` on TPU, ``"loop"`` elsewhere.
      interpret: run the Pallas interpreter (any backend, e.g. CPU tests).
      num_warps, num_stages: Triton launch parameters (``loop`` on GPU).

    Returns ``[num_tokens, num_q_heads, head_dim]`` in q's dtype; padding tokens get 0.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    check_paged_shapes(num_q_heads, head_dim, k_pages, v_pages, page_indices)
    max_num_seqs, pages_per_seq = page_indices.shape
    if kv_lens.shape != (max_num_seqs,) or cu_q_lens.shape != (max_num_seqs + 1,):
        raise ValueError(
            f"kv_lens {kv_lens.shape} and cu_q_lens {cu_q_lens.shape} must be [max_num_seqs] and "
            f"[max_num_seqs + 1] with max_num_seqs={max_num_seqs} (page_indices rows)"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    num_kv_heads, total_num_pages, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    gp = group_rows(group)
    variant = resolve_variant(variant)
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    bq = block_q or default_block_q(group)
    rows = bq * gp
    ppb = pages_per_block(pages_per_compute_block, pages_per_seq, variant)
    num_kv_blocks = -(-pages_per_seq // ppb)
    padded_pages = num_kv_blocks * ppb
    kv_block = ppb * page_size

    meta, q_index, q_valid, out_index, out_valid = block_metadata(
        cu_q_lens,
        kv_lens,
        num_seqs,
        num_tokens=num_tokens,
        block_q=bq,
        kv_block=kv_block,
        num_kv_blocks=num_kv_blocks,
        sliding_window=sliding_window,
    )
    nb = meta.shape[0]
    pages = pad_page_table(page_indices, padded_pages, total_num_pages)

    # [num_blocks, block_q, Hq, D] -> [num_blocks, Hkv, block_q * gp, D], row = token * gp + head.
    qb = jnp.where(q_valid[..., None, None], q.astype(k_pages.dtype)[q_index], 0)
    qb = qb.reshape(nb, bq, num_kv_heads, group, head_dim)
    if gp > group:
        qb = jnp.pad(qb, ((0, 0), (0, 0), (0, 0), (0, gp - group), (0, 0)))
    qb = qb.transpose(0, 2, 1, 3, 4).reshape(nb, num_kv_heads, rows, head_dim)

    common = dict(sm_scale=sm_scale, pages_per_block=ppb, rows_per_token=gp, sliding_window=sliding_window)
    out_shape = jax.ShapeDtypeStruct((nb, num_kv_heads, rows, head_dim), q.dtype)
    if variant == "loop":
        ob = pl.pallas_call(
            functools.partial(_ragged_loop_kernel, **common),
            grid=(nb, num_kv_heads),
            in_specs=[
                pl.BlockSpec((None, _META), lambda b, h: (b, 0)),
                pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (b, h, 0, 0)),
                pl.BlockSpec((None, total_num_pages, page_size, head_dim), lambda b, h: (h, 0, 0, 0)),
                pl.BlockSpec((None, total_num_pages, page_size, head_dim), lambda b, h: (h, 0, 0, 0)),
                pl.BlockSpec((max_num_seqs, padded_pages), lambda b, h: (0, 0)),
            ],
            out_specs=pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (b, h, 0, 0)),
            out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
            name="ragged_paged_attention_loop",
        )(meta, qb, k_pages, v_pages, pages)
    else:

        def page_map(p):
            def index_map(b, h, j, meta_ref, pages_ref):
                # Outside [kv_lo, kv_hi) stay on the nearest needed block: no new DMA, no compute.
                lo = meta_ref[b * _META + _KV_LO]
                hi = meta_ref[b * _META + _KV_HI]
                jc = jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, lo))
                seq = meta_ref[b * _META + _SEQ]
                return (h, pages_ref[seq * padded_pages + jc * ppb + p], 0, 0)

            return pl.BlockSpec((None, None, page_size, head_dim), index_map)

        kv_specs = [page_map(p) for p in range(ppb)]
        ob = pl.pallas_call(
            functools.partial(_ragged_grid_kernel, **common),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(nb, num_kv_heads, num_kv_blocks),
                in_specs=[
                    pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j, *_: (b, h, 0, 0)),
                    *kv_specs,
                    *kv_specs,
                ],
                out_specs=pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j, *_: (b, h, 0, 0)),
                scratch_shapes=[
                    pltpu.VMEM((rows, _STATS_LANES), jnp.float32),
                    pltpu.VMEM((rows, _STATS_LANES), jnp.float32),
                    pltpu.VMEM((rows, head_dim), jnp.float32),
                ],
            ),
            out_shape=out_shape,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret,
            name="ragged_paged_attention_grid",
        )(meta.reshape(-1), pages.reshape(-1), qb, *([k_pages] * ppb), *([v_pages] * ppb))

    # Back to token order: [num_blocks * block_q, Hq, D], then pick each token's row.
    ob = ob.reshape(nb, num_kv_heads, bq, gp, head_dim)[:, :, :, :group]
    ob = ob.transpose(0, 2, 1, 3, 4).reshape(nb * bq, num_q_heads, head_dim)
    return jnp.where(out_valid[:, None, None], ob[out_index], 0).astype(q.dtype)
