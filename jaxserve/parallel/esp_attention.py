"""Paged attention over KV pages spread across the devices of the ``"sp"`` axis (LoongServe's
elastic sequence parallelism in the engine's step; ``jaxserve.engine.esp_runner`` builds the batch).

Each device holds its own page pool ``[Hkv, pages, page_size, D]`` (the global cache is
``[n, Hkv, pages, page_size, D]`` split over ``"sp"``). For a step, inside one ``jax.shard_map``:

1. **KV write**: every device scatters the rows whose destination page is in its own pool
   (``write_page[d, t]``; other rows go to the drop page), so a prefill writes its KV straight into
   the pages of the devices that will decode it. A row may also be written to a *staging* page of
   the device that prefills it (see ``engine/esp_pages.py``).
2. **Partials**: every device folds, for every query row, the keys of the entries it holds into a
   float32 online-softmax state (``online_softmax``). An entry is ``(page, block, lo, hi)``: the
   page holds the sequence's positions ``block * page_size + [0, page_size)``, of which those in
   ``[lo, hi)`` and causally visible count. A device holding none of a row's keys contributes
   ``(MASK_VALUE, 0, 0)``.
3. **Combine**: a ``pmax`` of the maxima and one ``psum`` of the rescaled denominators and
   accumulators (log-sum-exp, as ``decode_attention``): a decode row whose KV spans several devices
   is decoded by all of them (multi-master), and a prefill's attention is split over the devices
   holding (or staging) its keys.

Rows are laid out as ``model.attention``'s: decode rows as groups of one row, then prefill blocks
of ``block_rows`` rows, each group with its own entries ``[n, groups, E, 4]`` and counts ``[n, groups]``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.model.attention import write_rows
from jaxserve.parallel.mesh import SP_AXIS
from jaxserve.parallel.online_softmax import (
    SoftmaxState,
    fold,
    group_queries,
    init_state,
    normalize,
    rescaled,
    ungroup_queries,
)

PAGE, BLOCK, LO, HI = range(4)  # the fields of an entry


class EspBatch(NamedTuple):
    """A step's metadata for ``esp_attention`` (int32; ``n`` devices, ``T`` rows, ``D`` decode rows,
    ``NB`` prefill blocks, ``E`` entries per group and device)."""

    positions: jax.Array  # [T] absolute position of each row (0 for padding)
    write_page: jax.Array  # [n, T] page in device d's pool that row t is written to (pool size: dropped)
    write_offset: jax.Array  # [T] slot within the page
    dec_entries: jax.Array  # [n, D, E, 4] each decode row's entries on each device
    dec_count: jax.Array  # [n, D] entries in use
    blk_entries: jax.Array  # [n, NB, E, 4] each prefill block's sequence's entries on each device
    blk_count: jax.Array  # [n, NB]

    @property
    def num_decode_rows(self) -> int:
        return self.dec_count.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.blk_count.shape[1]


def entries_partial(q, q_pos, entries, count, k_pages, v_pages, *, sm_scale, sliding_window=None, chunk=8) -> SoftmaxState:
    """The softmax state of query groups ``q [G, R, Hq, D]`` (positions ``q_pos [G, R]``) over the
    keys of their ``entries [G, E, 4]`` (the first ``count[G]`` valid; ``E`` a multiple of
    ``chunk``) in one device's pages ``k_pages, v_pages [Hkv, pages, page_size, D]``, folded
    ``chunk`` entries at a time: rows ``[G, Hkv, Hq // Hkv, R]``."""
    G, R, Hq, D = q.shape
    Hkv, _, ps, _ = k_pages.shape
    qg = group_queries(q.astype(jnp.float32), Hkv)  # [G, Hkv, group, R, D]
    offsets = jnp.arange(ps, dtype=jnp.int32)

    def body(i, state):
        e = lax.dynamic_slice_in_dim(entries, i * chunk, chunk, axis=1)  # [G, C, 4]
        live = (i * chunk + jnp.arange(chunk))[None, :] < count[:, None]  # [G, C]
        k_pos = (e[..., BLOCK, None] * ps + offsets).reshape(G, chunk * ps)
        ok = (live[..., None] & (e[..., LO, None] <= k_pos.reshape(G, chunk, ps))) & (
            k_pos.reshape(G, chunk, ps) < e[..., HI, None]
        )
        mask = ok.reshape(G, 1, 1, 1, chunk * ps) & (k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None])
        if sliding_window is not None:
            mask &= k_pos[:, None, None, None, :] > q_pos[:, None, None, :, None] - sliding_window

        def keys(pages):  # [Hkv, G, C, ps, D] -> [G, Hkv, C * ps, D]
            return pages[:, e[..., PAGE]].transpose(1, 0, 2, 3, 4).reshape(G, Hkv, chunk * ps, D).astype(jnp.float32)

        return fold(state, qg, keys(k_pages), keys(v_pages), mask, sm_scale=sm_scale)

    num_chunks = (jnp.max(count, initial=0) + chunk - 1) // chunk
    return lax.fori_loop(0, num_chunks, body, init_state((G, Hkv, Hq // Hkv, R), D))


def combine(state: SoftmaxState, axis_name=SP_AXIS) -> jax.Array:
    """Inside ``shard_map``: the attention over every device's keys, float32 ``[G, R, Hq, D]``."""
    m_all = lax.pmax(state.m, axis_name)
    l, acc = lax.psum(rescaled(state, m_all), axis_name)
    return ungroup_queries(normalize(l, acc))


def esp_attention_shard(q, k, v, cache, batch: EspBatch, *, sm_scale, sliding_window=None, chunk_pages=8, axis_name=SP_AXIS):
    """One device's part (see the module docstring): ``q [T, Hq, D]``, ``k, v [T, Hkv, D]``
    replicated; ``cache`` this device's ``[1, Hkv, pages, page_size, D]`` pair; ``batch`` with its
    per-device fields sliced to ``[1, ...]``. Returns ``(out [T, Hq, D], cache)``."""
    k_pages, v_pages = write_rows((cache[0][0], cache[1][0]), k, v, batch.write_page[0], batch.write_offset)
    T, Hq, D = q.shape
    n_dec, n_blk = batch.num_decode_rows, batch.num_blocks
    kw = {"sm_scale": sm_scale, "sliding_window": sliding_window, "chunk": chunk_pages}
    parts = []
    if n_dec:
        state = entries_partial(
            q[:n_dec, None], batch.positions[:n_dec, None], batch.dec_entries[0], batch.dec_count[0], k_pages, v_pages, **kw
        )
        parts.append(combine(state, axis_name)[:, 0])
    if n_blk:
        rows = (T - n_dec) // n_blk
        qb = q[n_dec:].reshape(n_blk, rows, Hq, D)
        pos = batch.positions[n_dec:].reshape(n_blk, rows)
        state = entries_partial(qb, pos, batch.blk_entries[0], batch.blk_count[0], k_pages, v_pages, **kw)
        parts.append(combine(state, axis_name).reshape(n_blk * rows, Hq, D))
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return out.astype(q.dtype), (k_pages[None], v_pages[None])


def batch_specs() -> EspBatch:
    """The ``PartitionSpec`` of each ``EspBatch`` field: per-device fields split over ``"sp"``."""
    dev = P(SP_AXIS)
    return EspBatch(P(), dev, P(), dev, dev, dev, dev)


def esp_attention(mesh: Mesh, *, sm_scale, sliding_window=None, chunk_pages=8):
    """The model's ``AttendFn`` under ESP: ``(q, k, v, cache, batch: EspBatch) -> (out, cache)``
    with ``cache`` a pair of ``[n, Hkv, pages, page_size, D]`` split over ``mesh``'s ``"sp"``
    axis; the output rows are split over ``"sp"`` again for the dense layers after it."""
    pages = P(SP_AXIS)
    body = functools.partial(esp_attention_shard, sm_scale=sm_scale, sliding_window=sliding_window, chunk_pages=chunk_pages)
    # check_vma off: the fori_loop's carries start replicated and become per-device; the only
    # collectives (pmax, psum) are outside the loop and make the output replicated.
    sharded = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(), P(), (pages, pages), batch_specs()),
        out_specs=(P(), (pages, pages)),
        check_vma=False,
    )
    rows = NamedSharding(mesh, P(SP_AXIS))

    def attend(q, k, v, cache, batch):
        out, cache = sharded(q, k, v, cache, batch)
        return lax.with_sharding_constraint(out, rows), cache

    return attend
