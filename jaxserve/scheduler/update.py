"""Applying a StepOutput: append sampled tokens, cache computed blocks, retire finished requests."""

from __future__ import annotations

import numbers

import numpy as np

from jaxserve.kv.state import KVState
from jaxserve.persistent import evolve, pick
from jaxserve.plan import BatchPlan, SampledTokens, StepOutput
from jaxserve.request import MAX_TOKEN_ID, any_bad_token_id
from jaxserve.scheduler.caching import generated_blocks_to_offer, prompt_blocks_to_offer
from jaxserve.scheduler.running import COL
from jaxserve.scheduler.seq import FinishedRequest

_LAST, _OUTPUT, _MAX_NEW = COL["last_token"], COL["num_output"], COL["max_new"]
_NUM_TOKENS, _SLOT, _HAS_STOP = COL["num_tokens"], COL["slot"], COL["has_stop"]


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


def apply_step_output(sched, state, plan: BatchPlan, out: StepOutput, *, check_stops: bool = True):
    """The state after ``plan`` ran and produced ``out`` (see ``Scheduler.update``). Without
    ``check_stops`` the tokens are placeholders (an asynchronous engine's step still in flight:
    ``scheduler/deferred_output.py``): only length finishes are known, stop tokens are not looked at."""
    inflight = state.inflight
    if inflight is None or inflight.step != plan.step:
        raise ValueError(
            f"update() got the plan of step {plan.step}, but the pending plan is "
            f"{'none' if inflight is None else inflight.step}: call update once after each schedule"
        )
    run = state.running
    pool = state.kv.device
    bs = plan.block_size
    # (entries is every plan row, in order, unless rows were aborted since schedule(): no gather)
    samples = plan.samples_token if len(inflight.entries) == plan.num_seqs else plan.samples_token[inflight.entries]
    rows = inflight.rows[samples]
    everyone = len(rows) == len(run)  # then rows are 0..n-1 in order: whole columns, no gathers
    sampled = out.token_ids
    if type(sampled) is SampledTokens and sampled.step == plan.step:  # validated already
        token_arr = sampled.array
        if len(token_arr) != len(rows):  # rows were aborted since schedule(): keep the others'
            token_arr = token_arr[_sampling_rank(plan)[inflight.entries[samples]]]
    else:
        token_arr = _sampled_tokens(out, run.ids if everyone else pick(run.ids, rows.tolist()))

    # Write the tokens into the rows' slots, then bump the counters in one copy of the numeric
    # columns (one strided column at a time: cheaper than a two-column slice).
    nums = run.nums.copy()
    slot, num_tokens, num_output, last = nums[:, _SLOT], nums[:, _NUM_TOKENS], nums[:, _OUTPUT], nums[:, _LAST]
    if everyone:
        outputs = state.outputs.write(slot, num_output, token_arr)
        num_tokens += 1
        num_output += 1
        last[:] = token_arr
    else:
        outputs = state.outputs.write(slot[rows], num_output[rows], token_arr)
        num_tokens[rows] += 1
        num_output[rows] += 1
        last[rows] = token_arr
    # Blocks to offer to the prefix cache, registered in one call (in this order, which decides
    # which block keeps a hash computed twice): newly computed prompt blocks, then finished
    # requests' generated blocks.
    caching = pool.enable_caching
    if caching:
        blocks, hashes = prompt_blocks_to_offer(run, inflight.rows, bs, nums)
    else:
        blocks, hashes = [], []
    run = run.with_nums(nums)

    # Rows that did not sample cannot be done (a running row has num_output < max_new), so whole
    # columns find the finished ones, in row order = plan order.
    done = (num_output >= nums[:, _MAX_NEW]).nonzero()[0].tolist()
    if check_stops and np.count_nonzero(nums[:, _HAS_STOP]):  # a stop token wins over length, as in vLLM
        stop_rows = [r for r, t in zip(rows.tolist(), token_arr.tolist())
                     if nums.item(r, _HAS_STOP) and t in run.requests[r].sampling.stop_token_ids]
        reason = dict.fromkeys(stop_rows, "stop")
        ends = [(r, reason.get(r, "length")) for r in sorted(set(done).union(stop_rows))]
    else:
        ends = [(r, "length") for r in done]
    finished = ()
    if ends:
        finished, freed = _retire(run, outputs, ends, bs, caching, blocks, hashes)
        gone = [r for r, _ in ends]
        outputs = outputs.release(slot[gone].tolist())
        if blocks:
            pool = pool.register(blocks, hashes)
        pool = pool.free(freed)  # every table tail-first, in plan order: as freeing them one by one
        run = run.drop(gone)
    elif blocks:
        pool = pool.register(blocks, hashes)
    waiting = state.waiting
    if sched.order.accounts_service:
        requests = state.running.requests
        waiting = sched.order.on_generated(waiting, [requests[r].client_id for r in rows.tolist()])
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
