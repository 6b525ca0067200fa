"""Metrics on hand-computed event logs, and the capacity / goodput searches on synthetic systems."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import jaxserve
from jaxserve.runtime.events import EventLog
from jaxserve.kv import KVConfig
from jaxserve.metrics import capacity, distribution, goodput, request_metrics, search_max_rate, summarize
from jaxserve.scheduler.driver import step_output
from jaxserve.scheduler.seq import FinishedRequest


def done(*ids, reason="length"):
    """What a step that finished ``ids`` passes the log."""
    return [FinishedRequest(rid, (), reason, 0) for rid in ids]


class FakeState:
    """The few state fields EventLog.step reads."""

    def __init__(self, waiting=0, running=0, usage=0.0):
        self.num_waiting, self.num_running = waiting, running
        self.kv = type("KV", (), {"usage": usage})()


def _plan(rows, step):
    """rows: (request_id, num_computed, num_new, samples)."""
    return jaxserve.BatchPlan(
        request_ids=tuple(r[0] for r in rows),
        num_computed_tokens=np.array([r[1] for r in rows], np.int64),
        num_new_tokens=np.array([r[2] for r in rows], np.int64),
        samples_token=np.array([r[3] for r in rows], bool),
        block_tables=tuple((0,) * 8 for _ in rows),
        token_ids=np.zeros(sum(r[2] for r in rows), np.int32),
        block_size=16,
        step=step,
    )


def hand_log():
    """a arrives at 0 (4-token prompt, 3 outputs); b arrives at 0.5 (2-token prompt, 2 outputs).

    step 0: [0, 1)    a prefill -> a token 1 at 1.0
    step 1: [1, 2)    a decode, b prefill -> a token 2 at 2.0, b token 1 at 2.0
    step 2: [2, 2.5)  a decode, b decode -> a token 3 at 2.5 (a done), b token 2 at 2.5 (b done)
    """
    log = EventLog()
    sp = jaxserve.SamplingParams
    a = jaxserve.Request("a", prompt_len=4, sampling=sp(3), arrival_time=0.0)
    b = jaxserve.Request("b", prompt_len=2, sampling=sp(2), arrival_time=0.5, client_id="other")
    log.add_request(a, 0.0)
    log.add_request(b, 0.5)
    log.step(_plan([("a", 0, 4, True)], 0), 0.0, 1.0, 10.0, FakeState(1, 1, 0.25), [])
    log.step(_plan([("a", 4, 1, True), ("b", 0, 2, True)], 1), 1.0, 1.0, 20.0, FakeState(0, 2, 0.5), [])
    log.step(_plan([("a", 5, 1, True), ("b", 2, 1, True)], 2), 2.0, 0.5, 5.0, FakeState(0, 0, 0.0), done("a", "b"))
    return log.freeze()


def test_request_metrics_by_hand():
    rm = request_metrics(hand_log())
    np.testing.assert_allclose(rm.ttft_s, [1.0, 1.5])
    np.testing.assert_allclose(rm.e2e_s, [2.5, 2.0])
    np.testing.assert_allclose(rm.tpot_s, [(2.5 - 1.0) / 2, (2.5 - 2.0) / 1])
    np.testing.assert_allclose(rm.normalized_latency_s, [2.5 / 3, 2.0 / 2])
    np.testing.assert_allclose(rm.queueing_s, [0.0, 0.5])
    np.testing.assert_array_equal(rm.num_output, [3, 2])
    np.testing.assert_allclose(sorted(rm.tbt_s), sorted([1.0, 0.5, 0.5]))
    np.testing.assert_allclose(rm.max_tbt_s, [1.0, 0.5])


def test_summary_by_hand():
    m = summarize(hand_log(), slo_ttft_s=1.2, slo_tpot_s=1.0, price_per_hour_usd=3.6)
    assert m["num_requests"] == 2 and m["num_finished"] == 2 and m["num_rejected"] == 0
    assert m["ttft_s"]["mean"] == pytest.approx(1.25)
    assert m["e2e_s"]["p50"] == pytest.approx(2.25)
    assert m["throughput_req_s"] == pytest.approx(2 / 2.5)
    assert m["throughput_tok_s"] == pytest.approx(5 / 2.5)
    assert m["slo_attainment"] == pytest.approx(0.5)  # b's TTFT 1.5 > 1.2
    assert m["energy_j_per_token"] == pytest.approx(35.0 / 5)
    assert m["cost_usd_per_mtok"] == pytest.approx(3.6 * 2.5 / 3600 / 5 * 1e6)
    assert m["peak_kv_usage"] == 0.5


def test_rejected_requests_are_counted_not_measured():
    log = EventLog()
    r = jaxserve.Request("x", prompt_len=9, sampling=jaxserve.SamplingParams(2))
    log.add_request(r, 0.0)
    log.reject("x", "too long")
    m = summarize(log.freeze())
    assert m["num_rejected"] == 1 and m["num_finished"] == 0 and m["ttft_s"]["mean"] is None
    assert m["rejections"] == {"too long": 1}
    assert m["unavailable"]["ttft_s"] == "no admitted request produced a token"
    assert m["throughput_tok_s"] is None and m["makespan_s"] is None
    assert request_metrics(log.freeze()).rows()[0]["finish_reason"] == "rejected: too long"


def test_event_log_from_a_real_scheduler_run():
    sched = jaxserve.scheduler.make("sarathi", chunk_size=8)
    state = sched.init(KVConfig(64, 4))
    log = EventLog()
    reqs = [jaxserve.Request(f"r{i}", prompt_len=10 + i, sampling=jaxserve.SamplingParams(4)) for i in range(3)]
    now = 0.0
    for r in reqs:
        log.add_request(r, now)
        state = sched.add_request(state, r, now)
    while state.has_unfinished:
        state, plan = sched.schedule(state, now)
        out = step_output(plan, lambda rid, i: 5, {})
        state = sched.update(state, plan, out, now + 0.1)
        log.step(plan, now, 0.1, 1.0, state, state.finished)
        now += 0.1
    rm = request_metrics(log.freeze())
    assert rm.finished.all() and (rm.num_output == 4).all()
    assert (rm.ttft_s > 0).all() and np.all(rm.e2e_s >= rm.ttft_s)


def test_distribution_ignores_nan():
    d = distribution(np.array([1.0, np.nan, 3.0]))
    assert d["mean"] == 2.0 and d["p50"] == 2.0


@pytest.mark.parametrize("true_capacity", [0.37, 3.0, 11.5, 80.0])
def test_search_finds_the_threshold_of_a_monotone_system(true_capacity):
    calls = []

    def passes(rate):
        calls.append(rate)
        return rate <= true_capacity

    found = search_max_rate(passes, 0.1, 100.0, rel_tol=0.01)
    assert found.rate <= true_capacity <= found.rate * 1.01 + 1e-9
    assert len(calls) < 30


def test_search_edges():
    assert search_max_rate(lambda r: False, 1.0, 10.0).rate == 1.0
    assert search_max_rate(lambda r: True, 1.0, 10.0).rate == 10.0
    with pytest.raises(ValueError, match="low < high"):
        search_max_rate(lambda r: True, 5.0, 1.0)


def test_capacity_and_goodput_on_a_queueing_model():
    # An M/M/1-like system: latency blows up as the rate approaches 10 req/s.
    def evaluate(rate):
        wait = 0.05 / max(1e-9, 1 - rate / 10.0)
        return {"tbt_s": {"p99": wait}, "slo_attainment": max(0.0, 1.0 - rate / 20.0), "queueing_s": {"p50": rate / 4}}

    cap = capacity(evaluate, p99_tbt_slo_s=0.1, low=0.5, high=9.99, rel_tol=0.001)
    assert cap.rate == pytest.approx(5.0, rel=0.01)  # 0.05 / (1 - r/10) <= 0.1  <=>  r <= 5
    bounded = capacity(evaluate, 0.1, 0.5, 9.99, max_median_queueing_s=0.75, rel_tol=0.001)
    assert bounded.rate == pytest.approx(3.0, rel=0.01)  # the queueing bound binds first
    gp = goodput(evaluate, low=0.1, high=19.0, rel_tol=0.001)
    assert gp.rate == pytest.approx(2.0, rel=0.01)  # 1 - r/20 >= 0.9  <=>  r <= 2


def test_service_trace_and_fairness_by_hand():
    from jaxserve.metrics import max_service_difference, service_trace

    log = EventLog()
    sp = jaxserve.SamplingParams
    reqs = [
        jaxserve.Request("a1", prompt_len=10, sampling=sp(3), client_id="A"),
        jaxserve.Request("a2", prompt_len=10, sampling=sp(3), client_id="A"),
        jaxserve.Request("b1", prompt_len=4, sampling=sp(3), client_id="B"),
        jaxserve.Request("b2", prompt_len=4, sampling=sp(3), client_id="B"),
    ]
    for r in reqs:
        log.add_request(r, 0.0)
    # step 0 serves a1's prefill; steps 1-2 decode a1; b1 and a2, b2 wait throughout
    log.step(_plan([("a1", 0, 10, True)], 0), 0.0, 1.0, 0.0, FakeState(3, 1), [])
    log.step(_plan([("a1", 10, 1, True)], 1), 1.0, 1.0, 0.0, FakeState(3, 1), [])
    log.step(_plan([("a1", 11, 1, True)], 2), 2.0, 1.0, 0.0, FakeState(3, 0), done("a1"))
    trace = service_trace(log.freeze(), w_p=1.0, w_q=2.0)
    assert trace.clients == ("A", "B")
    np.testing.assert_allclose(trace.service[0], [10 + 2, 14, 16])
    np.testing.assert_allclose(trace.service[1], [0, 0, 0])
    assert trace.backlogged.all()  # a2 and b1/b2 never got scheduled
    assert max_service_difference(trace) == 4.0  # measured from the first step of the window


def test_a_preempted_request_makes_its_client_backlogged_again():
    from jaxserve.metrics import service_trace

    log = EventLog()
    sp = jaxserve.SamplingParams
    log.add_request(jaxserve.Request("a", prompt_len=4, sampling=sp(5), client_id="A"), 0.0)
    log.add_request(jaxserve.Request("b", prompt_len=4, sampling=sp(5), client_id="B"), 0.0)
    plan = _plan([("a", 0, 4, True), ("b", 0, 4, True)], 0)
    log.step(plan, 0.0, 1.0, 0.0, FakeState(0, 2), [])
    preempting = dataclasses.replace(_plan([("a", 4, 1, True)], 1), preempted=("b",))
    log.step(preempting, 1.0, 1.0, 0.0, FakeState(1, 1), [])
    log.step(_plan([("a", 5, 1, True)], 2), 2.0, 1.0, 0.0, FakeState(1, 1), [])
    log.step(_plan([("b", 0, 5, True)], 3), 3.0, 1.0, 0.0, FakeState(0, 1), [])
    frozen = log.freeze()
    np.testing.assert_allclose(frozen.rewaits, [[1, 1.0, 3.0]])
    trace = service_trace(frozen)
    # step ends 1, 2, 3, 4: B waits from its preemption at 1.0 until it runs again at 3.0
    np.testing.assert_array_equal(trace.backlogged[1], [True, True, False, False])
    np.testing.assert_array_equal(trace.backlogged[0], [False, False, False, False])


def test_metrics_without_data_are_null_with_a_reason_never_nan_or_near_zero():
    """Everything rejected (a 1-block cache): no NaN anywhere, no cost computed from nothing,
    and no SLO set means no attainment."""
    log = EventLog()
    for i in range(3):
        r = jaxserve.Request(f"r{i}", prompt_len=40 + i, sampling=jaxserve.SamplingParams(2))
        log.add_request(r, float(i))
        log.reject(r.request_id, f"request 'r{i}': prompt + max_new_tokens = {42 + i} exceeds the KV cache (16 tokens)")
    m = summarize(log.freeze(), price_per_hour_usd=2.0)
    flat = [v for v in m.values() if isinstance(v, float)] + [x for v in m.values() if isinstance(v, dict) for x in v.values()
                                                               if isinstance(x, float)]  # fmt: skip
    assert not any(math.isnan(v) for v in flat)
    assert m["cost_usd_per_mtok"] is None and "no finished request" in m["unavailable"]["cost_usd_per_mtok"]
    assert m["slo_attainment"] is None and "no SLO set" in m["unavailable"]["slo_attainment"]
    assert m["rejections"] == {"request '…': prompt + max_new_tokens = N exceeds the KV cache (N tokens)": 3}


def test_finish_reasons_and_slo_attainment_only_with_an_slo():
    log = EventLog()
    for rid in ("a", "b"):
        log.add_request(jaxserve.Request(rid, prompt_len=4, sampling=jaxserve.SamplingParams(1)), 0.0)
    log.step(_plan([("a", 0, 4, True), ("b", 0, 4, True)], 0), 0.0, 1.0, 0.0, FakeState(0, 0), done("a") + done("b", reason="stop"))
    frozen = log.freeze()
    assert [row["finish_reason"] for row in request_metrics(frozen).rows()] == ["length", "stop"]
    assert summarize(frozen)["slo_attainment"] is None
    assert summarize(frozen, slo_ttft_s=0.5)["slo_attainment"] == 0.0
    assert summarize(frozen, slo_ttft_s=2.0)["slo_attainment"] == 1.0


# -- energy ------------------------------------------------------------------------------------------


def test_request_energy_by_hand():
    """hand_log: step 0 (10 J, a's 4-token prompt), step 1 (20 J: a's decode token, b's 2-token
    prompt), step 2 (5 J: a decode, b decode). Decode tokens pay one token's worth of their step
    (20/3, 5/2, 5/2); the rest, 10 + 40/3 J, goes by prompt length: a 4/6, b 2/6."""
    from jaxserve.metrics import request_energy_j

    energy = request_energy_j(hand_log())
    pool = 10 + 40 / 3
    np.testing.assert_allclose(energy, [20 / 3 + 2.5 + pool * 4 / 6, 2.5 + pool * 2 / 6])
    assert energy.sum() == pytest.approx(35.0)  # every joule of the steps goes to some request


def test_energy_summary_by_hand():
    m = summarize(hand_log(), price_per_hour_usd=3.6, idle_power_w=4.0)
    # one replica, makespan 2.5 s, busy 2.5 s: no idle time
    assert m["energy_idle_j"] == 0.0 and m["energy_total_j"] == 35.0 and m["avg_power_w"] == pytest.approx(35 / 2.5)
    assert m["cost_usd_per_hour"] == 3.6
    a, b = 20 / 3 + 2.5 + (10 + 40 / 3) * 4 / 6, 2.5 + (10 + 40 / 3) * 2 / 6
    assert m["energy_per_request_j"]["mean"] == pytest.approx((a + b) / 2)
    assert m["energy_per_request_j"]["p99"] == pytest.approx(b + 0.99 * (a - b))  # numpy: linear between the two
    # a second replica that never stepped idles the whole makespan
    two = summarize(hand_log(), idle_power_w={0: 4.0, 1: 10.0})
    assert two["energy_idle_j"] == pytest.approx(25.0) and two["avg_power_w"] == pytest.approx(60 / 2.5)
    no_idle = summarize(hand_log())
    assert no_idle["avg_power_w"] is None and no_idle["unavailable"]["avg_power_w"] == "idle power not given"
    assert no_idle["cost_usd_per_hour"] is None and "cost_usd_per_hour" in no_idle["unavailable"]


def test_unmodelled_energy_makes_every_energy_key_null_with_the_reason():
    m = summarize(hand_log(), unmodelled={"energy_j": "no power", "energy_j_per_token": "no power"})
    for key in ("energy_j", "energy_per_request_j", "energy_idle_j", "energy_total_j", "avg_power_w"):
        assert m[key] is None and m["unavailable"][key] == "no power"


def test_idle_gaps_between_steps_draw_idle_power():
    log = EventLog()
    r = jaxserve.Request("x", prompt_len=4, sampling=jaxserve.SamplingParams(2), arrival_time=0.0)
    log.add_request(r, 0.0)
    log.step(_plan([("x", 0, 4, True)], 0), 0.0, 1.0, 8.0, FakeState(0, 1), [])
    log.step(_plan([("x", 4, 1, True)], 1), 3.0, 1.0, 6.0, FakeState(0, 0), done("x"))  # idle from 1 to 3
    m = summarize(log.freeze(), idle_power_w=5.0)
    assert m["energy_idle_j"] == pytest.approx(10.0) and m["energy_total_j"] == pytest.approx(24.0)
    assert m["avg_power_w"] == pytest.approx(24.0 / 4.0)
    assert m["energy_per_request_j"]["mean"] == pytest.approx(14.0)  # one request: every step's energy
