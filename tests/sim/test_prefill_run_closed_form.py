"""Prefill runs costed in closed form (``SimExecutor.prefill_run``): each step's duration and energy
equal ``step_cost`` of its plan bit for bit, and a replica that builds no plans (no ``on_plan``)
logs exactly what stepping logs."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from log_testing import assert_same_log

import jaxserve
from jaxserve.kv import KVConfig
from jaxserve.runtime import Replica, run_replica
from jaxserve.scheduler.driver import drive
from jaxserve.scheduler.prefill_runs import prefill_run, prefill_run_plan
from jaxserve.sim import RooflineCostModel, get_hardware, get_model
from jaxserve.sim.executor import SimExecutor
from jaxserve.sim.overlap_cost_model import OverlapCostModel

MODEL, A100 = get_model("llama-2-7b"), get_hardware("a100-80gb")
COSTS = {
    "roofline": RooflineCostModel(MODEL, A100),
    "async, per-row overhead": RooflineCostModel(MODEL, A100, async_scheduling=True, per_seq_overhead_s=2e-5),
    "power cap, tp 2": RooflineCostModel(MODEL, A100, tp=2, power_cap_w=250.0),
}


def closed_form_costs(executor, state, pr):
    """``executor.prefill_run`` of ``pr`` from ``state`` as the replica asks it."""
    computed = state.running.num_computed
    c = computed.item(pr.row)
    return executor.prefill_run(len(computed), int(computed.sum()) - c, c, pr.chunks, pr.completes)


def plan_costs(executor, state, pr):
    """``step_cost`` of each of ``pr``'s plans (built as the replica builds them)."""
    peeked = state.kv.device.peek(pr.num_blocks)
    tables, used, token, costs = list(state.running.block_tables), 0, None, []
    for j in range(len(pr.chunks)):
        for r in pr.blocks[j]:
            tables[r] += (peeked[used],)
            used += 1
        duration, energy, token = executor.step_cost(prefill_run_plan(state, pr, j, tuple(tables), token))
        costs.append((duration, energy))
    return costs


@pytest.mark.parametrize("cost", list(COSTS), ids=list(COSTS))
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10_000), chunk_size=st.sampled_from([16, 64, 200]), block_size=st.sampled_from([1, 4, 16]))
def test_closed_form_costs_equal_the_plans_costs(cost, seed, chunk_size, block_size):
    rng = np.random.default_rng(seed)
    executor = SimExecutor(COSTS[cost])
    sched = jaxserve.scheduler.make("sarathi", chunk_size=chunk_size)
    requests = [jaxserve.Request(f"r{i}", prompt_len=int(rng.integers(100, 600)), sampling=jaxserve.SamplingParams(int(rng.integers(1, 60))))
                for i in range(8)]  # fmt: skip
    seen = collections.Counter()

    def check(rec):
        pr = prefill_run(sched, rec.before)
        if pr is None:
            return
        closed = closed_form_costs(executor, rec.before, pr)
        expected = plan_costs(executor, rec.before, pr)
        assert list(zip(closed.durations_s.tolist(), closed.energies_j.tolist())) == expected  # bit for bit
        assert closed.token_id == executor.step_cost(prefill_run_plan(rec.before, pr, 0, rec.before.running.block_tables, None))[2]
        seen["runs"] += 1

    drive(sched, KVConfig(2000, block_size), requests, arrival_steps=sorted(rng.integers(0, 20, len(requests)).tolist()),
          on_step=check, keep_plans=False)  # fmt: skip
    assert seen["runs"], seen  # the example reached closed forms


def test_no_closed_form_where_step_is_not_the_rooflines():
    state_args = (3, 100, 40, (16, 16), True)
    assert SimExecutor(COSTS["roofline"]).prefill_run(*state_args) is not None
    assert SimExecutor(OverlapCostModel(MODEL, A100)).prefill_run(*state_args) is None

    class Scaled(RooflineCostModel):
        def step(self, plan):
            return super().step(plan)

    assert SimExecutor(Scaled(MODEL, A100)).prefill_run(*state_args) is None


@pytest.mark.parametrize("opts, kv", [
    ({"chunk_size": 64}, KVConfig(300, 8)),  # prompts of many chunks, runs cut at arrivals
    ({"chunk_size": 160, "chunk_align": 16, "preemption_mode": "swap"}, KVConfig(90, 16, num_host_blocks=60)),
    ({"chunk_size": 300, "max_num_seqs": 3}, KVConfig(150, 4)),
])  # fmt: skip
def test_replica_without_plans_logs_as_stepping(opts, kv, monkeypatch):
    """run_replica (no ``on_plan``: its prefill runs build no plan) logs exactly what stepping logs."""
    closed = []
    real = SimExecutor.prefill_run
    monkeypatch.setattr(SimExecutor, "prefill_run", lambda *a: closed.append(real(*a)) or closed[-1])
    rng = np.random.default_rng(3)
    times = np.cumsum(rng.exponential(1 / 40.0, 80))
    requests = [jaxserve.Request(f"r{i}", prompt_len=int(rng.integers(1, 400)), sampling=jaxserve.SamplingParams(int(rng.integers(1, 300))),
                                 arrival_time=float(t)) for i, t in enumerate(times)]  # fmt: skip
    requests = [r for r in requests if r.max_total_tokens <= kv.capacity_tokens]
    logs = [run_replica(jaxserve.scheduler.make("sarathi", **opts), kv, SimExecutor(COSTS["roofline"]), requests,
                        fast_forward=ff).freeze() for ff in (False, True)]  # fmt: skip
    assert_same_log(*logs)
    assert any(c is not None for c in closed)  # the closed form was taken


def test_a_deferred_closed_form_prefill_run_settled_at_any_time_equals_a_run_cut_there():
    kv = KVConfig(300, 4)
    requests = [jaxserve.Request(f"r{i}", prompt_len=(60, 900)[i], sampling=jaxserve.SamplingParams(100)) for i in range(2)]

    def started(defer: bool, horizon: float):
        replica = Replica(jaxserve.scheduler.make("sarathi", chunk_size=128), kv, SimExecutor(COSTS["roofline"]))
        replica.defer_runs = defer
        replica.add(requests[0])
        replica.step()  # its prefill
        replica.add(requests[1])
        replica.step()  # the long prompt's first chunk, with r0's decode
        replica.step(horizon)  # the steps that finish it: pending, or cut at the horizon
        return replica

    for t in (0.0, 0.02, 0.05, 0.09, 1.0):
        deferred, cut = started(True, float("inf")), started(False, t)
        pending = deferred.pending_run
        assert pending.prefill.plans is None and pending.prefill.run.completes and len(pending.before.running) == 2 and deferred.pending_run_length == 7
        executor = deferred.executor  # its last step samples the prompt's first token: costed as its plan
        closed = closed_form_costs(executor, pending.before, pending.prefill.run)
        assert list(zip(closed.durations_s.tolist(), closed.energies_j.tolist())) == plan_costs(executor, pending.before, pending.prefill.run)
        deferred.settle(t)
        assert (deferred.now, deferred.num_steps) == (cut.now, cut.num_steps)
        assert deferred.state.running.nums.tolist() == cut.state.running.nums.tolist()
        assert_same_log(deferred.log.freeze(), cut.log.freeze())
