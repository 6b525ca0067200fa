"""Fast-forwarding runs of identical decode steps gives exactly the step-by-step result."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxserve
from jaxserve.kv import KVConfig
from jaxserve.scheduler.fast_forward import (
    advance_decodes, decode_run_limit, finishing_step, is_stable_decode, retire_finished,
)
from jaxserve.sim import RooflineCostModel, get_hardware, get_model
from jaxserve.runtime import run_replica
from jaxserve.sim.executor import SIM_TOKEN_ID, SimExecutor
from jaxserve.plan import StepOutput
from log_testing import assert_same_log

COST = RooflineCostModel(get_model("llama-2-7b"), get_hardware("a100-80gb"))


def workload(rng, n, max_prompt=300, max_out=200, rate=20.0):
    times = np.cumsum(rng.exponential(1 / rate, n))
    return [
        jaxserve.Request(
            f"r{i}", prompt_len=int(rng.integers(1, max_prompt)),
            sampling=jaxserve.SamplingParams(int(rng.integers(1, max_out))), arrival_time=float(t),
        )
        for i, t in enumerate(times)
    ]


def run(name, requests, kv, fast_forward, **opts):
    sched = jaxserve.scheduler.make(name, **opts)
    return run_replica(sched, kv, SimExecutor(COST), requests, fast_forward=fast_forward).freeze()


@pytest.mark.parametrize("name, opts", [
    ("vllm", {}), ("vllm", {"enable_prefix_caching": True}), ("sarathi", {"chunk_size": 256}),
    ("orca", {}), ("static", {"max_num_seqs": 8}), ("vtc", {}),
])
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10_000), num_blocks=st.sampled_from([40, 200, 2000]), block_size=st.sampled_from([1, 4, 16]))
def test_fast_forward_equals_step_by_step(name, opts, seed, num_blocks, block_size):
    rng = np.random.default_rng(seed)
    kv = KVConfig(num_blocks, block_size)
    cap = kv.capacity_tokens
    requests = [r for r in workload(rng, 40) if r.max_total_tokens <= cap]
    slow = run(name, requests, kv, fast_forward=False, **opts)
    fast = run(name, requests, kv, fast_forward=True, **opts)
    assert_same_log(slow, fast)


def test_fast_forward_skips_most_steps_of_a_long_decode():
    rng = np.random.default_rng(0)
    requests = workload(rng, 8, max_prompt=50, max_out=2000, rate=1000.0)
    import time

    times = {}
    for ff in (False, True):
        t = time.perf_counter()
        log = run("vllm", requests, KVConfig(4000, 16), fast_forward=ff)
        times[ff] = time.perf_counter() - t
    assert len(log.step_end_s) > 1000
    assert times[True] < times[False] / 3  # the run is mostly skipped, not stepped


def test_advance_matches_update_loop_state():
    sched = jaxserve.scheduler.make("vllm", enable_prefix_caching=True)
    state = sched.init(KVConfig(64, 4))
    for i in range(3):
        state = sched.add_request(state, jaxserve.Request(f"r{i}", prompt_token_ids=list(range(1, 6 + i)),
                                                          sampling=jaxserve.SamplingParams(30)), 0.0)
    for _ in range(2):  # prefill, then one decode
        before = state
        state, plan = sched.schedule(state, 0.0)
        state = sched.update(state, plan, StepOutput({r: SIM_TOKEN_ID for r in plan.request_ids}), 0.0)
    assert is_stable_decode(sched, before, plan)
    k = decode_run_limit(state)
    assert k == 30 - 2 - 1  # every request would finish at its 30th token
    fast, used = advance_decodes(state, k, SIM_TOKEN_ID)
    slow = state
    for _ in range(k):
        slow, plan = sched.schedule(slow, 0.0)
        slow = sched.update(slow, plan, StepOutput({r: SIM_TOKEN_ID for r in plan.request_ids}), 0.0)
    assert fast.running.block_tables == slow.running.block_tables
    np.testing.assert_array_equal(fast.running.nums, slow.running.nums)
    assert fast.running_outputs() == slow.running_outputs()
    assert fast.kv.device.num_used == slow.kv.device.num_used == used[-1]
    assert fast.step == slow.step
    fast.kv.device.check()


@pytest.mark.parametrize("caching", [False, True])
def test_a_run_that_ends_finishing_requests_matches_the_update_loop_state(caching):
    sched = jaxserve.scheduler.make("vllm", enable_prefix_caching=caching)
    state = sched.init(KVConfig(64, 4))
    for i, max_new in enumerate((30, 12, 12, 40)):  # two finish at the same step, mid-batch
        state = sched.add_request(state, jaxserve.Request(f"r{i}", prompt_token_ids=list(range(1, 6 + i)),
                                                          sampling=jaxserve.SamplingParams(max_new)), 0.0)
    state, plan = sched.schedule(state, 0.0)  # the prefill samples each request's first token
    state = sched.update(state, plan, StepOutput({r: SIM_TOKEN_ID for r in plan.request_ids}), 0.0)
    k = finishing_step(state)
    assert k == 12 - 1 and decode_run_limit(state) == k - 1
    fast, used = advance_decodes(state, k, SIM_TOKEN_ID)
    fast = retire_finished(fast)
    slow = state
    for _ in range(k):
        slow, plan = sched.schedule(slow, 0.0)
        slow = sched.update(slow, plan, StepOutput({r: SIM_TOKEN_ID for r in plan.request_ids}), 0.0)
    assert [f.request_id for f in slow.finished] == ["r1", "r2"]
    assert fast.finished == slow.finished
    assert fast.running.ids == slow.running.ids and fast.running.block_tables == slow.running.block_tables
    np.testing.assert_array_equal(fast.running.nums, slow.running.nums)
    assert fast.running_outputs() == slow.running_outputs()
    assert fast.kv.device.num_used == slow.kv.device.num_used and fast.step == slow.step
    fp, sp = fast.kv.device, slow.kv.device
    assert dict(fp.refcounts) == dict(sp.refcounts) and dict(fp.cached) == dict(sp.cached)
    assert fp.evictable == sp.evictable and fp.stacked == sp.stacked
    assert len(sp.cached) > 0 or not caching
    fast.kv.device.check()


@pytest.mark.parametrize("k", [1, 3, 16, 17, 50])  # short runs are evaluated with floats, long ones with numpy
def test_cost_model_decode_run_is_bitwise_step(k):
    rows, ctx = 37, 5000
    durations, energies = COST.decode_run(rows, ctx, ctx // rows + 1, k)
    assert durations.shape == energies.shape == (k,) and durations.dtype == np.float64
    for j in sorted({0, 1, k // 2, k - 1} & set(range(k))):
        c = np.full(rows, 0, np.int64)
        c[:] = (ctx + rows * j) // rows
        c[: (ctx + rows * j) % rows] += 1
        plan = jaxserve.BatchPlan(
            tuple(f"r{i}" for i in range(rows)), c, np.ones(rows, np.int64), np.ones(rows, bool),
            tuple(() for _ in range(rows)), np.zeros(rows, np.int32), 16,
        )
        cost = COST.step(plan)
        assert cost.duration_s == durations[j] and cost.energy_j == energies[j]
