"""Prefill runs (scheduler/prefill_runs.py): the steps that finish one chunked prefill, found from
the state alone, planned and applied exactly as schedule/update rounds plan and apply them."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxserve
from jaxserve.kv import KVConfig
from jaxserve.plan import StepOutput
from jaxserve.scheduler.driver import drive
from jaxserve.scheduler.prefill_runs import apply_prefill_run, prefill_run, prefill_run_plan

TOKEN = 1


def rounds(sched, state, k):
    """k schedule/update rounds from ``state``, every sampling row sampling TOKEN: (state, plans)."""
    plans = []
    for _ in range(k):
        state, plan = sched.schedule(state, 0.0)
        state = sched.update(state, plan, StepOutput.repeated(plan, TOKEN), 0.0)
        plans.append(plan)
    return state, plans


def assert_same_state(a, b):
    assert a.running.ids == b.running.ids and a.running.block_tables == b.running.block_tables
    np.testing.assert_array_equal(a.running.nums, b.running.nums)
    assert a.running_outputs() == b.running_outputs()
    assert a.finished == b.finished and a.step == b.step and a.num_waiting == b.num_waiting
    pa, pb = a.kv.device, b.kv.device
    assert dict(pa.refcounts) == dict(pb.refcounts) and pa.stacked == pb.stacked and pa.num_free == pb.num_free
    pa.check()


def assert_same_plan(a, b):
    assert a.request_ids == b.request_ids and a.block_tables == b.block_tables and a.step == b.step
    for name in ("num_computed_tokens", "num_new_tokens", "samples_token", "token_ids", "is_decode"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.num_decode_tokens == b.num_decode_tokens and a.block_size == b.block_size


def check_runs_from(sched, state, seen):
    """Every prefill run from ``state`` (finishing or not) and each of its prefixes equals the rounds."""
    for finish in (True, False):
        pr = prefill_run(sched, state, finish)
        if pr is None:
            seen["none"] += 1
            return
        seen["finishes" if pr.finishes else ("completes" if pr.completes else "stops")] += 1
        assert finish or not pr.finishes
        peeked = state.kv.device.peek(pr.num_blocks)
        tables, used = list(state.running.block_tables), 0
        for k in range(1, len(pr.chunks) + 1):
            slow, plans = rounds(sched, state, k)
            for r in pr.blocks[k - 1]:
                tables[r] += (peeked[used],)
                used += 1
            assert_same_plan(prefill_run_plan(state, pr, k - 1, tuple(tables), TOKEN if k > 1 else None), plans[-1])
            fast, used_after = apply_prefill_run(state, pr, k, TOKEN)
            if k < len(pr.chunks) or not pr.finishes:
                assert slow.finished == ()  # a cut (or a run that does not finish) finishes nobody
            assert_same_state(fast, slow)
            assert used_after[-1] == fast.kv.device.num_used


def requests_for(rng, n, max_total):
    return [jaxserve.Request(f"r{i}", prompt_len=int(rng.integers(2, max_total // 2)),
                             sampling=jaxserve.SamplingParams(int(rng.integers(1, max_total // 2))))
            for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("opts", [
    {"chunk_size": 16}, {"chunk_size": 12, "chunk_align": 4}, {"chunk_size": 40, "max_num_seqs": 3},
    {"chunk_size": 8, "watermark": 0.2}, {"chunk_size": 24, "preemption_mode": "swap"},
])  # fmt: skip
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10_000), num_blocks=st.sampled_from([10, 30, 200]), block_size=st.sampled_from([1, 2, 4]))
def test_prefill_runs_equal_schedule_update_rounds(opts, seed, num_blocks, block_size):
    rng = np.random.default_rng(seed)
    sched = jaxserve.scheduler.make("sarathi", **opts)
    kv = KVConfig(num_blocks, block_size, num_host_blocks=6)
    requests = requests_for(rng, 10, min(kv.capacity_tokens, 80))
    seen = collections.Counter()
    drive(sched, kv, requests, arrival_steps=sorted(rng.integers(0, 30, len(requests)).tolist()),
          on_step=lambda rec: check_runs_from(sched, rec.before, seen), keep_plans=False)  # fmt: skip
    assert seen["none"] > 0


def test_runs_take_every_path():
    """Hand-made workloads reach runs that complete a prompt, stop short of it, end with a
    finishing step, and whose prefill allocates blocks of its own."""
    seen = collections.Counter()

    def check(sched, rec):
        check_runs_from(sched, rec.before, seen)
        pr = prefill_run(sched, rec.before)
        seen["grows"] += pr is not None and any(pr.row in step for step in pr.blocks)
        seen["grows after decodes"] += pr is not None and any(pr.row in step[1:] for step in pr.blocks)

    for opts, kv, arrivals, lengths in [
        ({"chunk_size": 16}, KVConfig(200, 4), [0, 0, 1, 9], [(50, 6), (9, 3), (70, 20), (33, 2)]),
        ({"chunk_size": 10}, KVConfig(40, 2), [0, 2, 3, 3], [(30, 4), (41, 3), (12, 9), (7, 1)]),
        ({"chunk_size": 9, "chunk_align": 4}, KVConfig(60, 1), [0, 0, 1], [(30, 10), (25, 2), (20, 5)]),
        # swapped out mid-prompt: swapped back in with blocks for its first chunk only, so the
        # later chunks allocate (after the decodes' blocks of the same step)
        ({"chunk_size": 10, "preemption_mode": "swap"}, KVConfig(35, 4, num_host_blocks=20), [0, 0, 4, 7, 7, 9],
         [(10, 4), (18, 20), (23, 19), (22, 27), (27, 27), (26, 21)]),
        ({"chunk_size": 4, "preemption_mode": "swap"}, KVConfig(30, 2, num_host_blocks=20), [1, 2, 4, 6, 7, 7],
         [(19, 8), (5, 18), (5, 4), (20, 20), (25, 13), (7, 6)]),  # ... in a step where decodes allocate too
    ]:
        sched = jaxserve.scheduler.make("sarathi", **opts)
        requests = [jaxserve.Request(f"r{i}", prompt_len=p, sampling=jaxserve.SamplingParams(m))
                    for i, (p, m) in enumerate(lengths)]  # fmt: skip
        drive(sched, kv, requests, arrival_steps=arrivals,
              on_step=lambda rec, sched=sched: check(sched, rec))  # fmt: skip
    assert seen["finishes"] and seen["completes"] and seen["stops"] and seen["none"] and seen["grows after decodes"], seen


def test_no_runs_with_prefix_caching_stop_tokens_or_policies_that_do_not_declare_them():
    kv = KVConfig(100, 4)
    req = jaxserve.Request("a", prompt_len=40, sampling=jaxserve.SamplingParams(5))
    for sched, request in [
        (jaxserve.scheduler.make("sarathi", chunk_size=16, enable_prefix_caching=True), req),
        (jaxserve.scheduler.make("sarathi", chunk_size=16),
         jaxserve.Request("a", prompt_len=40, sampling=jaxserve.SamplingParams(5, stop_token_ids=(3,)))),
        (jaxserve.scheduler.make("vllm"), req),
        (jaxserve.scheduler.make("vtc", base="sarathi", chunk_size=16), req),
    ]:  # fmt: skip
        state, _ = rounds(sched, sched.add_request(sched.init(kv), request, 0.0), 1)
        assert prefill_run(sched, state) is None
    sched = jaxserve.scheduler.make("sarathi", chunk_size=16)
    state, _ = rounds(sched, sched.add_request(sched.init(kv), req, 0.0), 1)
    assert prefill_run(sched, state).chunks == (16, 8)  # 40 = 16 + 16 + 8: the first chunk ran already
