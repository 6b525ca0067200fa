"""Applying a StepOutput: append sampled tokens, cache computed blocks, retire finished requests."""

from __future__ import annotations

import numbers

import numpy as np

from jaxserve.kv.state import KVState
from jaxserve.persistent import evolve, pick
from jaxserve.plan import BatchPlan, SampledTokens, StepOutput
from jaxserve.request import MAX_TOKEN_ID, any_bad_token_id
from jaxserve.scheduler.caching import generated_blocks_to_offer, prompt_blocks_to_offer
from jaxserve.scheduler.running import COL, _frozen
from jaxserve.scheduler.seq import FinishedRequest

_SAMPLED = slice(COL["num_tokens"], COL["num_output"] + 1)  # both grow by one per sampled token
_LAST, _OUTPUT, _MAX_NEW = COL["last_token"], COL["num_output"], COL["max_new"]
_NUM_TOKENS = COL["num_tokens"]


def _sampled_tokens(out: StepOutput, ids: tuple[str, ...]) -> np.ndarray:
    """The sampled token of each of ``ids``, validated, as an int64 array."""
    try:
        tokens = list(map(out.token_ids.__getitem__, ids))
    except KeyError as e:
        raise ValueError(f"StepOutput.token_ids has no token for request {e.args[0]!r}") from None
    if not tokens:
        return np.zeros(0, np.int64)
    if set(map(type, tokens)) != {int}:  # numpy ints are fine, bools and floats are not
        bad = next((t for t in tokens if not isinstance(t, numbers.Integral) or isinstance(t, (bool, np.bool_))), None)
        if bad is not None:
            raise ValueError(f"StepOutput.token_ids must map request ids to int token ids, got {bad!r}")
        tokens = [int(t) for t in tokens]
    try:
        arr = np.fromiter(tokens, np.int64, len(tokens))
    except OverflowError:  # beyond int64: certainly out of range
        arr = None
    if arr is None or any_bad_token_id(arr):
        raise ValueError(f"StepOutput.token_ids must be token ids in [0, {MAX_TOKEN_ID}], got {tokens[:8]}...")
    return arr


def _sampling_rank(plan: BatchPlan) -> np.ndarray:
    """For each plan row, its index among the rows that sample (meaningful where it samples)."""
    return np.add.accumulate(plan.samples_token.astype(np.int64)) - 1


def apply_step_output(sched, state, plan: BatchPlan, out: StepOutput):
    """The state after ``plan`` ran and produced ``out`` (see ``Scheduler.update``)."""
    inflight = state.inflight
    if inflight is None or inflight.step != plan.step:
        raise ValueError(
            f"update() got the plan of step {plan.step}, but the pending plan is "
            f"{'none' if inflight is None else inflight.step}: call update once after each schedule"
        )
    run = state.running
    pool = state.kv.device
    bs = plan.block_size
    samples = plan.samples_token[inflight.entries]
    rows = inflight.rows[samples]
    row_list = rows.tolist()
    everyone = len(rows) == len(run)  # then rows are 0..n-1 in order: whole columns, no gathers
    sampled = out.token_ids
    if type(sampled) is SampledTokens and sampled.step == plan.step:  # validated already
        token_arr = sampled.array
        if len(token_arr) != len(rows):  # rows were aborted since schedule(): keep the others'
            token_arr = token_arr[_sampling_rank(plan)[inflight.entries[samples]]]
    else:
        token_arr = _sampled_tokens(out, run.ids if everyone else pick(run.ids, row_list))

    # Write the tokens into the rows' slots, then bump the counters in one copy of the numeric columns.
    at = slice(None) if everyone else rows
    outputs = state.outputs.write(run.slot[at], run.num_output[at], token_arr)
    nums = run.nums.copy()
    if everyone:  # one strided column at a time is cheaper than a two-column slice
        nums[:, _NUM_TOKENS] += 1
        nums[:, _OUTPUT] += 1
    else:
        nums[rows, _SAMPLED] += 1
    nums[at, _LAST] = token_arr
    # Blocks to offer to the prefix cache, registered in one call (in this order, which decides
    # which block keeps a hash computed twice): newly computed prompt blocks, then finished
    # requests' generated blocks.
    caching = pool.enable_caching
    if caching:
        blocks, hashes = prompt_blocks_to_offer(run, inflight.rows, bs, nums)
    else:
        blocks, hashes = [], []
    run = evolve(run, nums=_frozen(nums))

    done = nums[at, _OUTPUT] >= nums[at, _MAX_NEW]
    reasons = {}  # plan row -> "stop" where a stop token ended the request (it wins over length, as in vLLM)
    has_stop = run.has_stop[rows]
    if np.count_nonzero(has_stop):  # (count_nonzero: several times cheaper than .any())
        for i in has_stop.nonzero()[0].tolist():
            if token_arr.item(i) in run.requests[row_list[i]].sampling.stop_token_ids:
                reasons[i] = "stop"
                done[i] = True
    finished = ()
    if np.count_nonzero(done):
        ends = [(row_list[i], reasons.get(i, "length")) for i in done.nonzero()[0].tolist()]
        finished, freed = _retire(run, outputs, ends, bs, caching, blocks, hashes)
        outputs = outputs.release(run.slot[[r for r, _ in ends]].tolist())
        if blocks:
            pool = pool.register(blocks, hashes)
        pool = pool.free(freed)  # every table tail-first, in plan order: as freeing them one by one
        run = run.drop(sorted(r for r, _ in ends))
    elif blocks:
        pool = pool.register(blocks, hashes)
    waiting = state.waiting
    if sched.order.accounts_service:
        requests = state.running.requests
        waiting = sched.order.on_generated(waiting, [requests[r].client_id for r in row_list])
    return evolve(
        state,
        kv=KVState(state.kv.config, pool, state.kv.host),
        running=run,
        waiting=waiting,
        outputs=outputs,
        inflight=None,
        finished=finished,
    )


def _retire(run, outputs, ends: list[tuple[int, str]], bs: int, caching: bool, blocks: list, hashes: list):
    """The FinishedRequests of the rows ``ends`` ((row, finish reason), in plan order; their ids in
    TokenBuffer ``outputs``) and their blocks to free, tail first row by row. Appends their
    generated full blocks (and hashes) to ``blocks``/``hashes`` for the prefix cache when
    ``caching``."""
    finished, freed = [], []
    num_output, preemptions, slots = run.num_output, run.num_preemptions, run.slot
    for r, reason in ends:
        output = outputs.read(int(slots[r]), int(num_output[r]))
        if caching:
            b, h, _ = generated_blocks_to_offer(run, r, bs, output)
            blocks.extend(b)
            hashes.extend(h)
        freed.extend(reversed(run.block_tables[r]))
        finished.append(FinishedRequest(run.ids[r], output, reason, int(preemptions[r])))
    return tuple(finished), freed
