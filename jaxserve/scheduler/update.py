"""Applying a StepOutput: append sampled tokens, cache computed blocks, retire finished requests."""

from __future__ import annotations

import numbers

import numpy as np

from jaxserve.kv.state import KVState
from jaxserve.persistent import evolve, log_append_rows, pick
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import MAX_TOKEN_ID
from jaxserve.scheduler.caching import offer_generated_blocks, offer_prompt_blocks
from jaxserve.scheduler.seq import FinishedRequest


def _sampled_tokens(out: StepOutput, ids: tuple[str, ...]) -> tuple[list[int], np.ndarray]:
    """The sampled token of each of ``ids``, as a list and as an int64 array."""
    try:
        tokens = list(map(out.token_ids.__getitem__, ids))
    except KeyError as e:
        raise ValueError(f"StepOutput.token_ids has no token for request {e.args[0]!r}") from None
    if not all(type(t) is int for t in tokens):  # numpy ints are fine, bools and floats are not
        bad = next((t for t in tokens if not isinstance(t, numbers.Integral) or isinstance(t, (bool, np.bool_))), None)
        if bad is not None:
            raise ValueError(f"StepOutput.token_ids must map request ids to int token ids, got {bad!r}")
        tokens = [int(t) for t in tokens]
    arr = np.array(tokens, np.int64)
    if len(arr) and (arr.min() < 0 or arr.max() > MAX_TOKEN_ID):
        raise ValueError(f"StepOutput.token_ids must be token ids in [0, {MAX_TOKEN_ID}], got {tokens[:8]}...")
    return tokens, arr


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
    tokens, token_arr = _sampled_tokens(out, pick(run.ids, row_list))

    num_output = run.num_output.copy()
    num_output[rows] += 1
    num_tokens = run.num_tokens.copy()
    num_tokens[rows] += 1
    last_token = run.last_token.copy()
    last_token[rows] = token_arr
    everyone = len(rows) == len(run)  # then rows are 0..n-1 in order
    logs = log_append_rows(run.outputs if everyone else pick(run.outputs, row_list), run.num_output[rows], tokens)
    if everyone:
        outputs = logs
    else:
        outputs = list(run.outputs)
        for r, log in zip(row_list, logs):
            outputs[r] = log
        outputs = tuple(outputs)
    run = run.replace(num_output=num_output, num_tokens=num_tokens, last_token=last_token, outputs=outputs)
    if pool.enable_caching:
        run, pool = offer_prompt_blocks(run, pool, inflight.rows, bs)

    done = num_output[rows] >= run.max_new[rows]
    reasons = ["length"] * len(rows)
    for i in np.flatnonzero(run.has_stop[rows]).tolist():
        if tokens[i] in run.requests[row_list[i]].sampling.stop_token_ids:
            done[i] = True
            if num_output[row_list[i]] < run.max_new[row_list[i]]:
                reasons[i] = "stop"
    finished = []
    if done.any():
        gone = []
        for i in np.flatnonzero(done).tolist():
            r = row_list[i]
            gone.append(r)
            output = run.outputs[r][: int(num_output[r])]
            pool, _ = offer_generated_blocks(run, pool, r, bs, output)
            pool = pool.free(reversed(run.block_tables[r]))
            finished.append(FinishedRequest(run.ids[r], tuple(output), reasons[i], int(run.num_preemptions[r])))
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
