"""Closed-form runs of the steps that finish a chunked prefill (the simulator's fast path, beside
``fast_forward``'s decode runs).

A chunked-prefill policy (Sarathi) spreads a prompt over steps, each filled up with every running
decode. While exactly one running request still prefills and the others decode, and nothing else
can happen (no arrival, admission, swap or preemption), the next steps follow from the state
alone: each decodes every other row once and gives the prefilling row what is left of the token
budget, in the policy's chunks, until its prompt is done. ``prefill_run`` finds them,
``prefill_run_plan`` builds step j's BatchPlan as ``schedule`` would (the executor costs it), and
``apply_prefill_run`` returns the state after the first k of them exactly as k schedule/update
rounds leave it (tests compare both).

A class opts in by declaring ``prefill_run_budget(state)`` itself, next to ``fast_forward_safe``:
the token budget and chunking of its ``run_running``, and whether a step may leave budget over
without admitting anyone. Only without prefix caching: each step would offer the prompt blocks it
computed to the cache, between allocations that may evict cached blocks.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Optional

import numpy as np

from jaxserve.plan import BatchPlan
from jaxserve.scheduler.fast_forward import _first_block_steps, append_blocks, close_run
from jaxserve.scheduler.running import COL
from jaxserve.scheduler.step import segment_ids

_COMPUTED, _TOKENS, _OUTPUT, _MAX_NEW = COL["num_computed"], COL["num_tokens"], COL["num_output"], COL["max_new"]
_BLOCKS, _LAST, _SLOT, _HAS_STOP = COL["num_blocks"], COL["last_token"], COL["slot"], COL["has_stop"]


class PrefillRun(NamedTuple):
    """The steps of one prefill run, from the state ``prefill_run`` was given."""

    row: int  # the prefilling row of the running batch
    chunks: tuple[int, ...]  # its new tokens at each step
    completes: bool  # the last step computes its prompt's last token (so it samples)
    finishes: bool  # the last step finishes requests (retired after it)
    blocks: tuple[tuple[int, ...], ...]  # per step, the rows that take a new block, in allocation order

    @property
    def num_blocks(self) -> int:
        return sum(map(len, self.blocks))


def prefill_run(sched, state, finish: bool = True) -> Optional[PrefillRun]:
    """The steps from ``state`` that continue its one chunked prefill (module doc), or None: up to
    the one that completes the prompt or leaves one token of it (the next step is then a plain
    decode), ending before a step that might admit a request, run out of free blocks or (unless
    ``finish``) finish a request, and with the first one that finishes requests."""
    cls = type(sched)
    probe = cls.__dict__.get("prefill_run_budget")
    if probe is None or not cls.__dict__.get("fast_forward_safe", False) or sched.order.accounts_service:
        return None
    run, pool = state.running, state.kv.device
    if not len(run) or pool.enable_caching:
        return None
    nums = run.nums
    remaining = nums[:, _TOKENS] - nums[:, _COMPUTED]
    pending = (remaining > 1).nonzero()[0]
    if len(pending) != 1 or np.count_nonzero(nums[:, _HAS_STOP]):
        return None
    spec = probe(sched, state)
    if spec is None:
        return None
    budget, chunk, leftover_ok = spec
    p = int(pending[0])
    left = budget - (len(run) - 1)  # what the decodes leave the prefill, every step
    if left <= 0:
        return None
    chunks, rest = [], remaining.item(p)
    while rest > 1:  # its chunks up to the one that completes the prompt or leaves one token of it
        n = chunk(rest, left)
        if n <= 0 or (n < left and not leftover_ok):  # (budget left over: the queue head may be admitted)
            break
        chunks.append(n)
        rest -= n
    if not chunks:
        return None
    # Blocks: the decode rows' tokens need new ones at steps first_r, first_r + bs, ... (in row
    # order within a step, as run_running allocates them), then the prefill's chunk its own.
    bs, k = state.kv.block_size, len(chunks)
    decodes = remaining == 1
    first = _first_block_steps(nums, bs)
    due = (decodes & (first <= k)).nonzero()[0]
    events = sorted(zip(first[due].tolist(), due.tolist()))  # (step, row): by step, then row
    if k > bs:  # a long run: rows take a block every bs steps
        events = sorted((j, r) for j0, r in events for j in range(j0, k + 1, bs))
    takers = [[] for _ in range(k + 1)]
    for j, r in events:
        takers[j].append(r)
    gaps = nums[:, _MAX_NEW] - nums[:, _OUTPUT]  # a decode row finishes at step gaps[r]
    first_finish = int(np.minimum.reduce(gaps[decodes])) if len(run) > 1 else k + 1  # (else no decode row)
    computed, held, free, used = nums.item(p, _COMPUTED), nums.item(p, _BLOCKS), pool.num_free, 0
    blocks = []
    for j, n in enumerate(chunks, 1):
        grow = max(-(-(computed + n) // bs) - held, 0)  # (0 when admission reserved the prompt's blocks)
        step_takers = tuple(takers[j]) + (p,) * grow
        used += len(step_takers)
        finishing = j >= first_finish or (j == k and rest == 0 and gaps.item(p) == 1)
        if used > free or (finishing and not finish):  # the step would preempt, or must not finish
            break
        blocks.append(step_takers)
        computed, held = computed + n, held + grow
        if finishing:
            return PrefillRun(p, tuple(chunks[:j]), j == k and rest == 0, True, tuple(blocks))
    j = len(blocks)
    return PrefillRun(p, tuple(chunks[:j]), j == k and rest == 0, False, tuple(blocks)) if j else None


def prefill_run_plan(state, pr: PrefillRun, j: int, block_tables: tuple, last_token: Optional[int]) -> BatchPlan:
    """Step ``j`` (from 0) of ``pr`` as ``schedule`` plans it: ``block_tables`` are the tables after
    its allocations, ``last_token`` the token every row sampled at step j - 1 (unused for j = 0)."""
    run, p = state.running, pr.row
    nums = run.nums
    nc = nums[:, _COMPUTED] + j
    nc[p] = nums.item(p, _COMPUTED) + sum(pr.chunks[:j])
    n = np.ones(len(run), np.int64)
    n[p] = pr.chunks[j]
    samples = np.ones(len(run), bool)
    samples[p] = pr.completes and j == len(pr.chunks) - 1  # (with a chunk of 2+ tokens: no decode)
    newest = nums[:, _LAST].astype(np.int32) if j == 0 else np.full(len(run), last_token, np.int32)
    segment = segment_ids(run, p, state.outputs, nc.item(p), nc.item(p) + pr.chunks[j])
    is_decode = samples.copy()
    is_decode[p] = False
    return BatchPlan.built(
        request_ids=run.ids,
        num_computed_tokens=nc,
        num_new_tokens=n,
        samples_token=samples,
        block_tables=block_tables,
        token_ids=np.concatenate((newest[:p], segment, newest[p + 1 :])),
        block_size=state.kv.block_size,
        step=state.step + j,
        is_decode=is_decode,
        num_decode_tokens=len(run) - 1,
    )


def apply_prefill_run(state, pr: PrefillRun, k: int, token_id: int):
    """The state after the first ``k`` steps of ``pr`` (each sampling ``token_id`` for every row
    that samples), retired as ``update`` retires when they are all of it and it finishes
    requests; and the blocks in use after each step, int64 [k]."""
    run, kv = state.running, state.kv
    p = pr.row
    nums = run.nums.copy()
    takers = [r for step in pr.blocks[:k] for r in step]
    pool, tables = append_blocks(kv.device, run.block_tables, takers)
    if takers:
        view = nums[:, _BLOCKS]
        view += np.bincount(np.array(takers, np.int64), minlength=len(run))
    used_after = np.fromiter(itertools.accumulate(map(len, pr.blocks[:k]), initial=kv.device.num_used), np.int64)[1:]
    completes = pr.completes and k == len(pr.chunks)
    slot, output = nums[:, _SLOT], nums[:, _OUTPUT]
    decodes = np.ones(len(run), bool)
    decodes[p] = False
    outputs = state.outputs.fill(slot[decodes], output[decodes], k, token_id)
    if completes:  # its prompt's last chunk samples its next token
        outputs = outputs.fill(slot[p : p + 1], output[p : p + 1], 1, token_id)
    for column in (_TOKENS, _OUTPUT):  # (one strided column at a time: cheaper than a 2-D slice)
        view = nums[:, column]
        view += k
        view[p] -= k - completes
    view = nums[:, _COMPUTED]
    view += k
    view[p] += sum(pr.chunks[:k]) - k
    view = nums[:, _LAST]
    view[decodes] = token_id
    if completes:
        view[p] = token_id
    return close_run(state, k, run.with_nums(nums, tables), pool, outputs, used_after, pr.finishes and k == len(pr.chunks))
