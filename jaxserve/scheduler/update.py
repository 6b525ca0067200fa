"""Applying a StepOutput: append sampled tokens, cache computed blocks, retire finished requests."""

from __future__ import annotations

import numbers

import numpy as np

from jaxserve.kv.state import KVState
from jaxserve.persistent import evolve, log_append_rows, pick
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import MAX_TOKEN_ID
from jaxserve.scheduler.caching import offer_generated_blocks, offer_prompt_blocks
from jaxserve.scheduler.running import COL, _frozen
from jaxserve.scheduler.seq import FinishedRequest

_SAMPLED = slice(COL["num_tokens"], COL["num_output"] + 1)  # both grow by one per sampled token
_LAST, _OUTPUT, _MAX_NEW = COL["last_token"], COL["num_output"], COL["max_new"]


def _sampled_tokens(out: StepOutput, ids: tuple[str, ...]) -> list[int]:
    """The sampled token of each of ``ids`` (validated token ids, as Python ints)."""
    try:
        tokens = list(map(out.token_ids.__getitem__, ids))
    except KeyError as e:
        raise ValueError(f"StepOutput.token_ids has no token for request {e.args[0]!r}") from None
    if not tokens:
        return tokens
    if set(map(type, tokens)) != {int}:  # numpy ints are fine, bools and floats are not
        bad = next((t for t in tokens if not isinstance(t, numbers.Integral) or isinstance(t, (bool, np.bool_))), None)
        if bad is not None:
            raise ValueError(f"StepOutput.token_ids must map request ids to int token ids, got {bad!r}")
        tokens = [int(t) for t in tokens]
    if min(tokens) < 0 or max(tokens) > MAX_TOKEN_ID:
        raise ValueError(f"StepOutput.token_ids must be token ids in [0, {MAX_TOKEN_ID}], got {tokens[:8]}...")
    return tokens


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
    rows = inflight.rows[plan.samples_token[inflight.entries]]
    row_list = rows.tolist()
    everyone = len(rows) == len(run)  # then rows are 0..n-1 in order: whole columns, no gathers
    tokens = _sampled_tokens(out, run.ids if everyone else pick(run.ids, row_list))

    # Append to the shared output logs, then bump the counters in one copy of the numeric columns.
    if everyone:
        outputs = log_append_rows(run.outputs, run.num_output, tokens)
    else:
        logs = log_append_rows(pick(run.outputs, row_list), run.num_output[rows], tokens)
        outputs = list(run.outputs)
        for r, log in zip(row_list, logs):
            outputs[r] = log
        outputs = tuple(outputs)
    nums = run.nums.copy()
    at = slice(None) if everyone else rows
    nums[at, _SAMPLED] += 1
    nums[at, _LAST] = tokens
    run = evolve(run, outputs=outputs, nums=_frozen(nums))
    if pool.enable_caching:
        run, pool = offer_prompt_blocks(run, pool, inflight.rows, bs)

    num_output = nums[:, _OUTPUT]
    done = nums[at, _OUTPUT] >= nums[at, _MAX_NEW]
    stop = np.flatnonzero(run.has_stop[rows])
    reasons = {}  # plan row -> "stop" where a stop token ended the request (it wins over length, as in vLLM)
    for i in stop.tolist():
        if tokens[i] in run.requests[row_list[i]].sampling.stop_token_ids:
            reasons[i] = "stop"
            done[i] = True
    finished = []
    if done.any():
        gone = []
        for i in np.flatnonzero(done).tolist():
            r = row_list[i]
            gone.append(r)
            output = run.outputs[r][: int(num_output[r])]
            pool, _ = offer_generated_blocks(run, pool, r, bs, output)
            pool = pool.free(reversed(run.block_tables[r]))
            finished.append(
                FinishedRequest(run.ids[r], tuple(output), reasons.get(i, "length"), int(run.num_preemptions[r]))
            )
        run = run.drop(sorted(gone))
    waiting = state.waiting
    if sched.order.accounts_service:
        requests = state.running.requests
        waiting = sched.order.on_generated(waiting, [requests[r].client_id for r in row_list])
    return evolve(
        state,
        kv=KVState(state.kv.config, pool, state.kv.host),
        running=run,
        waiting=waiting,
        inflight=None,
        finished=tuple(finished),
    )
