"""Serving metrics computed from an event log (the simulator's or the engine's).

Per request: TTFT, every inter-token gap (TBT), TPOT, E2E latency, normalized latency (E2E / output
tokens, vLLM's metric), queueing delay, preemptions, energy (``request_energy_j``: its share of the
steps that served it). Aggregates: mean/p50/p90/p99, throughput, SLO attainment, energy per token
and per request, average power, cost per hour and per million tokens. Searches: capacity (Sarathi-Serve: the
highest request rate whose P99 TBT meets an SLO) and goodput (DistServe: the highest rate at which
at least 90 % of requests meet both TTFT and TPOT SLOs). Fairness: VTC's largest service gap between
two clients over an interval in which both stayed backlogged.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple, Optional

import numpy as np

from jaxserve.runtime.events import FrozenLog

PERCENTILES = (("p50", 50), ("p90", 90), ("p99", 99))


def distribution(values: np.ndarray, ascending: Optional[np.ndarray] = None) -> dict:
    """mean, p50, p90, p99 of ``values`` (NaN when empty), as plain floats. ``ascending``: the same
    values sorted, NaN dropped, when the caller has them (the percentiles read them instead of
    partitioning ``values``; the mean still sums ``values`` in their order, for the same bits)."""
    values = np.asarray(values, np.float64)
    nan = np.isnan(values)
    if nan.any():  # no copy of a column without NaN (the pooled gaps: millions)
        values = values[~nan]
    if not len(values):
        return {"mean": math.nan, **{k: math.nan for k, _ in PERCENTILES}}
    out = {"mean": float(values.mean())}
    qs = [q for _, q in PERCENTILES]
    ranked = np.percentile(values, qs) if ascending is None else sorted_percentiles(ascending, qs)
    out.update({k: float(v) for (k, _), v in zip(PERCENTILES, ranked)})
    return out


def sorted_percentiles(ascending: np.ndarray, qs) -> np.ndarray:
    """``np.percentile(ascending, qs)`` (its default, linear method) of values already ascending and
    without NaN, read off the two ranks around each quantile instead of copying and partitioning
    them all: numpy's own arithmetic, step for step, so the same bits (tests compare the two)."""
    q = np.true_divide(np.asarray(qs, np.float64), 100)
    n = len(ascending)
    virtual = (n - 1) * q
    previous = np.floor(virtual)
    following = previous + 1
    last = virtual >= n - 1  # at or past the top rank: the largest value
    previous[last] = -1
    following[last] = -1
    previous, following = previous.astype(np.intp), following.astype(np.intp)
    a, b = ascending[previous], ascending[following]
    t = np.asarray(virtual - previous, np.float64)
    diff = b - a
    out = np.add(a, diff * t)
    np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5)
    return out


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """Per-request columns (index = request index in the log); NaN where undefined."""

    request_id: tuple[str, ...]
    client_id: np.ndarray
    arrival_s: np.ndarray
    prompt_len: np.ndarray
    num_output: np.ndarray
    finished: np.ndarray  # bool
    rejected: np.ndarray  # bool
    finish_reason: tuple[str, ...]  # "stop" | "length" | "rejected: <why>" | "unfinished"
    ttft_s: np.ndarray
    e2e_s: np.ndarray
    tpot_s: np.ndarray  # (finish - first token) / (output tokens - 1)
    normalized_latency_s: np.ndarray  # E2E / output tokens
    queueing_s: np.ndarray  # first scheduled - arrival
    max_tbt_s: np.ndarray
    preemptions: np.ndarray
    tbt_s: np.ndarray  # every inter-token gap of every request, pooled, by request then time

    @property
    def tbt_req(self) -> np.ndarray:
        """The request index of each gap in ``tbt_s`` (a request with k tokens has k - 1 gaps)."""
        return np.repeat(np.arange(len(self.num_output)), np.maximum(np.asarray(self.num_output, np.int64) - 1, 0))

    def sorted_tbt(self) -> np.ndarray:
        """``tbt_s`` ascending, NaN dropped (read-only); sorted once, for the summary's percentiles
        and the CDF plot."""
        cached = self.__dict__.get("_sorted_tbt")
        if cached is None:
            cached = np.sort(np.asarray(self.tbt_s, np.float64))
            if len(cached) and np.isnan(cached[-1]):  # NaNs sort last
                cached = cached[: len(cached) - int(np.count_nonzero(np.isnan(cached)))]
            cached.flags.writeable = False
            object.__setattr__(self, "_sorted_tbt", cached)  # frozen: a private cache
        return cached

    def rows(self) -> list[dict]:
        """One dict per request (for CSV), values as plain Python numbers, bools and strings."""
        cols = [f.name for f in dataclasses.fields(self) if f.name != "tbt_s"]
        values = [_plain_column(getattr(self, c)) for c in cols]
        return [dict(zip(cols, row)) for row in zip(*values)]


def _plain_column(column) -> list:
    """``column`` as a list of plain Python values (``_plain`` of each), column at a time."""
    if isinstance(column, np.ndarray) and column.dtype.kind in "biuf":
        return column.tolist()  # numpy bool/int/float -> bool/int/float, as _plain does
    values = column.tolist() if isinstance(column, np.ndarray) else list(column)
    if all(isinstance(x, str) for x in values):  # ids and reasons: _plain keeps strings as they are
        return values
    return [_plain(x) for x in values]


def _plain(x):
    if isinstance(x, (np.floating, float)):
        return float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def request_metrics(log: FrozenLog) -> RequestMetrics:
    """The per-request metrics of ``log``. Computed once per log and kept on it (a run's summary,
    CSV and plots all read them); the arrays computed here are read-only."""
    cached = log.__dict__.get("_request_metrics")
    if cached is None:
        cached = _request_metrics(log)
        shared = {id(v) for v in vars(log).values()}
        for f in dataclasses.fields(cached):
            value = getattr(cached, f.name)
            if isinstance(value, np.ndarray) and id(value) not in shared:  # the log's own stay as they are
                value.flags.writeable = False
        object.__setattr__(log, "_request_metrics", cached)  # FrozenLog is frozen; a private cache
    return cached


class _TokenGroups(NamedTuple):
    """The log's tokens grouped by request, in the order that sorts them by request, then time
    (then log order), as ``FrozenLog.request_token_order``: request ``i``'s ``counts[i]`` tokens sit
    at ``starts[i]:starts[i + 1]`` of it (``starts`` has n + 1 entries); ``firsts``: the log index
    of each request's earliest token, for the requests that got one, by request index."""

    counts: np.ndarray
    starts: np.ndarray
    firsts: np.ndarray


_GAP_CHUNK = 1 << 16  # tokens per slice of the gap computation: its temporaries stay in cache


def _group_tokens(log: FrozenLog, times_too: bool) -> tuple[_TokenGroups, Optional[np.ndarray]]:
    """(``_TokenGroups`` of ``log``, its token times in that order when ``times_too``). The groups
    are computed once per log and kept on it; the permutation itself is not (it is as large as
    the log's tokens, and a run's first pass pays for every fresh page it touches)."""
    groups = log.__dict__.get("_metrics_token_groups")
    if groups is not None and not times_too:
        return groups, None
    req, times = log.token_req, log.token_time_s
    if len(times) > 1 and not np.all(times[1:] >= times[:-1]):
        order = np.lexsort((times, req))
    else:  # time order (freeze's): a stable sort by request alone; 16-bit keys sort by radix, O(tokens)
        order = np.argsort(req.astype(np.uint16) if log.num_requests <= 1 << 16 else req, kind="stable")
    if groups is None:
        counts = np.bincount(req, minlength=log.num_requests)
        starts = np.zeros(log.num_requests + 1, np.int64)
        np.cumsum(counts, out=starts[1:])
        groups = _TokenGroups(counts, starts, order[starts[:-1][counts > 0]])
        object.__setattr__(log, "_metrics_token_groups", groups)  # FrozenLog is frozen; a private cache
    return groups, times[order] if times_too else None


def _gaps_within_groups(times: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The differences of consecutive ``times`` inside each group ``starts[i]:starts[i + 1]``, in
    order (``np.diff(times)`` without the differences across groups), computed slice by slice so
    that those across groups are never held in memory."""
    total = len(times)
    keep = np.ones(max(total - 1, 0), bool)
    cuts = starts[1:-1]
    keep[cuts[(cuts > 0) & (cuts < total)] - 1] = False  # difference k straddles a group's start at k + 1
    out = np.empty(int(np.count_nonzero(keep)))
    done = 0
    for a in range(0, total - 1, _GAP_CHUNK):
        b = min(a + _GAP_CHUNK, total - 1)
        mask = keep[a:b]
        k = int(np.count_nonzero(mask))
        out[done : done + k] = (times[a + 1 : b + 1] - times[a:b])[mask]
        done += k
    return out


def _request_metrics(log: FrozenLog) -> RequestMetrics:
    n = log.num_requests
    (num_output, starts, _), times = _group_tokens(log, times_too=True)  # times by request, then time
    has = num_output > 0
    first = np.full(n, np.nan)
    last = np.full(n, np.nan)
    first[has] = times[starts[:-1][has]]
    last[has] = times[starts[1:][has] - 1]
    tbt = _gaps_within_groups(times, starts)
    del times
    num_gaps = np.maximum(num_output - 1, 0)
    max_tbt = np.full(n, np.nan)
    if len(tbt):  # gaps are grouped by request: one reduceat, not a slow ufunc.at
        several = num_gaps > 0
        max_tbt[several] = np.maximum.reduceat(tbt, (np.cumsum(num_gaps) - num_gaps)[several])
    finished = ~np.isnan(log.finish_s)
    with np.errstate(invalid="ignore", divide="ignore"):
        e2e = np.where(finished, log.finish_s - log.arrival_s, np.nan)
        tpot = np.where(finished & (num_output > 1), (last - first) / (num_output - 1), np.nan)
        normalized = np.where(finished, e2e / np.maximum(num_output, 1), np.nan)
    return RequestMetrics(
        request_id=tuple(r.request_id for r in log.requests),
        client_id=log.client_id,
        arrival_s=log.arrival_s,
        prompt_len=log.prompt_len,
        num_output=num_output,
        finished=finished,
        rejected=log.rejected,
        finish_reason=log.finish_reason,
        ttft_s=first - log.arrival_s,
        e2e_s=e2e,
        tpot_s=tpot,
        normalized_latency_s=normalized,
        queueing_s=log.first_scheduled_s - log.arrival_s,
        max_tbt_s=max_tbt,
        preemptions=log.preemptions,
        tbt_s=tbt,
    )


def slo_met(rm: RequestMetrics, ttft_s: Optional[float], tpot_s: Optional[float]) -> np.ndarray:
    """Per request: finished and within both targets (a missing target always holds)."""
    ok = rm.finished.copy()
    if ttft_s is not None:
        ok &= rm.ttft_s <= ttft_s
    if tpot_s is not None:
        ok &= np.nan_to_num(rm.tpot_s, nan=0.0) <= tpot_s
    return ok


def summarize(
    log: FrozenLog,
    *,
    slo_ttft_s: Optional[float] = None,
    slo_tpot_s: Optional[float] = None,
    price_per_hour_usd: Optional[float] = None,
    unmodelled: Optional[Mapping[str, str]] = None,
    idle_power_w: Optional[float | Mapping[int, float]] = None,
) -> dict:
    """The metrics.json dictionary (DESIGN.md keys plus counts, energy and cost where modelled).

    A metric the run has no data for is ``None`` (in JSON ``null``), never NaN or a number computed
    from nothing, and ``unavailable[key]`` says why; ``slo_attainment`` is ``None`` when no SLO is
    set. ``rejections`` counts rejected requests by reason (numbers and ids masked, so requests
    rejected for the same cause group together). ``unmodelled`` maps keys the executor cannot give
    (energy, cost) to why: they are ``None`` with that reason; when ``energy_j`` is one of them, so
    are the other energy keys. ``idle_power_w``: watts a replica draws while it runs no step (a
    float for every replica that ran a step, or replica index -> watts), for ``energy_idle_j``,
    ``energy_total_j`` and ``avg_power_w``; ``energy_j`` counts the steps only."""
    rm = request_metrics(log)
    unmodelled = dict(unmodelled or {})
    energy = float(log.step_energy_j.sum())
    # Before the sorted gaps exist: its temporaries, each as large as the log's tokens, then reuse
    # memory the sort takes next instead of touching fresh pages (a first pass pays for each).
    request_energy = request_energy_j(log) if energy > 0 and "energy_j" not in unmodelled else None
    admitted = ~rm.rejected
    start = float(log.arrival_s[admitted].min()) if admitted.any() else 0.0
    end = float(np.nanmax(log.finish_s)) if rm.finished.any() else start
    makespan = max(end - start, 1e-12)
    out_tokens = int(rm.num_output[rm.finished].sum())
    busy = float(log.step_duration_s.sum())
    num_replicas = max(1, len(np.unique(log.step_replica)))  # busy_fraction is per replica that ran
    unavailable: dict[str, str] = {}

    def dist(key: str, values: np.ndarray, why: str, ascending: Optional[np.ndarray] = None) -> dict:
        d = distribution(values, ascending)
        if math.isnan(d["mean"]):
            unavailable[key] = why
            return {k: None for k in d}
        return d

    def scalar(key: str, value: Optional[float], why: str) -> Optional[float]:
        if value is None:
            unavailable[key] = why
        return value

    none_finished = "no request finished"
    metrics = {
        "num_requests": int(log.num_requests),
        "num_admitted": int(admitted.sum()),
        "num_rejected": int(rm.rejected.sum()),
        "num_finished": int(rm.finished.sum()),
        "num_steps": int(len(log.step_end_s)),
        "makespan_s": scalar("makespan_s", end - start if rm.finished.any() else None, none_finished),
        "ttft_s": dist("ttft_s", rm.ttft_s[admitted], "no admitted request produced a token"),
        "tbt_s": dist("tbt_s", rm.tbt_s, "no request produced two tokens", rm.sorted_tbt()),
        "tpot_s": dist("tpot_s", rm.tpot_s[admitted], "no finished request produced two tokens"),
        "e2e_s": dist("e2e_s", rm.e2e_s[admitted], none_finished),
        "normalized_latency_s": dist("normalized_latency_s", rm.normalized_latency_s[admitted], none_finished),
        "queueing_s": dist("queueing_s", rm.queueing_s[admitted], "no admitted request was scheduled"),
        "throughput_req_s": scalar("throughput_req_s", float(rm.finished.sum() / makespan) if rm.finished.any() else None, none_finished),
        "throughput_tok_s": scalar("throughput_tok_s", float(out_tokens / makespan) if rm.finished.any() else None, none_finished),
        "slo_attainment": None,
        "num_preemptions": int(log.preemptions.sum()),
        "busy_fraction": float(min(busy / makespan / num_replicas, 1.0)) if rm.finished.any() else None,
        "mean_batch_tokens": float(log.step_tokens.mean()) if len(log.step_tokens) else 0.0,
        "peak_kv_usage": float(log.step_kv_usage.max()) if len(log.step_kv_usage) else 0.0,
        "rejections": rejection_counts(log),
        "num_retried": int((log.retries > 0).sum()),
        "num_failed": int(log.failed.sum()),
        "lost_tokens": int(log.lost_tokens),
        "failures": failure_counts(log),
    }
    if metrics["busy_fraction"] is None:
        unavailable["busy_fraction"] = none_finished
    if slo_ttft_s is None and slo_tpot_s is None:
        unavailable["slo_attainment"] = "no SLO set (slo.ttft_s, slo.tpot_s)"
    elif not admitted.any():
        unavailable["slo_attainment"] = "no request was admitted"
    else:
        metrics["slo_attainment"] = float(slo_met(rm, slo_ttft_s, slo_tpot_s)[admitted].mean())
    if len(set(log.client_id.tolist())) > 1 and len(log.step_end_s):
        trace = service_trace(log)
        metrics["fairness_max_service_diff"] = max_service_difference(trace)
        metrics["clients"] = client_metrics(log, rm, trace)
    no_tokens = "no finished request produced a token"
    if energy > 0:
        metrics["energy_j"] = energy
        metrics["energy_j_per_token"] = scalar("energy_j_per_token", energy / out_tokens if out_tokens else None, no_tokens)
    if price_per_hour_usd is not None:
        cost = price_per_hour_usd * makespan / 3600.0 / out_tokens * 1e6 if out_tokens else None
        metrics["cost_usd_per_mtok"] = scalar("cost_usd_per_mtok", cost, no_tokens)
    metrics["cost_usd_per_hour"] = scalar("cost_usd_per_hour", price_per_hour_usd, "the machine has no known price")
    if request_energy is not None:
        metrics["energy_per_request_j"] = dist("energy_per_request_j", request_energy[rm.finished], none_finished)
        idle = idle_energy_j(log, makespan, idle_power_w) if rm.finished.any() else None
        why_idle = none_finished if idle_power_w is not None else "idle power not given"
        metrics["energy_idle_j"] = scalar("energy_idle_j", idle, why_idle)
        metrics["energy_total_j"] = scalar("energy_total_j", None if idle is None else energy + idle, why_idle)
        metrics["avg_power_w"] = scalar("avg_power_w", None if idle is None else (energy + idle) / makespan, why_idle)
    else:
        why = unmodelled.get("energy_j", "no step recorded energy")
        unmodelled.update({key: why for key in ENERGY_KEYS})
    for key, why in unmodelled.items():
        metrics[key] = None
        unavailable[key] = why
    metrics["unavailable"] = unavailable
    return metrics


ENERGY_KEYS = ("energy_per_request_j", "energy_idle_j", "energy_total_j", "avg_power_w")


def request_energy_j(log: FrozenLog) -> np.ndarray:
    """Each request's share of the steps' energy, joules (index = request index; they sum to the
    steps' energy when some request got its first token). The log records which requests got a token
    at each step, not every row's tokens, so the rule is: a step's energy is split evenly over the
    tokens it processed; each decode token a request received (any token after its first) is charged
    one token's worth of its step; the rest of every step (its prefill tokens, recomputations
    included) is pooled and charged to the requests that got a first token, in proportion to their
    prompt lengths. Steps that end at the same instant (replicas of a cluster) count as one."""
    n = log.num_requests
    out = np.zeros(n)
    if not len(log.step_end_s):
        return out
    ends, group = np.unique(log.step_end_s, return_inverse=True)
    energy = np.bincount(group, log.step_energy_j, len(ends))
    tokens = np.bincount(group, log.step_tokens.astype(np.float64), len(ends))
    per_token = np.divide(energy, tokens, out=np.zeros_like(energy), where=tokens > 0)
    req = log.token_req
    firsts = _group_tokens(log, times_too=False)[0].firsts  # each request's earliest token
    # A token's share of its step's energy; a request's first token is charged through the pool
    # below instead: zero here, which leaves the per-request sums as if it were left out.
    share = _per_token(ends, log.token_time_s, per_token)
    share[firsts] = 0.0
    out += np.bincount(req, share, n)
    later = np.ones(len(share), bool)
    later[firsts] = False
    charged = float(share[later].sum())  # the same values in the same order as before: the same sum
    weight = np.zeros(n)
    heads = req[firsts]
    weight[heads] = log.prompt_len[heads]
    if weight.sum() > 0:
        out += (float(energy.sum()) - charged) * weight / weight.sum()
    return out


def _per_token(ends: np.ndarray, times: np.ndarray, per_step: np.ndarray) -> np.ndarray:
    """``per_step[k]`` for each token time equal to ``ends[k]`` (``ends`` sorted and distinct): one
    search per distinct time when the tokens are in time order (a log's are), else one per token."""
    if len(times) < 2 or not np.all(times[1:] >= times[:-1]):
        return per_step[np.searchsorted(ends, times)]
    heads = np.flatnonzero(np.concatenate(([True], times[1:] != times[:-1])))
    return np.repeat(per_step[np.searchsorted(ends, times[heads])], np.diff(np.append(heads, len(times))))


def idle_energy_j(log: FrozenLog, makespan: float, idle_power_w: Optional[float | Mapping[int, float]]) -> Optional[float]:
    """Joules replicas draw between steps over ``makespan``: idle watts times the part of it each ran
    no step; ``idle_power_w`` as ``summarize`` takes it (None: None)."""
    if idle_power_w is None:
        return None
    if not isinstance(idle_power_w, Mapping):
        idle_power_w = {int(r): idle_power_w for r in np.unique(log.step_replica)}
    busy = {r: float(log.step_duration_s[log.step_replica == r].sum()) for r in idle_power_w}
    return float(sum(w * max(makespan - busy[r], 0.0) for r, w in idle_power_w.items()))


def client_metrics(log: FrozenLog, rm, trace: "ServiceTrace") -> dict[str, dict]:
    """Per client: requests, finished, service received by the end (``service_trace``'s weights)
    and median TTFT / E2E latency of its admitted requests (None when it has none)."""
    out = {}
    for c, name in enumerate(trace.clients):
        mine = log.client_id == name
        admitted = mine & ~rm.rejected

        def median(values):
            v = values[admitted]
            v = v[~np.isnan(v)]
            return float(np.median(v)) if len(v) else None

        out[name] = {
            "num_requests": int(mine.sum()),
            "num_finished": int((mine & rm.finished).sum()),
            "service": float(trace.service[c, -1]),
            "ttft_p50_s": median(rm.ttft_s),
            "e2e_p50_s": median(rm.e2e_s),
        }
    return out


def rejection_reason_kind(reason: str) -> str:
    """A rejection reason with its numbers and quoted ids masked: the cause, not the instance."""
    return re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?", "N", re.sub(r"'[^']*'", "'…'", reason))


def _reason_counts(log: FrozenLog, prefix: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in log.finish_reason:
        if reason.startswith(prefix):
            kind = rejection_reason_kind(reason[len(prefix):])
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def rejection_counts(log: FrozenLog) -> dict[str, int]:
    """Rejected requests per ``rejection_reason_kind``, most common first."""
    return _reason_counts(log, "rejected: ")


def failure_counts(log: FrozenLog) -> dict[str, int]:
    """Requests a cluster could not serve (every replica able to take them gone), by reason."""
    return _reason_counts(log, "failed: ")


# -- searches ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RateSearch:
    """Result of a max-rate search: the best passing rate and every rate tried."""

    rate: float
    tried: tuple[tuple[float, bool], ...]


def search_max_rate(
    passes: Callable[[float], bool],
    low: float,
    high: float,
    *,
    rel_tol: float = 0.02,
    max_iters: int = 30,
) -> RateSearch:
    """The largest rate in [low, high] for which ``passes`` holds, assuming it is monotone
    (passes at low rates, fails at high ones). Returns ``low`` when even ``low`` fails (tried
    records it) and ``high`` when ``high`` passes."""
    if not 0 < low < high:
        raise ValueError(f"search_max_rate needs 0 < low < high, got {low}, {high}")
    tried = []

    def check(rate):
        ok = bool(passes(rate))
        tried.append((rate, ok))
        return ok

    if not check(low):
        return RateSearch(low, tuple(tried))
    if check(high):
        return RateSearch(high, tuple(tried))
    lo, hi = low, high
    for _ in range(max_iters):
        if hi - lo <= rel_tol * lo:
            break
        mid = math.sqrt(lo * hi) if hi / lo > 4 else (lo + hi) / 2
        if check(mid):
            lo = mid
        else:
            hi = mid
    return RateSearch(lo, tuple(tried))


def capacity(
    evaluate: Callable[[float], dict],
    p99_tbt_slo_s: float,
    low: float,
    high: float,
    *,
    max_median_queueing_s: Optional[float] = None,
    **kw,
) -> RateSearch:
    """Sarathi-Serve capacity: the highest request rate whose P99 TBT stays under the SLO and, when
    ``max_median_queueing_s`` is given, whose median scheduling delay stays bounded (without that
    bound a chunked-prefill scheduler keeps its TBT tail low at any load while its queue grows).
    ``evaluate(rate)`` returns a metrics dict (``summarize`` output)."""

    def passes(rate):
        m = evaluate(rate)
        ok = m["tbt_s"]["p99"] <= p99_tbt_slo_s
        if max_median_queueing_s is not None:
            ok = ok and m["queueing_s"]["p50"] <= max_median_queueing_s
        return ok

    return search_max_rate(passes, low, high, **kw)


def goodput(evaluate: Callable[[float], dict], low: float, high: float, attainment: float = 0.9, **kw) -> RateSearch:
    """DistServe goodput: the highest request rate at which at least ``attainment`` of requests
    meet both SLOs (``evaluate(rate)["slo_attainment"]``)."""
    return search_max_rate(lambda r: evaluate(r)["slo_attainment"] >= attainment, low, high, **kw)


# -- fairness ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServiceTrace:
    """Service each client received up to each step end: ``service[c, i]`` for ``clients[c]`` at
    ``times[i]``, counting w_p per prompt token (when the request is first scheduled) and w_q per
    generated token; ``backlogged[c, i]``: the client had a request waiting (arrived and not yet
    scheduled, or preempted and not yet resumed) at that moment."""

    clients: tuple[str, ...]
    times: np.ndarray
    service: np.ndarray
    backlogged: np.ndarray


def service_trace(log: FrozenLog, w_p: float = 1.0, w_q: float = 2.0) -> ServiceTrace:
    clients = tuple(sorted(set(log.client_id.tolist())))
    cid = np.searchsorted(np.array(clients, object), log.client_id)
    times = log.step_end_s
    n_steps = len(times)
    service = np.zeros((len(clients), n_steps))
    # generated tokens: one per (request, step) entry in time order
    step_of_token = np.searchsorted(times, log.token_time_s)
    np.add.at(service, (cid[log.token_req], step_of_token), w_q)
    # prompts: charged at the step that first scheduled the request (it ends at or after that start)
    started = ~np.isnan(log.first_scheduled_s)
    first_step = np.searchsorted(times, log.first_scheduled_s[started], side="right")
    first_step = np.minimum(first_step, n_steps - 1)
    np.add.at(service, (cid[started], first_step), w_p * log.prompt_len[started])
    service = np.cumsum(service, axis=1)
    backlogged = np.zeros((len(clients), n_steps), bool)
    waiting_from = log.arrival_s
    waiting_until = np.where(np.isnan(log.first_scheduled_s), np.inf, log.first_scheduled_s)
    re_req = log.rewaits[:, 0].astype(np.int64)
    for c in range(len(clients)):
        mine = (cid == c) & ~log.rejected
        again = cid[re_req] == c
        # backlogged at t: some request waits, between arrival and its first scheduling or
        # between a preemption and its next scheduling
        starts = np.sort(np.concatenate([waiting_from[mine], log.rewaits[again, 1]]))
        ends = np.sort(np.concatenate([waiting_until[mine], log.rewaits[again, 2]]))
        backlogged[c] = np.searchsorted(starts, times, side="right") > np.searchsorted(ends, times, side="right")
    return ServiceTrace(clients, times, service, backlogged)


def max_service_difference(trace: ServiceTrace) -> float:
    """VTC's fairness measure: the largest gap in service gained by two clients over any interval
    in which both stayed backlogged (0 with fewer than two clients)."""
    worst = 0.0
    for a in range(len(trace.clients)):
        for b in range(a + 1, len(trace.clients)):
            both = trace.backlogged[a] & trace.backlogged[b]
            diff = trace.service[a] - trace.service[b]
            # split into maximal runs of `both`; measure each run from its first step
            edges = np.flatnonzero(np.diff(np.concatenate([[False], both, [False]]).astype(np.int8)))
            for start, stop in zip(edges[::2], edges[1::2]):
                run = diff[start:stop] - diff[start]
                worst = max(worst, float(np.abs(run).max()))
    return worst
