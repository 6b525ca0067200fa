"""BatchPlan -> fixed-shape host arrays for one jitted step (the row layout of
``jaxserve.model.attention``), bucketed so that few shapes are ever compiled.

A step's shape is ``(num_decode_rows, num_blocks)``: prefill rows come in blocks of ``block_rows``
(each prefill chunk padded to whole blocks); decode rows and blocks are padded up to a bucket
(``bucket``: a few sizes per power of two, finer for blocks), so a workload compiles
O(log max_num_seqs x log token budget) shapes. Everything else is static per
runner: the page-table width ``pages_per_seq`` and the padding page ``num_pages``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from jaxserve.runtime.step_geometry import StepGeometry, bucket
from jaxserve.model.attention import AttentionBatch
from jaxserve.plan import BatchPlan


class SamplingArrays(NamedTuple):
    """Per sequence slot ``[S]``: how to sample it (padding slots are greedy and ignored)."""

    temperature: np.ndarray  # float32, 0 = greedy
    top_k: np.ndarray  # int32, 0 = off
    top_p: np.ndarray  # float32, 1 = off
    seed: np.ndarray  # uint32
    index: np.ndarray  # int32: which generated token this is (0 = the first)


class HostBatch(NamedTuple):
    """Everything one step needs, as numpy arrays of bucketed static shape."""

    token_ids: np.ndarray  # int32 [T]
    attn: AttentionBatch  # numpy arrays, same fields as on device
    logits_rows: np.ndarray  # int32 [S]: each sequence slot's last row
    sampling: SamplingArrays
    sampled: tuple[
        tuple[str, int], ...
    ]  # (request id, slot) for every row that samples a token, in plan row order
    first_rows: (
        np.ndarray
    )  # int64 [plan.num_seqs]: the row of each plan entry's first new token

    @property
    def shape_key(self) -> tuple[int, int]:
        return self.attn.num_decode_rows, self.attn.num_blocks


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """Static packing parameters of a runner."""

    num_pages: (
        int  # device KV pages; page index num_pages is the drop slot for padding rows
    )
    page_size: int
    pages_per_seq: int  # page-table width (a multiple of the attention's chunk_pages)
    block_rows: int = 32  # rows per prefill block
    min_decode_rows: int = 1
    min_blocks: int = 1
    # Bucket grids (see ``bucket``): finer for prefill blocks, where padding rows cost full FLOPs.
    decode_per_octave: int = 2
    blocks_per_octave: int = 4

    def geometry(self, attention: str, chunk_pages: int) -> StepGeometry:
        """The step geometry of this packing under an attention path (see ``runtime/step_geometry.py``)."""
        return StepGeometry(
            attention=attention, page_size=self.page_size, block_rows=self.block_rows, chunk_pages=chunk_pages,
            decode_per_octave=self.decode_per_octave, blocks_per_octave=self.blocks_per_octave,
            min_decode_rows=self.min_decode_rows, min_blocks=self.min_blocks,
        )

    def shape(self, num_decode: int, num_blocks: int) -> tuple[int, int]:
        return (
            bucket(num_decode, self.min_decode_rows, self.decode_per_octave),
            bucket(num_blocks, self.min_blocks, self.blocks_per_octave),
        )


class RequestSampling(NamedTuple):
    prompt_len: int
    temperature: float
    top_k: int
    top_p: float
    seed: int


def pack(
    plan: BatchPlan, spec: PackSpec, sampling: dict[str, RequestSampling], shape=None
) -> HostBatch:
    """Packs ``plan``'s rows; ``sampling`` maps each request id to its prompt length and sampling
    parameters; ``shape`` forces a (larger) ``(num_decode_rows, num_blocks)`` bucket (warm-up).
    Raises ``ValueError`` if a block table is wider than ``spec.pages_per_seq``."""
    n_new = plan.num_new_tokens.tolist()
    n_done = plan.num_computed_tokens.tolist()
    is_dec = [n == 1 for n in n_new]
    dec = [i for i, d in enumerate(is_dec) if d]
    pre = [i for i, d in enumerate(is_dec) if not d]
    B = spec.block_rows
    blocks_per = [-(-n_new[i] // B) for i in pre]
    D, NB = shape or spec.shape(len(dec), sum(blocks_per))
    T, S, P = D + NB * B, D + NB, spec.pages_per_seq

    starts = np.zeros(len(n_new) + 1, np.int64)
    np.cumsum(n_new, out=starts[1:])
    flat_tokens = plan.token_ids

    token_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slot_page = np.full(T, spec.num_pages, np.int32)
    slot_offset = np.zeros(T, np.int32)
    tables = np.zeros((S, P), np.int32)
    kv_lens = np.zeros(S, np.int32)  # true KV length per slot (0 for padding)
    q_lens = np.zeros(S, np.int32)  # rows per slot in the ragged layout
    real_q = np.zeros(S, np.int32)  # real (unpadded) rows per slot
    logits_rows = np.zeros(S, np.int32)
    block_owner = np.zeros(NB, np.int32)  # slot owning each prefill block
    row_of_slot = []  # (plan row, slot, first row)

    for slot, i in enumerate(dec):
        row_of_slot.append((i, slot, slot))
    q_lens[:D] = 1
    row, blk = D, 0
    for j, i in enumerate(pre):
        slot = D + blk
        row_of_slot.append((i, slot, row))
        block_owner[blk : blk + blocks_per[j]] = slot
        q_lens[slot] = blocks_per[j] * B
        row += blocks_per[j] * B
        blk += blocks_per[j]
    for b in range(blk, NB):  # trailing padding blocks: their own empty sequences
        block_owner[b] = D + b
        q_lens[D + b] = B

    ps = spec.page_size
    first_rows = np.zeros(len(n_new), np.int64)
    for i, slot, first in row_of_slot:
        first_rows[i] = first
        table = plan.block_tables[i]
        if len(table) > P:
            raise ValueError(
                f"request {plan.request_ids[i]!r} needs {len(table)} KV pages, more than the runner's "
                f"pages_per_seq={P} (max_model_len too small)"
            )
        tables[slot, : len(table)] = table
        n, c = n_new[i], n_done[i]
        pos = np.arange(c, c + n, dtype=np.int64)
        rows = slice(first, first + n)
        token_ids[rows] = flat_tokens[starts[i] : starts[i + 1]]
        positions[rows] = pos
        tarr = np.asarray(table, np.int64)
        slot_page[rows] = tarr[pos // ps]
        slot_offset[rows] = pos % ps
        kv_lens[slot] = c + n
        real_q[slot] = n
        logits_rows[slot] = first + n - 1

    cu_q_lens = np.zeros(S + 1, np.int32)
    np.cumsum(q_lens, out=cu_q_lens[1:])
    # The ragged layout counts a prefill sequence's padded rows as its queries (see attention.py),
    # so its KV length includes them; padding slots attend to their own (dropped) rows.
    ragged_kv = (kv_lens - real_q + q_lens).astype(np.int32)
    attn = AttentionBatch(
        slot_page=slot_page,
        slot_offset=slot_offset,
        positions=positions,
        decode_kv_lens=kv_lens[:D].copy(),
        decode_pages=tables[:D].copy(),
        block_kv_lens=kv_lens[block_owner] if NB else np.zeros(0, np.int32),
        block_pages=tables[block_owner] if NB else np.zeros((0, P), np.int32),
        kv_lens=ragged_kv,
        page_indices=tables,
        cu_q_lens=cu_q_lens,
        num_seqs=np.array([S], np.int32),
    )

    temperature = np.zeros(S, np.float32)
    top_k = np.zeros(S, np.int32)
    top_p = np.ones(S, np.float32)
    seed = np.zeros(S, np.uint32)
    index = np.zeros(S, np.int32)
    sampled = []
    samples = plan.samples_token.tolist()
    for i, slot, _ in row_of_slot:
        if not samples[i]:
            continue
        rid = plan.request_ids[i]
        sp = sampling[rid]
        temperature[slot], top_k[slot], top_p[slot], seed[slot] = (
            sp.temperature,
            sp.top_k,
            sp.top_p,
            sp.seed,
        )
        index[slot] = n_done[i] + n_new[i] - sp.prompt_len
        sampled.append((i, rid, slot))
    sampled.sort()  # plan row order, as StepOutput.for_plan takes the sampled tokens
    return HostBatch(
        token_ids,
        attn,
        logits_rows,
        SamplingArrays(temperature, top_k, top_p, seed, index),
        tuple((rid, slot) for _, rid, slot in sampled),
        first_rows,
    )


def warmup_batches(shape: tuple[int, int], spec: PackSpec) -> tuple[HostBatch, ...]:
    """Padding-only batches of ``shape`` that together run every data-dependent path of the step
    once: the grouped attention's KV loop (each padding row and block reads one position of page 0;
    its own K/V write still goes to the drop page, so no KV changes) and each sampling branch
    (greedy, temperature, top-k/top-p filtered). XLA CPU prepares a loop body or ``lax.cond``
    branch on its first execution: a step whose first run takes a path the warm-up did not was
    measured at 1.5-2.3x its steady time."""
    base = pack(BatchPlan.empty(spec.page_size), spec, {}, shape=shape)
    attn = base.attn._replace(
        decode_kv_lens=np.ones_like(base.attn.decode_kv_lens), block_kv_lens=np.ones_like(base.attn.block_kv_lens)
    )
    s = base.sampling
    hot = np.ones_like(s.temperature)
    modes = (
        s,  # greedy
        s._replace(temperature=hot),
        s._replace(temperature=hot, top_k=np.ones_like(s.top_k), top_p=np.full_like(s.top_p, 0.5)),
    )
    return tuple(base._replace(attn=attn, sampling=m) for m in modes)
