"""The vectorised metrics equal straightforward per-token Python loops, bit for bit, on random logs
(the summary's JSON, the CSV and the plots of a run must not change with the faster code)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from jaxserve import metrics
from jaxserve.metrics import (
    RequestMetrics,
    _plain,
    distribution,
    request_energy_j,
    request_metrics,
    sorted_percentiles,
)
from jaxserve.runtime.events import FrozenLog, RequestInfo


@st.composite
def random_logs(draw):
    """A FrozenLog of n requests and random steps: each step ends at a time (ends may repeat, as
    replicas' steps do) and gives a token to a random subset of the requests. ``time_order=False``
    shuffles the tokens (a log not in time order, which the metrics must sort themselves)."""
    n = draw(st.integers(1, 12))
    num_steps = draw(st.integers(0, 25))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ends = np.sort(rng.choice(np.round(rng.uniform(0, 10, num_steps), 1), num_steps)) if num_steps else np.zeros(0)
    rows = [np.flatnonzero(rng.random(n) < 0.6) for _ in range(num_steps)]
    token_req = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    token_time = np.repeat(ends, [len(r) for r in rows])
    if not draw(st.booleans()):  # not in time order
        perm = rng.permutation(len(token_req))
        token_req, token_time = token_req[perm], token_time[perm]
    finish = np.where(rng.random(n) < 0.8, 10.0 + rng.uniform(0, 5, n), np.nan)
    step = lambda dtype, high: rng.integers(0, high, num_steps).astype(dtype)  # noqa: E731
    return FrozenLog(
        requests=tuple(RequestInfo(f"r{i}", "c", 0.0, 1, 8) for i in range(n)),
        arrival_s=rng.uniform(0, 2, n), prompt_len=rng.integers(1, 50, n), client_id=np.array(["c"] * n, object),
        finish_reason=tuple("stop" for _ in range(n)), rejected=np.zeros(n, bool), first_scheduled_s=rng.uniform(2, 3, n),
        finish_s=finish, preemptions=np.zeros(n, np.int64), rewaits=np.zeros((0, 3)), token_req=token_req.astype(np.int64),
        token_time_s=token_time, step_end_s=ends, step_duration_s=rng.uniform(0.01, 1, num_steps),
        step_energy_j=rng.uniform(0, 100, num_steps), step_tokens=step(np.int64, 300), step_prefill_tokens=step(np.int64, 9),
        step_seqs=step(np.int64, 9), step_waiting=step(np.int64, 9), step_running=step(np.int64, 9),
        step_kv_usage=rng.uniform(0, 1, num_steps), step_replica=np.zeros(num_steps, np.int64),
        retries=np.zeros(n, np.int64), failed=np.zeros(n, bool), lost_tokens=0,
    )  # fmt: skip


def tokens_by_request(log) -> list[list[tuple[float, int]]]:
    """Per request, its (time, log position) pairs in time order (log order among equal times)."""
    out = [[] for _ in range(log.num_requests)]
    for k, (r, t) in enumerate(zip(log.token_req.tolist(), log.token_time_s.tolist())):
        out[r].append((t, k))
    return [sorted(tokens) for tokens in out]


@settings(max_examples=200, deadline=None)
@given(random_logs(), st.sampled_from([1, 2, 5, 1 << 16]))
def test_per_request_metrics_equal_a_per_token_loop(log, chunk):
    saved, metrics._GAP_CHUNK = metrics._GAP_CHUNK, chunk  # the gaps are computed slice by slice
    try:
        rm = request_metrics(log)
    finally:
        metrics._GAP_CHUNK = saved
    per = tokens_by_request(log)
    tbt, tbt_req = [], []
    first, last, max_tbt = (np.full(log.num_requests, np.nan) for _ in range(3))
    for i, tokens in enumerate(per):
        times = [t for t, _ in tokens]
        if times:
            first[i], last[i] = times[0], times[-1]
        gaps = [b - a for a, b in zip(times, times[1:])]
        if gaps:
            max_tbt[i] = max(gaps)
        tbt += gaps
        tbt_req += [i] * len(gaps)
    np.testing.assert_array_equal(rm.num_output, [len(p) for p in per])
    np.testing.assert_array_equal(rm.ttft_s, first - log.arrival_s)
    np.testing.assert_array_equal(rm.max_tbt_s, max_tbt)
    np.testing.assert_array_equal(rm.tbt_s, np.array(tbt, np.float64))  # same values, same order: same mean
    np.testing.assert_array_equal(rm.tbt_req, np.array(tbt_req, np.int64))
    finished = ~np.isnan(log.finish_s)
    multi = finished & (rm.num_output > 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_array_equal(rm.tpot_s[multi], ((last - first) / (rm.num_output - 1))[multi])
    np.testing.assert_array_equal(rm.sorted_tbt(), np.sort(np.array(tbt, np.float64)))


@settings(max_examples=200, deadline=None)
@given(random_logs())
def test_request_energy_equals_a_per_token_loop(log):
    """Each request's decode tokens charged one token's worth of their step, added in log order;
    the rest pooled over the requests that got a first token, by prompt length."""
    n = log.num_requests
    ends = sorted(set(log.step_end_s.tolist()))
    energy = {e: 0.0 for e in ends}
    tokens = {e: 0.0 for e in ends}
    for e, j, k in zip(log.step_end_s.tolist(), log.step_energy_j.tolist(), log.step_tokens.tolist()):
        energy[e] += j
        tokens[e] += k
    firsts = {tokens_[0][1] for tokens_ in tokens_by_request(log) if tokens_}
    out, charged = [0.0] * n, []
    for k, (r, t) in enumerate(zip(log.token_req.tolist(), log.token_time_s.tolist())):
        if k not in firsts:
            share = energy[t] / tokens[t] if tokens[t] > 0 else 0.0
            out[r] += share
            charged.append(share)
    expected = np.array(out)
    weight = np.zeros(n)
    heads = log.token_req[sorted(firsts)]
    weight[heads] = log.prompt_len[heads]
    if len(ends) and weight.sum() > 0:
        pool = float(np.array(list(energy.values()), np.float64).sum()) - float(np.array(charged, np.float64).sum())
        expected += pool * weight / weight.sum()
    np.testing.assert_array_equal(request_energy_j(log), expected)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 1e4), min_size=1, max_size=300), st.lists(st.floats(0, 100), min_size=1, max_size=5))
def test_sorted_percentiles_are_numpys(values, qs):
    ascending = np.sort(np.array(values))
    np.testing.assert_array_equal(sorted_percentiles(ascending, qs), np.percentile(ascending, qs))
    np.testing.assert_array_equal(sorted_percentiles(ascending, [50, 90, 99]), np.percentile(values, [50, 90, 99]))


def test_distribution_reads_percentiles_off_the_sorted_values():
    values = np.array([3.0, np.nan, 1.0, 2.0, 10.0])
    assert distribution(values, np.array([1.0, 2.0, 3.0, 10.0])) == distribution(values)
    assert distribution(values)["p50"] == 2.5


@settings(max_examples=50, deadline=None)
@given(random_logs())
def test_rows_are_the_plain_columns(log):
    rm = request_metrics(log)
    rows = rm.rows()
    names = [name for name in RequestMetrics.__dataclass_fields__ if name != "tbt_s"]
    assert [list(row) for row in rows] == [names] * log.num_requests
    for i, row in enumerate(rows):
        for name in names:
            want = _plain(getattr(rm, name)[i])
            got = row[name]
            assert type(got) is type(want) and (got == want or (got != got and want != want)), (name, got, want)
