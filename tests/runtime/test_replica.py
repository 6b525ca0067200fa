"""Replica as a cluster would drive it: several replicas, each with its own executor, advanced from
one event clock by ``add`` / ``step`` / ``next_event_time``; and the Executor protocol's closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from log_testing import assert_same_log

import jaxserve
from jaxserve.kv import KVConfig
from jaxserve.runtime import Executor, Replica, run_replica
from jaxserve.sim import RooflineCostModel, get_hardware, get_model
from jaxserve.sim.executor import SimExecutor

KV = KVConfig(400, 16)


def workload(seed: int, n: int, rate: float) -> list[jaxserve.Request]:
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, n))
    return [
        jaxserve.Request(f"r{i}", prompt_len=int(rng.integers(1, 400)), sampling=jaxserve.SamplingParams(int(rng.integers(1, 300))),
                         arrival_time=float(t))
        for i, t in enumerate(times)
    ]  # fmt: skip


def drive(replicas: list[Replica], requests, route) -> None:
    """A minimal cluster loop: the earliest event first (arrivals before steps at the same time)."""
    arrivals = sorted(requests, key=lambda r: r.arrival_time)
    nxt = 0
    while True:
        t_arrival = arrivals[nxt].arrival_time if nxt < len(arrivals) else math.inf
        busy = min(replicas, key=lambda r: r.next_event_time)
        if t_arrival == math.inf and busy.next_event_time == math.inf:
            return
        if t_arrival <= busy.next_event_time:
            replicas[route(arrivals[nxt])].add(arrivals[nxt])
            nxt += 1
        else:
            busy.step(horizon=t_arrival)


@pytest.mark.parametrize("fast_forward", [False, True])
def test_replicas_on_one_clock_equal_separate_runs(fast_forward):
    """Round-robin over two replicas of different hardware gives each exactly the log it would
    have served its share alone (they share nothing but the clock)."""
    requests = workload(0, 120, rate=30.0)
    costs = [RooflineCostModel(get_model("llama-2-7b"), get_hardware(h)) for h in ("a100-80gb", "h100-sxm")]
    replicas = [Replica(jaxserve.scheduler.make(name), KV, SimExecutor(c), fast_forward=fast_forward)
                for name, c in zip(("vllm", "sarathi"), costs)]  # fmt: skip
    route = lambda r: int(r.request_id[1:]) % 2  # noqa: E731
    drive(replicas, requests, route)
    for i, (name, cost) in enumerate(zip(("vllm", "sarathi"), costs)):
        share = [r for r in requests if route(r) == i]
        alone = run_replica(jaxserve.scheduler.make(name), KV, SimExecutor(cost), share, fast_forward=fast_forward)
        assert_same_log(replicas[i].log.freeze(), alone.freeze())
        assert replicas[i].log.freeze().finish_s.size == len(share)
        assert not np.isnan(replicas[i].log.freeze().finish_s).any()


class NoClosedForm(Executor):
    """Runs steps on a cost model but declares no closed-form decode run (as a real model)."""

    def __init__(self, cost):
        self.inner = SimExecutor(cost)

    def execute(self, plan):
        return self.inner.execute(plan)


def test_executor_without_closed_form_runs_every_step():
    cost = RooflineCostModel(get_model("llama-2-7b"), get_hardware("a100-80gb"))
    requests = workload(1, 30, rate=5.0)
    assert NoClosedForm(cost).decode_run(4, 100, 30, 10) is None  # the protocol's default
    fast = Replica(jaxserve.scheduler.make("vllm"), KV, SimExecutor(cost))
    plain = Replica(jaxserve.scheduler.make("vllm"), KV, NoClosedForm(cost))
    for replica in (fast, plain):
        drive([replica], requests, lambda r: 0)
    assert_same_log(fast.log.freeze(), plain.log.freeze())
    assert len(plain.log.freeze().step_end_s) == plain.num_steps == fast.num_steps


def test_blocked_replica_waits_for_work_and_idle_clock_jumps():
    cost = RooflineCostModel(get_model("llama-2-7b"), get_hardware("a100-80gb"))
    replica = Replica(jaxserve.scheduler.make("vllm"), KV, SimExecutor(cost))
    assert replica.next_event_time == math.inf  # nothing to do
    replica.add(jaxserve.Request("a", prompt_len=10, sampling=jaxserve.SamplingParams(2), arrival_time=5.0))
    assert replica.now == replica.next_event_time == 5.0  # idle: the clock jumps to the arrival
    assert replica.step() == 1 and replica.now > 5.0
    while replica.has_unfinished:
        replica.step()
    assert replica.next_event_time == math.inf
    too_big = jaxserve.Request("big", prompt_len=400 * 16, sampling=jaxserve.SamplingParams(1), arrival_time=6.0)
    assert not replica.add(too_big)  # rejected with its reason, the replica goes on
    assert list(replica.log.rejected) == [replica.log.index["big"]]
    assert replica.next_event_time == math.inf


def test_a_deferred_run_settled_at_any_time_equals_a_run_cut_there():
    """A replica with ``defer_runs`` holds its closed-form decode run pending; settling it at t
    gives exactly the replica whose run was cut at horizon t (state, clock and log), and its
    pending view's blocks in use are those of that replica."""
    import jaxserve
    from jaxserve.kv import KVConfig
    from jaxserve.runtime import Replica
    from jaxserve.sim import RooflineCostModel, get_hardware, get_model
    from jaxserve.sim.executor import SimExecutor
    from log_testing import assert_same_log

    cost = RooflineCostModel(get_model("llama-2-7b"), get_hardware("a100-80gb"))
    kv = KVConfig(300, 16)
    requests = [jaxserve.Request(f"r{i}", prompt_len=40 + 30 * i, sampling=jaxserve.SamplingParams(150 + 20 * i))
                for i in range(4)]

    def started(defer: bool, horizon: float):
        replica = Replica(jaxserve.scheduler.make("vllm"), kv, SimExecutor(cost))
        replica.defer_runs = defer
        for r in requests:
            replica.add(r)
        replica.step()  # the prefill
        replica.step(horizon)  # a decode run: pending, or cut at the horizon
        return replica

    for t in (0.05, 0.4, 1.0, 2.5):
        deferred, cut = started(True, float("inf")), started(False, t)
        assert deferred.has_pending_run
        if deferred.steps_started_by(t) < deferred.pending_run_length:
            _, used = deferred.pending_view(t)
            assert used == cut.state.kv.device.num_used
        deferred.settle(t)
        assert not deferred.has_pending_run
        assert (deferred.now, deferred.num_steps) == (cut.now, cut.num_steps)
        assert deferred.state.running.num_computed.tolist() == cut.state.running.num_computed.tolist()
        assert deferred.state.running.block_tables == cut.state.running.block_tables
        assert_same_log(deferred.log.freeze(), cut.log.freeze())


@pytest.mark.parametrize("opts, kv", [
    ({"chunk_size": 256}, KVConfig(400, 16)),
    ({"chunk_size": 96, "chunk_align": 32}, KVConfig(400, 16)),
    ({"chunk_size": 128, "preemption_mode": "swap"}, KVConfig(90, 16, num_host_blocks=60)),
    ({"chunk_size": 200, "max_num_seqs": 4}, KVConfig(120, 8)),
])  # fmt: skip
def test_prefill_runs_leave_the_log_and_plans_as_stepping_does(opts, kv, monkeypatch):
    """Sarathi with its prefill runs (scheduler/prefill_runs.py) logs exactly what stepping logs,
    and ``on_plan`` sees the plans of the steps a run takes (they start nobody)."""
    import jaxserve.runtime.replica as replica_module

    runs = []
    real = replica_module.prefill_run
    monkeypatch.setattr(replica_module, "prefill_run", lambda *a, **k: runs.append(real(*a, **k)) or runs[-1])
    cost = RooflineCostModel(get_model("llama-2-7b"), get_hardware("a100-80gb"))
    requests = [r for r in workload(3, 80, rate=40.0) if r.max_total_tokens <= kv.capacity_tokens]
    logs, plans = [], []
    for fast_forward in (False, True):
        seen = []
        replica = Replica(jaxserve.scheduler.make("sarathi", **opts), kv, SimExecutor(cost), fast_forward=fast_forward,
                          on_plan=lambda plan, seen=seen: seen.append((plan.request_ids, plan.num_new_tokens.tolist())))
        drive([replica], requests, lambda r: 0)
        logs.append(replica.log.freeze())
        plans.append(seen)
    assert_same_log(*logs)
    assert any(r is not None for r in runs)
    fast = set(map(repr, plans[1]))  # the fast path's plans are the stepped plans that are not decode runs'
    assert fast <= set(map(repr, plans[0])) and len(plans[1]) > sum(r is not None for r in runs)


@pytest.mark.parametrize("order", ["fcfs", "priority"])
def test_decode_runs_span_arrivals_that_cannot_change_them(order, monkeypatch):
    """Overloaded vllm (its queue head blocked for blocks): run_replica's decode runs go on through
    arrivals that queue behind the head or are rejected, and end at an arrival that would be served
    first (a priority order); the log is exactly the stepped one, time and step limits included."""
    from jaxserve.runtime import RunLimits
    from jaxserve.scheduler.queues import KeyedOrder, priority_key

    joined = []
    real = Replica._add_during_run
    monkeypatch.setattr(Replica, "_add_during_run", lambda self, r, run, t: joined.append(real(self, r, run, t)) or joined[-1])
    rng = np.random.default_rng(5)
    requests = [jaxserve.Request(f"r{i}", prompt_len=int(rng.integers(20, 300)),
                                 sampling=jaxserve.SamplingParams(int(rng.integers(50, 400))),
                                 arrival_time=0.02 * i, priority=int(rng.integers(0, 3)) if order == "priority" else 0)
                for i in range(150)]  # fmt: skip
    cost = RooflineCostModel(get_model("llama-2-7b"), get_hardware("a100-80gb"))
    opts = {"order": KeyedOrder(priority_key)} if order == "priority" else {}
    for limits in (RunLimits(max_context=600), RunLimits(max_context=600, max_sim_time_s=2.0),
                   RunLimits(max_context=600, max_steps=777)):
        logs = [run_replica(jaxserve.scheduler.make("vllm", **opts), KVConfig(80, 16), SimExecutor(cost), requests,
                            limits=limits, fast_forward=ff).freeze() for ff in (False, True)]  # fmt: skip
        assert_same_log(*logs)
    assert True in joined and False in joined  # joined runs, and was rejected (too long) during one
    assert len(set(logs[1].step_waiting.tolist())) > 5
    # Arrivals exactly at step boundaries join before the step that starts then, as in stepping.
    ties = [jaxserve.Request(f"t{i}", prompt_len=30, sampling=jaxserve.SamplingParams(60), arrival_time=float(t))
            for i, t in enumerate(logs[0].step_end_s[100:400:7])]  # fmt: skip
    logs = [run_replica(jaxserve.scheduler.make("vllm", **opts), KVConfig(80, 16), SimExecutor(cost),
                        requests + ties, limits=RunLimits(max_context=600), fast_forward=ff).freeze()
            for ff in (False, True)]  # fmt: skip
    assert_same_log(*logs)


def test_a_deferred_prefill_run_settled_at_any_time_equals_a_run_cut_there():
    """As decode runs: a pending prefill run settled at t is the run cut at horizon t (state,
    clock, log, plans shown to on_plan), and its pending view counts the blocks its started steps took."""
    cost = RooflineCostModel(get_model("llama-2-7b"), get_hardware("a100-80gb"))
    kv = KVConfig(300, 4)
    requests = [jaxserve.Request(f"r{i}", prompt_len=(60, 900)[i], sampling=jaxserve.SamplingParams(100))
                for i in range(2)]  # fmt: skip

    def started(defer: bool, horizon: float):
        plans = []
        replica = Replica(jaxserve.scheduler.make("sarathi", chunk_size=128), kv, SimExecutor(cost),
                          on_plan=lambda p: plans.append(p.num_new_tokens.tolist()))  # fmt: skip
        replica.defer_runs = defer
        replica.add(requests[0])
        replica.step()  # its prefill
        replica.add(requests[1])
        replica.step()  # the long prompt's first chunk, with r0's decode
        replica.step(horizon)  # the steps that finish it: pending, or cut at the horizon
        return replica, plans

    for t in (0.0, 0.02, 0.05, 0.09, 1.0):
        (deferred, deferred_plans), (cut, cut_plans) = started(True, float("inf")), started(False, t)
        assert deferred.has_pending_run and deferred.pending_run_length == 7  # 900 - 127 = 6 * 127 + 11 tokens left
        if deferred.steps_started_by(t) < deferred.pending_run_length:
            assert deferred.pending_view(t)[1] == cut.state.kv.device.num_used
        deferred.settle(t)
        assert (deferred.now, deferred.num_steps) == (cut.now, cut.num_steps)
        assert deferred.state.running.nums.tolist() == cut.state.running.nums.tolist()
        assert deferred.state.running.block_tables == cut.state.running.block_tables
        assert deferred_plans == cut_plans
        assert_same_log(deferred.log.freeze(), cut.log.freeze())
