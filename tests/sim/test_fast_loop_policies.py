"""The fast loop runs orca and static too (jaxserve/sim/fast_loop.py): their event logs equal the
reference loop's bit for bit on random workloads (the vllm and sarathi cases are in
test_fast_loop.py). Both reserve prompt + max_new_tokens at admission, so their rows join the
cohort holding every block they will need; static admits a batch only when nothing runs."""

from __future__ import annotations

import collections

import pytest
from fast_loop_testing import Case, assert_logs_equal, cost_model, kv_configs, limits, workloads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxserve
from jaxserve.kv import KVConfig
from jaxserve.sim.fast_loop import why_not_fast

POLICIES = ("orca", "static")
_SEEN: dict[str, collections.Counter] = {name: collections.Counter() for name in POLICIES}


@st.composite
def cases(draw, name: str) -> Case:
    kv = draw(kv_configs())
    scheduler = jaxserve.scheduler.make(
        name,
        max_num_seqs=draw(st.sampled_from([256, 1, 2, 3, 5])),
        max_num_batched_tokens=draw(st.one_of(st.integers(1, 700), st.just(8192))),
        watermark=draw(st.sampled_from([0.0, 0.01, 0.1])),
    )
    cost = draw(st.tuples(st.booleans(), st.sampled_from([None, 210])))
    return Case(scheduler, kv, cost, draw(workloads(30, kv.capacity_tokens)), draw(limits()))


@pytest.mark.parametrize("name", POLICIES)
def test_fast_loop_equals_reference_for_policy(name):
    seen = _SEEN[name]

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases(name))
    def one(case):
        assert why_not_fast(case.scheduler, case.kv, case.cost_model, case.limits, case.requests) is None
        expected = case.reference()
        assert_logs_equal(expected, case.fast(), case)
        seen["runs"] += 1
        seen["several-running"] += bool((expected.step_running > 1).any())
        seen["rejected"] += bool(expected.rejected.any())
        seen["queued"] += bool((expected.step_waiting > 0).any())

    one()
    assert all(seen[k] for k in ("several-running", "rejected", "queued")), dict(seen)


@pytest.mark.parametrize("name", POLICIES)
def test_full_reservation_never_preempts_and_batches(name):
    """Requests whose prompt + max_new fill most of the pool run one or two at a time: the reserved
    blocks, not the tokens computed so far, decide admission (and static waits for a whole batch)."""
    requests = tuple(jaxserve.Request(f"r{i}", prompt_len=30, arrival_time=0.01 * i,
                                      sampling=jaxserve.SamplingParams(40)) for i in range(6))  # fmt: skip
    case = Case(jaxserve.scheduler.make(name, max_num_batched_tokens=512), KVConfig(20, 8), (), requests)
    expected = case.reference()
    assert_logs_equal(expected, case.fast(), case)
    assert expected.preemptions.sum() == 0
    assert expected.step_running.max() == 2  # 70 tokens = 9 of the 20 blocks each
