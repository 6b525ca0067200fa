"""Applying a StepOutput: append sampled tokens, cache newly full blocks, retire finished requests."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.kv.prefix_hash import extend_chain
from jaxserve.kv.state import KVState
from jaxserve.persistent import cons_to_list_oldest_first
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.scheduler.seq import FinishedRequest, seq_tokens


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
    sampled = plan.samples_token[inflight.entries]
    rows = inflight.rows[sampled]
    ids = run.ids
    tokens = []
    for r in rows.tolist():
        tok = out.token_ids.get(ids[r])
        if tok is None:
            raise ValueError(f"StepOutput.token_ids has no token for request {ids[r]!r}")
        tokens.append(tok)
    tok_arr = np.array(tokens, np.int64)
    if tok_arr.dtype != np.int64 or (len(tok_arr) and tok_arr.min() < 0):
        raise ValueError("StepOutput.token_ids must map request ids to ints >= 0")

    num_output = run.num_output.copy()
    num_output[rows] += 1
    num_tokens = run.num_tokens.copy()
    num_tokens[rows] += 1
    last_token = run.last_token.copy()
    last_token[rows] = tok_arr
    outputs = list(run.outputs)
    for r, t in zip(rows.tolist(), tokens):
        outputs[r] = (t, outputs[r])
    run = run.replace(
        num_output=num_output, num_tokens=num_tokens, last_token=last_token, outputs=tuple(outputs)
    )
    if pool.enable_caching:
        run, pool = _register_full_blocks(run, pool, inflight.rows, plan.block_size)

    done = num_output[rows] >= run.max_new[rows]
    reasons = ["length"] * len(rows)
    for i in np.flatnonzero(run.has_stop[rows]).tolist():
        if tokens[i] in run.requests[rows[i]].sampling.stop_token_ids:
            done[i] = True
            if num_output[rows[i]] < run.max_new[rows[i]]:
                reasons[i] = "stop"
    finished = []
    if done.any():
        gone = rows[done]
        for i in np.flatnonzero(done).tolist():
            r = int(rows[i])
            pool = pool.free(reversed(run.block_tables[r]))
            finished.append(
                FinishedRequest(
                    ids[r],
                    tuple(cons_to_list_oldest_first(run.outputs[r])),
                    reasons[i],
                    int(run.num_preemptions[r]),
                )
            )
        run = run.take(np.setdiff1d(np.arange(len(run)), gone))
    waiting = state.waiting
    if sched.order.accounts_service:
        requests = state.running.requests
        waiting = sched.order.on_generated(waiting, [requests[r].client_id for r in rows.tolist()])
    return dataclasses.replace(
        state,
        kv=KVState(state.kv.config, pool, state.kv.host),
        running=run,
        waiting=waiting,
        inflight=None,
        finished=tuple(finished),
    )


def _register_full_blocks(run, pool, rows: np.ndarray, block_size: int):
    """Offers every block that this step filled to the prefix cache, extending the hash chains."""
    full = run.num_computed[rows] // block_size
    todo = rows[full > run.num_registered[rows]]
    if not len(todo):
        return run, pool
    hashes_col = list(run.block_hashes)
    registered = run.num_registered.copy()
    blocks, hashes = [], []
    for r in todo.tolist():
        req = run.requests[r]
        chain = hashes_col[r]
        n_full = int(run.num_computed[r]) // block_size
        if not run.real_tokens[r]:
            n_full = min(n_full, len(chain))  # placeholders: only trace-given identities are shareable
        for k in range(int(registered[r]), n_full):
            if k >= len(chain):
                toks = seq_tokens(req, run.outputs[r], int(run.num_output[r]), k * block_size, (k + 1) * block_size)
                chain = chain + (extend_chain(chain, toks),)
            blocks.append(run.block_tables[r][k])
            hashes.append(chain[k])
        hashes_col[r] = chain
        registered[r] = n_full
    pool = pool.register(blocks, hashes)
    return run.replace(block_hashes=tuple(hashes_col), num_registered=registered), pool
