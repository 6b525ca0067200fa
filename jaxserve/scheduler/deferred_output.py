"""Deferred step outputs: scheduling step N+1 before step N's tokens are known (async scheduling).

An asynchronous engine (``runtime/pipelined.py``) schedules step N+1 while the device still runs
step N. It closes step N at once with ``provisional_update``: every sampling row of N is taken to
have produced one token, a placeholder (``PENDING_TOKEN``), so finishes by length are known and
step N+1 decodes every such row; stop tokens are not looked at. When N's real tokens arrive,
``reconcile`` writes them wherever their requests are now (running, requeued or swapped out by
N+1's preemptions, or finished by length at N) and finishes, with reason ``stop``, each request
whose token at N is one of its stop tokens: its outputs end with that token, its blocks are freed
and its row in the already-scheduled step N+1 is dropped (that step's update never sees it), as
vLLM's async scheduler does with its output placeholders.

Invariants that make this safe (docs/architecture.md, "Asynchronous scheduling in the engine"):
a placeholder is only ever the newest output of a request, whose KV no step has computed yet, so
no prefix-cache hash covers it (hashes cover full *computed* blocks), and the blocks a stopped
request frees at ``reconcile`` can go to another request only in step N+2 or later, which the
device runs after N+1, where the dropped row wrote.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxserve.persistent import evolve, pick
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.scheduler.caching import generated_blocks_to_offer
from jaxserve.scheduler.running import COL
from jaxserve.scheduler.seq import FinishedRequest
from jaxserve.scheduler.update import apply_step_output

PENDING_TOKEN = 0  # the placeholder id of a token still on the device (never checked as a stop)
_LAST, _COMPUTED = COL["last_token"], COL["num_computed"]


class PendingStep(NamedTuple):
    """A step closed by ``provisional_update`` whose tokens are not known yet.

    ``requests[i]`` sampled its output number ``positions[i]`` (from 0) as entry
    ``token_index[i]`` of the step's token array (one per sampling row of ``plan``, plan order);
    ``finished`` are the requests the step finished by length, their last token a placeholder."""

    plan: BatchPlan
    requests: tuple  # Request, one per sampled token of a request still held
    positions: np.ndarray  # int64
    token_index: np.ndarray  # int64
    finished: tuple[FinishedRequest, ...]


class Reconciled(NamedTuple):
    """What ``reconcile`` did: the requests step N finished (by length or stop, real tokens, in
    that order), and those of them that stopped while scheduled in step N+1 (rows dropped there)."""

    finished: tuple[FinishedRequest, ...]
    dropped: tuple[str, ...]


def provisional_update(sched, state, plan: BatchPlan) -> tuple[object, PendingStep]:
    """``sched.update(state, plan, ...)`` with a placeholder token for every sampling row and no
    stop check: the state step N+1 is scheduled from. Its ``finished`` is empty; the finishes come
    from ``reconcile`` with the real tokens."""
    inflight, run = state.inflight, state.running
    if inflight is None or inflight.step != plan.step:
        raise ValueError(f"provisional_update: plan {plan.step} is not the state's pending plan")
    samples = plan.samples_token[inflight.entries]
    rows = inflight.rows[samples]
    rank = np.add.accumulate(plan.samples_token.astype(np.int64)) - 1
    token_index = rank[inflight.entries[samples]]
    row_list = rows.tolist()
    requests = pick(run.requests, row_list)
    positions = run.num_output[rows].copy()
    new = apply_step_output(sched, state, plan, StepOutput.repeated(plan, PENDING_TOKEN), check_stops=False)
    return evolve(new, finished=()), PendingStep(plan, tuple(requests), positions, token_index, new.finished)


def reconcile(sched, state, pending: PendingStep, tokens: np.ndarray) -> tuple[object, Reconciled]:
    """``state`` (any state after ``pending``'s provisional update, between or during steps: step
    N+1 may be scheduled and in flight) with ``pending``'s real ``tokens`` (one per sampling row of
    its plan) in place. A request whose new token is one of its stop tokens finishes now, that token
    last; a request no longer held (aborted) is skipped."""
    tokens = np.asarray(tokens, np.int64)
    expected = int(np.count_nonzero(pending.plan.samples_token))
    if tokens.shape != (expected,):
        raise ValueError(f"reconcile: tokens of shape {tokens.shape} for the {expected} sampling rows of step {pending.plan.step}")
    got = {
        req.request_id: (pos, tok, req)
        for req, pos, tok in zip(pending.requests, pending.positions.tolist(), tokens[pending.token_index].tolist())
    }
    finished, dropped = [], []
    for f in pending.finished:  # finished by length at N: the real last token; a stop token wins
        pos, tok, req = got.pop(f.request_id)
        reason = "stop" if tok in req.sampling.stop_token_ids else f.finish_reason
        finished.append(f._replace(output_token_ids=f.output_token_ids[:pos] + (tok,), finish_reason=reason))
    state, stopped = _write_running(state, got)
    for rid, (pos, tok, req) in got.items():  # preempted by step N+1: requeued or swapped out
        state, f = _patch_queued(sched, state, rid, pos, tok, tok in req.sampling.stop_token_ids)
        if f is not None:
            finished.append(f)
    for rid in stopped:
        state, f, was_scheduled = _retire_stopped(sched, state, rid)
        finished.append(f)
        if was_scheduled:
            dropped.append(rid)
    return state, Reconciled(tuple(finished), tuple(dropped))


def _write_running(state, got: dict):
    """Writes the tokens of ``got``'s running requests (removing them from ``got``) into their
    output slots, and as ``last_token`` where it is the newest; also returns those that stopped."""
    run = state.running
    if not got or not len(run):
        return state, []
    index = dict(zip(run.ids, range(len(run))))
    rows, pos, toks, stopped = [], [], [], []
    for rid in [rid for rid in got if rid in index]:
        p, t, req = got.pop(rid)
        rows.append(index[rid])
        pos.append(p)
        toks.append(t)
        if t in req.sampling.stop_token_ids:
            stopped.append(rid)
    if not rows:
        return state, stopped
    rows, pos, toks = np.array(rows), np.array(pos, np.int64), np.array(toks, np.int64)
    outputs = state.outputs.write(run.slot[rows], pos, toks)
    newest = pos == run.num_output[rows] - 1
    nums = run.nums.copy()
    nums[rows[newest], _LAST] = toks[newest]
    return evolve(state, running=run.with_nums(nums), outputs=outputs), stopped


def _retire_stopped(sched, state, rid: str):
    """Finishes the running request ``rid`` (reason ``stop``, its outputs as written) as the update
    of step N would have: its full computed blocks as of N offered to the prefix cache, then its
    blocks freed and its row, if step N+1 scheduled it, dropped from that step (``abort``).
    Returns ``(state, FinishedRequest, whether N+1 scheduled it)``."""
    run = state.running
    r = run.row_index(rid)
    inflight = state.inflight
    scheduled = inflight is not None and bool(np.count_nonzero(inflight.rows == r))
    output = state.outputs.read(int(run.slot[r]), int(run.num_output[r]))
    pool = state.kv.device
    if pool.enable_caching:
        row = run.take(np.array([r]))
        if scheduled:  # N+1 computed one more token (a decode: its input is the stop token)
            nums = row.nums.copy()
            nums[0, _COMPUTED] -= 1
            row = row.with_nums(nums)
        blocks, hashes, _ = generated_blocks_to_offer(row, 0, state.kv.config.block_size, output)
        if blocks:
            state = evolve(state, kv=evolve(state.kv, device=pool.register(blocks, hashes)))
    f = FinishedRequest(rid, output, "stop", int(run.num_preemptions[r]))
    return sched.abort(state, rid, 0.0), f, scheduled


def _patch_queued(sched, state, rid: str, pos: int, tok: int, stop: bool):
    """Writes ``tok`` as output ``pos`` of ``rid``, waiting or swapped out since step N+1's
    preemption; with ``stop`` it finishes instead (removed, host blocks freed). Returns
    ``(state, FinishedRequest or None)``; a request held nowhere (aborted) is skipped."""
    order, waiting, swapped = sched.order, state.waiting, state.swapped
    if order.contains(waiting, rid):
        seq = _waiting_seq(waiting, rid)
        seq = seq._replace(outputs=seq.outputs[:pos] + (tok,) + seq.outputs[pos + 1:])
        if stop:
            return evolve(state, waiting=order.remove(waiting, rid)), _finished(seq)
        patched = order.push(order.remove(waiting, rid), seq, is_arrival=False)
        if hasattr(waiting, "last_left"):  # a fair queue: the request did not leave it
            patched = evolve(patched, last_left=waiting.last_left)
        return evolve(state, waiting=patched), None
    if rid in swapped:
        seq = swapped.get(rid)
        seq = seq._replace(outputs=seq.outputs[:pos] + (tok,) + seq.outputs[pos + 1:])
        if stop:
            host = state.kv.host.free(seq.host_blocks)
            return evolve(state, kv=evolve(state.kv, host=host), swapped=swapped.remove(rid)), _finished(seq)
        return evolve(state, swapped=swapped.remove(rid).push((seq.seq_no,), rid, seq)), None
    return state, None


def _waiting_seq(waiting, rid: str):
    """The SeqState of ``rid`` in a waiting queue (a KeyedQueue, or VTC's per-client FairQueue)."""
    if hasattr(waiting, "per_client"):
        return waiting.per_client[waiting.where[rid]].get(rid)
    return waiting.get(rid)


def _finished(seq) -> FinishedRequest:
    return FinishedRequest(seq.request_id, seq.outputs[: seq.num_output], "stop", seq.num_preemptions)
