"""The load client's observations as the simulator's event log, so metrics, CSV and plots are the same.

``outcome_log`` builds a ``FrozenLog`` from what the client saw: a request arrives when it was sent,
each stream chunk is a "step" ending when the chunk arrived, in which its request got the chunk's
tokens (a chunk of k tokens: k tokens at once, k - 1 gaps of 0 s), and the request finishes when its
stream ends. A 4xx refusal is a rejection, any other failure a ``failed`` request. Between chunks
the log's queue columns hold the client's view: *waiting* = sent, no token yet; *running* = has a
token, stream not ended. ``summarize_client`` is ``metrics.summarize`` with the keys the client
cannot observe (engine steps, scheduling, preemptions, KV, energy) set to None with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxserve.metrics import summarize
from jaxserve.runtime.events import FrozenLog, RequestInfo
from jaxserve.serve.load_client import LoadRequest, Outcome

NOT_SEEN = "not observable from the client (the server's engine steps and queue are not in the stream)"
QUEUEING_NOT_SEEN = "not observable from the client (it sees the first token, not the first scheduling)"
#: metrics.summarize keys the client cannot measure, with why.
UNOBSERVED = {
    "num_steps": NOT_SEEN,
    "num_preemptions": NOT_SEEN,
    "busy_fraction": NOT_SEEN,
    "mean_batch_tokens": NOT_SEEN,
    "peak_kv_usage": NOT_SEEN,
    "num_kv_blocks": NOT_SEEN,
    "energy_j": "the load client measures time over HTTP, not power",
    "energy_j_per_token": "the load client measures time over HTTP, not power",
    "cost_usd_per_mtok": "the load client has no price for the server's machine",
}


def outcome_log(requests: Sequence[LoadRequest], outcomes: Sequence[Outcome]) -> FrozenLog:
    """The event log of a replay (``outcomes[i]`` is ``requests[i]``'s), requests in sending order."""
    if len(requests) != len(outcomes):
        raise ValueError(f"{len(requests)} requests but {len(outcomes)} outcomes")
    n = len(requests)
    order = sorted(range(n), key=lambda i: (outcomes[i].sent_s, i))
    reqs = [requests[i] for i in order]
    outs = [outcomes[i] for i in order]
    arrival = np.array([o.sent_s for o in outs], np.float64)
    finish = np.array([np.nan if o.end_s is None else o.end_s for o in outs], np.float64)
    rejected = np.array([o.status == "rejected" for o in outs], bool)
    failed = np.array([o.status == "failed" for o in outs], bool)
    reasons = tuple(
        f"rejected: {o.error}" if o.status == "rejected" else f"failed: {o.error}" if o.status == "failed" else o.finish_reason
        for o in outs
    )  # fmt: skip
    # One step per chunk, in time order (ties: sending order).
    chunk_req = np.concatenate([np.full(len(o.chunk_s), i, np.int64) for i, o in enumerate(outs)] or [np.zeros(0, np.int64)])
    chunk_t = np.concatenate([np.asarray(o.chunk_s, np.float64) for o in outs] or [np.zeros(0)])
    chunk_n = np.concatenate([np.asarray(o.chunk_tokens, np.int64) for o in outs] or [np.zeros(0, np.int64)])
    by_time = np.argsort(chunk_t, kind="stable")
    chunk_req, chunk_t, chunk_n = chunk_req[by_time], chunk_t[by_time], chunk_n[by_time]
    first = np.array([o.chunk_s[0] if o.chunk_s else np.inf for o in outs], np.float64)
    ended = np.array([o.end_s if o.end_s is not None else (o.chunk_s[-1] if o.chunk_s else o.sent_s) for o in outs])
    first = np.minimum(first, ended)  # no token: the request never ran
    waiting = _count_between(arrival, first, chunk_t)
    running = _count_between(first, ended, chunk_t)
    zeros_f, zeros_i = np.zeros(len(chunk_t)), np.zeros(len(chunk_t), np.int64)
    return FrozenLog(
        requests=tuple(RequestInfo(r.request_id, r.client_id, float(a), r.prompt_len, r.max_tokens) for r, a in zip(reqs, arrival)),
        arrival_s=arrival,
        prompt_len=np.array([r.prompt_len for r in reqs], np.int64),
        client_id=np.array([r.client_id for r in reqs], object),
        finish_reason=reasons,
        rejected=rejected,
        first_scheduled_s=np.full(n, np.nan),
        finish_s=finish,
        preemptions=np.zeros(n, np.int64),
        rewaits=np.zeros((0, 3)),
        token_req=np.repeat(chunk_req, chunk_n),
        token_time_s=np.repeat(chunk_t, chunk_n),
        step_end_s=chunk_t,
        step_duration_s=zeros_f,
        step_energy_j=zeros_f,
        step_tokens=chunk_n,
        step_prefill_tokens=zeros_i,
        step_seqs=np.ones(len(chunk_t), np.int64),
        step_waiting=waiting,
        step_running=running,
        step_kv_usage=np.full(len(chunk_t), np.nan),
        step_replica=zeros_i,
        retries=np.zeros(n, np.int64),
        failed=failed,
        lost_tokens=0,
    )


def _count_between(start: np.ndarray, end: np.ndarray, at: np.ndarray) -> np.ndarray:
    """How many intervals ``[start, end)`` hold each time in ``at``."""
    begun = np.searchsorted(np.sort(start), at, side="right")
    over = np.searchsorted(np.sort(end), at, side="right")
    return (begun - over).astype(np.int64)


def summarize_client(log: FrozenLog, *, slo_ttft_s=None, slo_tpot_s=None) -> dict:
    """``metrics.summarize`` of a replay's log with the ``UNOBSERVED`` keys None and explained: the
    same keys as the simulator's and the engine's metrics.json."""
    metrics = summarize(log, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s, unmodelled=UNOBSERVED)
    metrics["unavailable"]["queueing_s"] = QUEUEING_NOT_SEEN  # a distribution of Nones, as for any empty one
    return metrics
