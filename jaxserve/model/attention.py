"""Paged attention for the engine: KV writes into the paged cache and two ways to attend.

Row layout of a step (built by ``jaxserve.engine.packing``; all sizes static per compiled bucket):

* rows ``[0, num_decode_rows)``: one row per decoding sequence (padding rows after the real ones);
* then ``num_blocks`` blocks of ``block_rows`` rows: prefill chunks, each padded to whole blocks, so
  every block belongs to exactly one sequence (trailing blocks are padding).

``attend_grouped`` (the CPU path) attends decode rows as ``[G, 1]`` groups and prefill blocks as
``[G, block_rows]`` groups, looping over the context in chunks of pages with an online softmax, so
memory stays O(chunk) and work O(actual context). Decode rows loop over smaller chunks than
prefill blocks (``DECODE_CHUNK_PAGES``): each chunk's pages are gathered into a fresh array and
then read by two batched GEMVs, and a chunk small enough to stay in cache between the gather and
the reads made 64 decode rows at context 300 attend ~1.5x faster. ``attend_ragged`` hands the same rows to the
ragged paged attention dispatcher (Pallas kernel on GPU/TPU): each prefill sequence's padded rows
count as its query rows, which is harmless because causal masking keeps real rows from seeing the
padded positions after them.

The cache of one layer is ``(k_pages, v_pages)``, each ``[num_kv_heads, num_pages, page_size,
head_dim]``; page ``num_pages`` does not exist and is where padding rows "write" (dropped).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import attention as pallas_attention

NEG_INF = -1e30  # finite, so fully masked rows (padding) stay NaN-free
# Pages per online-softmax chunk for decode rows on the CPU path (prefill blocks use the runner's
# chunk_pages, 8). Measured on the benchmark model (4 KV heads of 64 dims, 16-token float32 pages;
# one layer's decode attention at context 300, CPU time, alternating rounds), ms at 1 / 2 / 4 / 8
# pages: 64 rows 14 / 11.3 / 11-14 / 16.7; 32 rows 8-10 / 5.5-6.2 / 5.3-6.6 / 7.7-9.5;
# 8 rows 1.2 / 1.5-1.6 / 1.3-1.7 / 2.0. Two pages is near the best at every batch.
DECODE_CHUNK_PAGES = 2


class AttentionBatch(NamedTuple):
    """Per-step attention metadata (int32 device arrays); see the module docstring for the layout."""

    slot_page: (
        jax.Array
    )  # [T] page each row's K/V is written to (num_pages for padding rows)
    slot_offset: jax.Array  # [T] offset within that page
    positions: jax.Array  # [T] absolute position of each row (0 for padding)
    decode_kv_lens: (
        jax.Array
    )  # [D] tokens in KV incl. this step, per decode row (0 = padding)
    decode_pages: jax.Array  # [D, P] page table per decode row
    block_kv_lens: (
        jax.Array
    )  # [NB] KV length of each prefill block's sequence after this step
    block_pages: jax.Array  # [NB, P] page table of each prefill block's sequence
    # The same step in the ragged layout of ``pallas_kernels.ragged_paged_attention``:
    kv_lens: jax.Array  # [S]
    page_indices: jax.Array  # [S, P]
    cu_q_lens: jax.Array  # [S + 1]
    num_seqs: jax.Array  # [1]

    @property
    def num_decode_rows(self) -> int:
        return self.decode_kv_lens.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.block_kv_lens.shape[0]


def write_kv(
    cache: tuple[jax.Array, jax.Array],
    k: jax.Array,
    v: jax.Array,
    batch: AttentionBatch,
):
    """Scatters this step's ``k, v [T, num_kv_heads, head_dim]`` into the layer's pages."""
    return write_rows(cache, k, v, batch.slot_page, batch.slot_offset)


def write_rows(cache: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, page: jax.Array, offset: jax.Array):
    """Row ``t`` of ``k, v [T, Hkv, D]`` to slot ``offset[t]`` of page ``page[t]`` of
    ``cache = (k_pages, v_pages)`` (``[Hkv, num_pages, page_size, D]``); out-of-range pages drop."""
    k_pages, v_pages = cache
    k_pages = k_pages.at[:, page, offset].set(
        jnp.swapaxes(k, 0, 1).astype(k_pages.dtype), mode="drop"
    )
    v_pages = v_pages.at[:, page, offset].set(
        jnp.swapaxes(v, 0, 1).astype(v_pages.dtype), mode="drop"
    )
    return k_pages, v_pages


def _grouped(
    q, q_pos, kv_lens, pages, k_pages, v_pages, *, sm_scale, sliding_window, chunk_pages
):
    """Attention of ``q [G, R, Hq, D]`` (rows at positions ``q_pos [G, R]``) over each group's
    pages ``pages [G, P]`` up to ``kv_lens [G]``, causal (and windowed); float32 online softmax over
    chunks of ``chunk_pages`` pages. Returns ``[G, R, Hq, D]`` in q's dtype."""
    G, R, Hq, D = q.shape
    Hkv, _, page_size, _ = k_pages.shape
    group = Hq // Hkv
    chunk = chunk_pages * page_size
    # [G, Hkv, group * R, D]: each KV head's query heads and rows side by side.
    qg = (
        q.astype(jnp.float32)
        .reshape(G, R, Hkv, group, D)
        .transpose(0, 2, 3, 1, 4)
        .reshape(G, Hkv, group * R, D)
    )
    qg = qg * sm_scale
    row_pos = jnp.tile(q_pos, (1, group))[:, None, :, None]  # [G, 1, group * R, 1]
    num_chunks = (jnp.max(kv_lens) + chunk - 1) // chunk

    def body(i, carry):
        m, l, acc = carry
        ids = lax.dynamic_slice_in_dim(
            pages, i * chunk_pages, chunk_pages, axis=1
        )  # [G, C]
        k = k_pages[:, ids].reshape(Hkv, G, chunk, D).astype(jnp.float32)
        v = v_pages[:, ids].reshape(Hkv, G, chunk, D).astype(jnp.float32)
        s = jnp.einsum("ghqd,hgkd->ghqk", qg, k)
        k_pos = i * chunk + jnp.arange(chunk)[None, None, None, :]
        mask = (k_pos <= row_pos) & (k_pos < kv_lens[:, None, None, None])
        if sliding_window is not None:
            mask &= k_pos > row_pos - sliding_window
        s = jnp.where(mask, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        scale = jnp.exp(m - m_new)
        l = l * scale + p.sum(-1)
        acc = acc * scale[..., None] + jnp.einsum("ghqk,hgkd->ghqd", p, v)
        return m_new, l, acc

    init = (
        jnp.full((G, Hkv, group * R), NEG_INF, jnp.float32),
        jnp.zeros((G, Hkv, group * R), jnp.float32),
        jnp.zeros((G, Hkv, group * R, D), jnp.float32),
    )
    _, l, acc = lax.fori_loop(0, num_chunks, body, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    return (
        out.reshape(G, Hkv, group, R, D)
        .transpose(0, 3, 1, 2, 4)
        .reshape(G, R, Hq, D)
        .astype(q.dtype)
    )


def attend_grouped(
    q,
    cache,
    batch: AttentionBatch,
    *,
    sm_scale,
    sliding_window=None,
    chunk_pages=8,
    decode_chunk_pages=None,
):
    """The CPU path: ``q [T, Hq, D]`` -> ``[T, Hq, D]`` (see the module docstring). Prefill blocks
    loop over ``chunk_pages`` pages at a time, decode rows over ``gcd(chunk_pages,
    decode_chunk_pages)`` (a divisor of the page-table width, which is a multiple of
    ``chunk_pages``); ``None`` means ``DECODE_CHUNK_PAGES``."""
    k_pages, v_pages = cache
    T, Hq, D = q.shape
    n_dec, n_blk = batch.num_decode_rows, batch.num_blocks
    block_rows = (T - n_dec) // n_blk if n_blk else 0
    kw = {
        "sm_scale": sm_scale,
        "sliding_window": sliding_window,
        "chunk_pages": chunk_pages,
    }
    parts = []
    if n_dec:
        dec = _grouped(
            q[:n_dec, None],
            batch.positions[:n_dec, None],
            batch.decode_kv_lens,
            batch.decode_pages,
            k_pages,
            v_pages,
            **{
                **kw,
                "chunk_pages": math.gcd(
                    chunk_pages,
                    decode_chunk_pages or DECODE_CHUNK_PAGES,
                ),
            },
        )
        parts.append(dec[:, 0])
    if n_blk:
        qb = q[n_dec:].reshape(n_blk, block_rows, Hq, D)
        pos = batch.positions[n_dec:].reshape(n_blk, block_rows)
        pre = _grouped(
            qb, pos, batch.block_kv_lens, batch.block_pages, k_pages, v_pages, **kw
        )
        parts.append(pre.reshape(n_blk * block_rows, Hq, D))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def attend_ragged(
    q, cache, batch: AttentionBatch, *, sm_scale, sliding_window=None, chunk_pages=None
):
    """The kernel path: one ragged paged attention call (Pallas on GPU/TPU, per the dispatcher)."""
    del chunk_pages
    k_pages, v_pages = cache
    return pallas_attention.ragged_paged_attention(
        q,
        k_pages,
        v_pages,
        batch.kv_lens,
        batch.page_indices,
        batch.cu_q_lens,
        batch.num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
    )


ATTENTION_IMPLS = {"grouped": attend_grouped, "ragged": attend_ragged}


def paged_attention(q, k, v, cache, batch: AttentionBatch, *, impl: str, **options):
    """One layer's attention step (the model's ``AttendFn``): writes this step's ``k, v [T, Hkv,
    D]`` into ``cache``, then attends ``q [T, Hq, D]`` over it with ``ATTENTION_IMPLS[impl]``
    (``options``: its keyword arguments). Returns ``(out [T, Hq, D], cache)``; every head is
    independent, which is what lets tensor parallelism run it per device on its own heads."""
    cache = write_kv(cache, k, v, batch)
    return ATTENTION_IMPLS[impl](q, cache, batch, **options), cache


def default_attention_impl() -> str:
    """``ragged`` (Pallas kernels) on GPU/TPU, ``grouped`` (chunked jnp) on CPU."""
    return (
        "ragged"
        if jax.default_backend() in pallas_attention.KERNEL_BACKENDS
        else "grouped"
    )
