"""A packed step (``packing.pack``'s rows, buckets and sampling arrays) re-addressed for elastic
sequence parallelism: its ``AttentionBatch`` is replaced by an ``EspBatch`` whose writes and
attention entries name (device, page) pairs from the engine's page map (``esp_pages``).

Per plan row ``i`` (tokens ``[c, c + n)``, blocks ``j`` of its table): each row is written to its
block's destination page on the destination device, and also to its staging page when the block
is staged; the row's group gets, on each device, one entry per block held there: the destination
page for positions ``[0, c)`` when the block is staged (``[0, c + n)`` otherwise) and the staging
page for ``[c, c + n)``. So every key is counted once, on exactly one device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxserve.engine.esp_pages import RowPages
from jaxserve.engine.packing import HostBatch
from jaxserve.parallel.esp_attention import EspBatch
from jaxserve.plan import BatchPlan


def _entries(rows: RowPages, c: int, kv_len: int, page_size: int, num_devices: int) -> list[list[tuple[int, int, int, int]]]:
    """Per device, the ``(page, block, lo, hi)`` entries of one sequence (see the module docstring)."""
    out = [[] for _ in range(num_devices)]
    for j in range(len(rows.dest_dev)):
        staged = rows.stage_dev[j] >= 0
        hi = c if staged else kv_len
        if hi > j * page_size:
            out[rows.dest_dev[j]].append((int(rows.dest_page[j]), j, 0, hi))
        if staged:
            out[rows.stage_dev[j]].append((int(rows.stage_page[j]), j, c, kv_len))
    return out


def esp_batch(
    plan: BatchPlan, host: HostBatch, rows: Sequence[RowPages], *, num_devices: int, local_pages: int, entries: int
) -> HostBatch:
    """``host`` (``pack(plan, ...)``) with an ``EspBatch``; ``rows`` from ``EspPages.prepare(plan)``,
    ``local_pages`` the pages of a device's cache (pool + staging; that index is the drop page),
    ``entries`` the entry width ``E``. Raises ``ValueError`` if a group needs more entries."""
    attn = host.attn
    T, D, NB = len(host.token_ids), attn.num_decode_rows, attn.num_blocks
    block_rows = (T - D) // NB if NB else 0
    ps = plan.block_size
    write_page = np.full((num_devices, T), local_pages, np.int32)
    dec = np.zeros((num_devices, D, entries, 4), np.int32)
    dec_count = np.zeros((num_devices, D), np.int32)
    blk = np.zeros((num_devices, NB, entries, 4), np.int32)
    blk_count = np.zeros((num_devices, NB), np.int32)
    n_done, n_new = plan.num_computed_tokens.tolist(), plan.num_new_tokens.tolist()
    for i, r in enumerate(rows):
        c, n, first = n_done[i], n_new[i], int(host.first_rows[i])
        pos = np.arange(c, c + n)
        at = np.arange(first, first + n)
        j = pos // ps
        write_page[r.dest_dev[j], at] = r.dest_page[j]
        s = r.stage_dev[j] >= 0
        write_page[r.stage_dev[j[s]], at[s]] = r.stage_page[j[s]]
        if n == 1:
            groups, table, count = np.array([first]), dec, dec_count
        else:
            b0 = (first - D) // block_rows
            groups, table, count = np.arange(b0, b0 + -(-n // block_rows)), blk, blk_count
        for d, es in enumerate(_entries(r, c, c + n, ps, num_devices)):
            if len(es) > entries:
                raise ValueError(f"request {plan.request_ids[i]!r} has {len(es)} KV pages on device {d}, more than {entries}")
            if es:
                table[d, groups, : len(es)] = es
                count[d, groups] = len(es)
    esp = EspBatch(attn.positions, write_page, attn.slot_offset, dec, dec_count, blk, blk_count)
    return host._replace(attn=esp)


def esp_warmup_batch(host: HostBatch, *, num_devices: int, local_pages: int, entries: int) -> HostBatch:
    """A padding-only ``host`` (``packing.warmup_batches``) re-addressed: nothing is written, and
    every group has one entry on every device with no visible key (page 0, ``hi = 0``), so the
    attention's key loop runs once on each device, as a real step's does."""
    attn = host.attn
    T, D, NB = len(host.token_ids), attn.num_decode_rows, attn.num_blocks
    esp = EspBatch(
        attn.positions,
        np.full((num_devices, T), local_pages, np.int32),
        attn.slot_offset,
        np.zeros((num_devices, D, entries, 4), np.int32),
        np.ones((num_devices, D), np.int32),
        np.zeros((num_devices, NB, entries, 4), np.int32),
        np.ones((num_devices, NB), np.int32),
    )
    return host._replace(attn=esp)
