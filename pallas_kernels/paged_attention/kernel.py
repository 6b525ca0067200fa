"""Paged decode attention as a Pallas kernel: one query token per sequence, flash-style online softmax
over the sequence's KV pages.

One program per ``(sequence, kv head)`` (times ``num_kv_splits`` on the ``loop`` variant) computes
all q heads of that KV head's GQA group at once, so every KV page is read once per KV head. See
``pallas_kernels/_common.py`` for the two launch variants (``loop``: in-kernel page loop, for GPU;
``grid``: scalar-prefetched page table driving the BlockSpecs, for TPU). ``reference.py`` holds the
plain-jnp definition this must match.
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
    merge_splits,
    normalize,
    online_softmax_step,
    pad_page_table,
    pages_per_block,
    resolve_variant,
    split_shapes,
    triton_shape_problems,
)

# Lanes of the TPU scratch holding m and l (lane-dense rows, as Mosaic prefers).
_STATS_LANES = 128


def _loop_rows(group: int) -> int:
    return max(group_rows(group), 16)


def _decode_loop_kernel(
    q_ref,  # [rows, head_dim]
    k_ref,  # [total_num_pages, page_size, head_dim]: this kv head's whole page array
    v_ref,  # [total_num_pages, page_size, head_dim]
    pages_ref,  # int32 [pages_per_seq]: this sequence's page table row (padded)
    len_ref,  # int32 [1]: this sequence's kv_len
    o_ref,  # [rows, head_dim]
    m_ref,  # float32 [rows]
    l_ref,  # float32 [rows]
    *,
    sm_scale: float,
    pages_per_block: int,
    blocks_per_split: int,
):
    rows, head_dim = q_ref.shape
    page_size = k_ref.shape[1]
    block_k = pages_per_block * page_size
    kv_len = len_ref[0]
    first = pl.program_id(2) * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, lax.div(kv_len + block_k - 1, block_k))
    q = q_ref[...]

    def body(j, state):
        ids = pages_ref[pl.ds(j * pages_per_block, pages_per_block)]
        k = k_ref[ids].reshape(block_k, head_dim)
        v = v_ref[ids].reshape(block_k, head_dim)
        kv_pos = j * block_k + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        return online_softmax_step(q, k, v, kv_pos < kv_len, *state, sm_scale=sm_scale)

    m, l, acc = lax.fori_loop(first, last, body, init_state(rows, head_dim))
    o_ref[...] = normalize(acc, l).astype(o_ref.dtype)
    m_ref[...] = m.reshape(rows)
    l_ref[...] = l.reshape(rows)


def _decode_grid_kernel(
    lens_ref,  # SMEM int32 [num_seqs]
    pages_ref,  # SMEM int32 [num_seqs * pages_per_seq] (flattened, padded page table)
    q_ref,  # [rows, head_dim]
    *refs,  # pages_per_block k page refs [page_size, head_dim], as many v refs, o_ref, 3 scratch
    sm_scale: float,
    pages_per_block: int,
):
    del pages_ref  # used by the index maps only
    k_refs = refs[:pages_per_block]
    v_refs = refs[pages_per_block : 2 * pages_per_block]
    o_ref, m_sc, l_sc, acc_sc = refs[2 * pages_per_block :]
    rows, head_dim = q_ref.shape
    page_size = k_refs[0].shape[0]
    s, j = pl.program_id(0), pl.program_id(2)
    kv_len = lens_ref[s]

    def mask_for(start):
        return start + lax.broadcasted_iota(jnp.int32, (rows, page_size), 1) < kv_len

    grid_page_steps(
        j, q_ref, k_refs, v_refs, o_ref, (m_sc, l_sc, acc_sc),
        active=j * pages_per_block * page_size < kv_len, mask_for=mask_for, sm_scale=sm_scale,
    )


def supports(
    q_shape,
    k_pages_shape,
    *,
    pages_per_seq: int | None = None,
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
    ppb = pages_per_block(pages_per_compute_block, pages_per_seq or pages_per_compute_block, variant)
    rows = _loop_rows(num_q_heads // num_kv_heads)
    return triton_shape_problems(rows=rows, head_dim=head_dim, page_size=page_size, pages_per_block=ppb)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "pages_per_compute_block",
        "num_kv_splits",
        "variant",
        "interpret",
        "num_warps",
        "num_stages",
    ),
)
def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    *,
    sm_scale: float | None = None,
    pages_per_compute_block: int = 8,
    num_kv_splits: int = 1,
    variant: str | None = None,
    interpret: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Paged decode attention (Pallas). Same contract as ``reference.paged_attention``.

    Args:
      q: ``[num_seqs, num_q_heads, head_dim]`` float32 or bfloat16.
      k_pages, v_pages: ``[num_kv_heads, total_num_pages, page_size, head_dim]``, normally q's
        dtype (q is cast to theirs for the matmuls).
      kv_lens: int32 ``[>= num_seqs]``, tokens in KV per sequence (including this step's token).
      page_indices: int32 ``[>= num_seqs, pages_per_seq]``.
      sm_scale: logit scale, default ``1 / sqrt(head_dim)``.
      pages_per_compute_block: pages folded into the online softmax per step (clamped to
        ``pages_per_seq``). ``loop``: one gather of this many pages per loop iteration (a power of two
        for Triton); ``grid``: this many page operands per grid step.
      num_kv_splits: ``loop`` only: split each sequence's pages over this many programs
        (flash-decoding) and merge the partial softmaxes afterwards; raises parallelism when
        ``num_seqs * num_kv_heads`` is small and contexts are long.
      variant: ``"loop"`` or ``"grid"``; default ``"grid"`` on TPU, ``"loop"`` elsewhere.
      interpret: run the Pallas interpreter (any backend, e.g. CPU tests).
      num_warps, num_stages: Triton launch parameters (``loop`` on GPU).

    Returns ``[num_seqs, num_q_heads, head_dim]`` in q's dtype.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    check_paged_shapes(num_q_heads, head_dim, k_pages, v_pages, page_indices)
    if kv_lens.shape[0] < num_seqs or page_indices.shape[0] < num_seqs:
        raise ValueError("kv_lens and page_indices need a row for every sequence of q")
    num_kv_heads, total_num_pages, page_size, _ = k_pages.shape
    pages_per_seq = page_indices.shape[1]
    group = num_q_heads // num_kv_heads
    variant = resolve_variant(variant)
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    ppb = pages_per_block(pages_per_compute_block, pages_per_seq, variant)
    splits = num_kv_splits if variant == "loop" else 1
    if splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    num_blocks = -(-pages_per_seq // ppb)
    blocks_per_split = -(-num_blocks // splits)
    padded_pages = blocks_per_split * splits * ppb

    pages = pad_page_table(page_indices[:num_seqs], padded_pages, total_num_pages)
    lens = jnp.clip(kv_lens[:num_seqs].astype(jnp.int32), 0, pages_per_seq * page_size)

    rows = _loop_rows(group) if variant == "loop" else group_rows(group)
    qg = q.astype(k_pages.dtype).reshape(num_seqs, num_kv_heads, group, head_dim)
    if rows > group:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))

    if variant == "loop":
        out_dtype = q.dtype if splits == 1 else jnp.float32
        kernel = functools.partial(
            _decode_loop_kernel, sm_scale=sm_scale, pages_per_block=ppb, blocks_per_split=blocks_per_split
        )
        o, m, l = pl.pallas_call(
            kernel,
            grid=(num_seqs, num_kv_heads, splits),
            in_specs=[
                pl.BlockSpec((None, None, rows, head_dim), lambda s, h, c: (s, h, 0, 0)),
                pl.BlockSpec((None, total_num_pages, page_size, head_dim), lambda s, h, c: (h, 0, 0, 0)),
                pl.BlockSpec((None, total_num_pages, page_size, head_dim), lambda s, h, c: (h, 0, 0, 0)),
                pl.BlockSpec((None, padded_pages), lambda s, h, c: (s, 0)),
                pl.BlockSpec((None, 1), lambda s, h, c: (s, 0)),
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, rows, head_dim), lambda s, h, c: (c, s, h, 0, 0)),
                pl.BlockSpec((None, None, None, rows), lambda s, h, c: (c, s, h, 0)),
                pl.BlockSpec((None, None, None, rows), lambda s, h, c: (c, s, h, 0)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((splits, num_seqs, num_kv_heads, rows, head_dim), out_dtype),
                jax.ShapeDtypeStruct((splits, num_seqs, num_kv_heads, rows), jnp.float32),
                jax.ShapeDtypeStruct((splits, num_seqs, num_kv_heads, rows), jnp.float32),
            ],
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
            name="paged_attention_loop",
        )(qg, k_pages, v_pages, pages, lens[:, None])
        o = o[0] if splits == 1 else merge_splits(o, m, l)
    else:
        flat_pages = pages.reshape(-1)

        def page_map(p):
            def index_map(s, h, j, lens_ref, pages_ref):
                # Past the sequence's last block, keep pointing at that block: the pipeline then
                # skips the copy, and the kernel skips the compute.
                # lax.div, not //: lengths are >= 0 and floor division lowers through sign().
                last = jnp.maximum(lax.div(lens_ref[s] + ppb * page_size - 1, ppb * page_size) - 1, 0)
                return (h, pages_ref[s * padded_pages + jnp.minimum(j, last) * ppb + p], 0, 0)

            return pl.BlockSpec((None, None, page_size, head_dim), index_map)

        kv_specs = [page_map(p) for p in range(ppb)]
        kernel = functools.partial(_decode_grid_kernel, sm_scale=sm_scale, pages_per_block=ppb)
        o = pl.pallas_call(
            kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(num_seqs, num_kv_heads, num_blocks),
                in_specs=[
                    pl.BlockSpec((None, None, rows, head_dim), lambda s, h, j, *_: (s, h, 0, 0)),
                    *kv_specs,
                    *kv_specs,
                ],
                out_specs=pl.BlockSpec((None, None, rows, head_dim), lambda s, h, j, *_: (s, h, 0, 0)),
                scratch_shapes=[
                    pltpu.VMEM((rows, _STATS_LANES), jnp.float32),
                    pltpu.VMEM((rows, _STATS_LANES), jnp.float32),
                    pltpu.VMEM((rows, head_dim), jnp.float32),
                ],
            ),
            out_shape=jax.ShapeDtypeStruct((num_seqs, num_kv_heads, rows, head_dim), q.dtype),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret,
            name="paged_attention_grid",
        )(lens, flat_pages, qg, *([k_pages] * ppb), *([v_pages] * ppb))

    return o[:, :, :group].reshape(num_seqs, num_q_heads, head_dim).astype(q.dtype)
