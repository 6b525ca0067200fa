"""Closed-form runs of identical decode steps (the simulator's fast path).

Between arrivals, finishes and memory exhaustion, a stable batch decodes step after step with the
same rows: every step computes one token per row, samples one token per row, and allocates a new
block for each row that crosses a block boundary. ``advance_decodes`` applies k such steps at once
and returns exactly the state k schedule/update rounds would (tests prove it). ``decode_run_limit``
says how many steps are safe to skip.

Only policies whose admission can never become possible during such a run are eligible (FCFS-like
queue orders: no arrival, no finish and shrinking free memory keep a blocked queue blocked); a
scheduler class opts in by declaring ``fast_forward_safe = True`` itself (a subclass that overrides
``schedule`` is not eligible until it declares it too). Fair queueing (VTC) reorders its queue as
service accrues, so it is always stepped one step at a time.

A run starts where the next plan would be a stable decode. ``next_is_stable_decode`` answers that
from the state alone when the class also declares ``decode_only(state)`` (a dry run of its
``schedule``: StepBuilder.decodes_only / would_admit), so a run costs no ``schedule`` call.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from jaxserve.kv.state import KVState
from jaxserve.persistent import evolve
from jaxserve.plan import BatchPlan
from jaxserve.scheduler.caching import prompt_blocks_to_offer
from jaxserve.scheduler.running import COL, _frozen
from jaxserve.scheduler.update import _retire

_COMPUTED, _BLOCKS, _OUTPUT, _MAX_NEW = COL["num_computed"], COL["num_blocks"], COL["num_output"], COL["max_new"]
_SLOT, _LAST, _TOKENS, _STOP = COL["slot"], COL["last_token"], COL["num_tokens"], COL["has_stop"]


def is_stable_decode(sched, state, plan: BatchPlan) -> bool:
    """Whether ``plan`` (scheduled from ``state``) is one step of a run ``advance_decodes`` can
    repeat: every running request decodes, nothing else happens, nothing can stop early."""
    run = state.running
    n = len(run)
    return (
        type(sched).__dict__.get("fast_forward_safe", False)  # declared by the class itself
        and not sched.order.accounts_service
        and plan.num_seqs == n > 0
        and plan.request_ids == run.ids  # (not a 1-token prefill of as many new rows: vllm runs those alone)
        and not (plan.preempted or plan.swapped_out or plan.swapped_in or plan.copy_blocks)
        and plan.num_tokens == n
        and np.count_nonzero(plan.samples_token) == n  # (count_nonzero: cheaper than .all()/.any())
        and not np.count_nonzero(run.has_stop)
    )


def next_is_stable_decode(sched, state) -> Optional[bool]:
    """Whether ``sched.schedule(state)`` would plan a stable decode (``is_stable_decode``), answered
    without scheduling; None when the class that declares ``fast_forward_safe`` does not also
    declare ``decode_only`` (then only scheduling can tell)."""
    cls = type(sched)
    if not cls.__dict__.get("fast_forward_safe", False) or sched.order.accounts_service:
        return False
    probe = cls.__dict__.get("decode_only")
    if probe is None:
        return None
    nums = state.running.nums
    # Every row must have exactly its next token pending (no prefill chunk), none a stop token.
    if not len(nums) or np.count_nonzero(nums[:, _TOKENS] - nums[:, _COMPUTED] - 1) or np.count_nonzero(nums[:, _STOP]):
        return False
    return probe(sched, state)


def run_bounds(state, finish: bool = True) -> tuple[int, bool]:
    """``(k, finishes)``: the longest run of decode steps ``apply_decode_run`` may take from
    ``state``, and whether its last step finishes requests. With ``finish``, the run ends with the
    step at which the first requests finish when every step up to it has its blocks; otherwise (or
    when they do not) it is the most steps in which none finishes and none runs out of free blocks.
    ``(0, False)`` when there is none."""
    run = state.running
    if not len(run):
        return 0, False
    nums, bs = run.nums, state.kv.block_size
    m = int(np.minimum.reduce(nums[:, _MAX_NEW] - nums[:, _OUTPUT]))  # steps to the first finish
    first = _first_block_steps(nums, bs)
    free = state.kv.device.num_free
    if finish and _num_allocations(first, bs, m) <= free:
        return m, True
    k = m - 1
    if k <= 0 or _num_allocations(first, bs, k) <= free:  # (the usual case when memory is not tight)
        return max(k, 0), False
    lo, hi = 0, k - 1  # the largest k with allocations(k) <= free (allocations grow with k)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _num_allocations(first, bs, mid) <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo, False


def decode_run_limit(state) -> int:
    """The most decode steps ``advance_decodes`` may take from ``state``: none may finish a request
    (the finishing step is left to the normal path) or run out of free blocks."""
    return run_bounds(state, finish=False)[0]


def finishing_step(state) -> int:
    """The decode step (counted from 1) of ``state``'s run at which its first requests finish,
    when every step up to it has its blocks (``advance_decodes`` may take it, then
    ``retire_finished``); else 0."""
    k, finishes = run_bounds(state)
    return k if finishes else 0


def _first_block_steps(nums: np.ndarray, bs: int) -> np.ndarray:
    """Per row (``RunningBatch.nums``), the decode step (from 1) whose token needs a new block: the
    one that computes token ``num_blocks * bs`` (later ones every ``bs`` steps)."""
    return nums[:, _BLOCKS] * bs - nums[:, _COMPUTED] + 1


def _num_allocations(first: np.ndarray, bs: int, k: int) -> int:
    """Blocks the rows allocate over k decode steps (``first``: ``_first_block_steps``)."""
    return int(np.add.reduce(np.maximum((k - first) // bs + 1, 0)))


def blocks_in_use_after(state, k: int) -> int:
    """KV blocks in use after ``k`` decode steps of ``state``'s run (no step finishing requests):
    what ``advance_decodes`` reports for its step k, without applying the steps."""
    bs = state.kv.block_size
    return state.kv.device.num_used + _num_allocations(_first_block_steps(state.running.nums, bs), bs, k)


def retire_finished(state):
    """``state`` (just advanced by the step that finished some of its rows) after ``update``'s
    retirement of the rows that reached ``max_new_tokens``, exactly as ``update`` does it: their
    blocks offered to the prefix cache when caching, slots released, blocks freed tail first in row
    order, rows dropped; ``state.finished`` lists them."""
    kv = state.kv
    run, pool, outputs, finished = _retire_done(state.running, kv.device, state.outputs, kv.block_size)
    return evolve(state, kv=KVState(kv.config, pool, kv.host), running=run, outputs=outputs, finished=finished)


def _retire_done(run, pool, outputs, bs: int):
    """``(run, pool, outputs, finished)`` after retiring the rows of ``run`` that reached
    ``max_new_tokens`` (see ``retire_finished``)."""
    caching = pool.enable_caching
    if caching:
        nums = run.nums.copy()
        blocks, hashes = prompt_blocks_to_offer(run, np.arange(len(run)), bs, nums)
        run = evolve(run, nums=_frozen(nums))
    else:
        blocks, hashes = [], []
    nums = run.nums
    done = (nums[:, _OUTPUT] >= nums[:, _MAX_NEW]).nonzero()[0].tolist()
    finished, freed = _retire(run, outputs, [(r, "length") for r in done], bs, caching, blocks, hashes)
    outputs = outputs.release(nums[done, _SLOT].tolist())
    if blocks:
        pool = pool.register(blocks, hashes)
    return run.drop(done), pool.free(freed), outputs, finished


def advance_decodes(state, k: int, token_id: int):
    """The state after k decode steps of every running request, each sampling ``token_id``
    (``decode_run_limit(state) >= k`` must hold, or ``finishing_step(state) == k``: then the last
    step's finished rows are still in the batch, for ``retire_finished``); also the number of
    blocks in use after each step, int64 [k]."""
    return apply_decode_run(state, k, token_id)


def apply_decode_run(state, k: int, token_id: int, finishes: bool = False):
    """``advance_decodes``, and with ``finishes`` (``run_bounds`` said so for this k) then
    ``retire_finished``, in one pass: ``(state, blocks in use after each step)``, the last count
    after the finished requests' blocks were freed."""
    run, kv = state.running, state.kv
    nums = run.nums.copy()
    pool, tables, need, used_after = _allocate_decode_blocks(kv.device, run.block_tables, nums, kv.block_size, k)
    outputs = state.outputs.fill(nums[:, _SLOT], nums[:, _OUTPUT], k, token_id)
    for column in (_COMPUTED, _TOKENS, _OUTPUT):  # (one strided column at a time: cheaper than a 2-D slice)
        view = nums[:, column]
        view += k
    view = nums[:, _BLOCKS]
    view += need
    nums[:, _LAST] = token_id
    return close_run(state, k, run.with_nums(nums, tables), pool, outputs, used_after, finishes)


def close_run(state, k: int, running, pool, outputs, used_after: np.ndarray, finishes: bool):
    """The state after a closed-form run of ``k`` steps from ``state`` that left ``running``,
    ``pool`` and ``outputs``, retired as ``update`` retires when its last step ``finishes``
    requests; and ``used_after`` (blocks in use after each step), its last entry then counted after
    their blocks were freed."""
    finished = ()
    if finishes:
        running, pool, outputs, finished = _retire_done(running, pool, outputs, state.kv.block_size)
        used_after[-1] = pool.num_used
    kv = state.kv
    new_state = evolve(
        state, kv=KVState(kv.config, pool, kv.host), running=running, outputs=outputs, step=state.step + k,
        inflight=None, finished=finished,
    )  # fmt: skip
    return new_state, used_after


def append_blocks(pool, tables: tuple, rows) -> tuple:
    """``(pool, tables)`` after allocating one block for each of ``rows`` (a row may repeat), in
    that order, each appended to its row's table."""
    if not rows:
        return pool, tables
    pool, blocks = pool.allocate(len(rows))
    grown = list(tables)
    for r, block in zip(rows, blocks):
        grown[r] = grown[r] + (block,)
    return pool, tuple(grown)


def _allocate_decode_blocks(pool, tables: tuple, nums: np.ndarray, bs: int, k: int):
    """The blocks k decode steps of the rows (``RunningBatch.nums``) allocate, in the step-by-step
    order (by step, then by row): ``(pool, tables, blocks per row, blocks in use after each step)``."""
    if k == 1:  # (the commonest run) the rows whose tables are full take one block each, in row order
        need = nums[:, _BLOCKS] * bs == nums[:, _COMPUTED]
        pool, tables = append_blocks(pool, tables, need.nonzero()[0].tolist())
        return pool, tables, need, np.array([pool.num_used], np.int64)
    first = _first_block_steps(nums, bs)
    need = np.maximum((k - first) // bs + 1, 0)  # blocks each row allocates
    used_after = np.full(k, pool.num_used, np.int64)
    total = int(np.add.reduce(need))
    if not total:
        return pool, tables, need, used_after
    rows = need.nonzero()[0]
    if len(rows) == total:  # the usual short run: no row needs more than one block
        steps = first[rows]  # the step that computes token b_r*bs, which needs the block
        order = np.argsort(steps, kind="stable")  # the step-by-step order: by step, then by row
        pool, tables = append_blocks(pool, tables, rows[order].tolist())
        used_after += np.add.accumulate(np.bincount(steps - 1, minlength=k)[:k])
        return pool, tables, need, used_after
    new_tables = list(tables)
    rows = np.repeat(np.arange(len(nums)), need)
    # Row r's m-th new block is needed at the step that computes token b_r*bs + m*bs.
    m = np.arange(len(rows)) - np.repeat(np.cumsum(need) - need, need)
    steps = np.repeat(first, need) + m * bs
    order = np.lexsort((rows, steps))  # the step-by-step order: by step, then by row
    pool, blocks = pool.allocate(total)
    assigned = np.empty(len(rows), np.int64)
    assigned[order] = blocks
    starts = (np.cumsum(need) - need).tolist()
    counts, assigned = need.tolist(), assigned.tolist()  # Python ints: the loop below reads them per row
    for r in need.nonzero()[0].tolist():
        s = starts[r]
        new_tables[r] = tables[r] + tuple(assigned[s : s + counts[r]])
    used_after += np.cumsum(np.bincount(steps - 1, minlength=k)[:k])
    return pool, tuple(new_tables), need, used_after
