"""LoongServe's scheduler: the batching DP against brute force, dispatch / allocation / scaling-plan
cases by hand, and the node's invariants on random workloads (no KV over-commit on any instance,
every request finishes exactly once with all its tokens, nothing starves) with the paths reached."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jaxserve.cluster import esp_policy as policy
from jaxserve.cluster.esp_batching import PrefillBatch, batch_objective, plan_prefill_batches
from jaxserve.cluster.esp_node import EspNode, EspSettings
from jaxserve.request import Request, SamplingParams
from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.esp_cost_model import EspCostModel
from jaxserve.sim.hardware import get_hardware
from jaxserve.sim.models import get_model

COST = EspCostModel(RooflineCostModel(get_model("llama-2-7b"), get_hardware("a100-80gb")), 4)


# -- the DP ------------------------------------------------------------------------------------------
def compositions(total: int, parts: int):
    """Ways to write ``total`` as ``parts`` positive integers, in order."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def brute_force(lens, instances, free, time_fn):
    best = np.inf
    n = len(lens)
    for parts in range(1, n + 1):
        for sizes in compositions(n, parts):
            for used in range(parts, len(instances) + 1):
                for ks in compositions(used, parts):
                    batches, a, j, ok = [], 0, 0, True
                    for size, k in zip(sizes, ks):
                        chunk = lens[a:a + size]
                        if sum(chunk) > sum(free[j:j + k]):
                            ok = False
                            break
                        t = float(time_fn(size, sum(chunk), sum(x * (x + 1) / 2 for x in chunk), k))
                        batches.append(PrefillBatch(a, a + size, tuple(instances[j:j + k]), t))
                        a, j = a + size, j + k
                    if ok:
                        best = min(best, batch_objective(lens, batches))
    return best


@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.integers(1, 40000), min_size=1, max_size=5),
       free=st.lists(st.integers(0, 60000), min_size=1, max_size=4))
def test_dp_is_optimal_against_brute_force(lens, free):
    instances = list(range(len(free)))
    expected = brute_force(lens, instances, free, COST.prefill_time_s)
    if not np.isfinite(expected):
        with pytest.raises(ValueError, match="do not fit"):
            plan_prefill_batches(lens, instances, free, COST.prefill_time_s)
        return
    plan = plan_prefill_batches(lens, instances, free, COST.prefill_time_s)
    assert plan.objective == pytest.approx(expected, rel=1e-9)
    assert plan.objective == pytest.approx(batch_objective(lens, plan.batches), rel=1e-9)
    # consecutive batches covering every prompt once, on disjoint blocks whose free KV holds them
    assert [b.first for b in plan.batches] == [0] + [b.stop for b in plan.batches[:-1]] and plan.batches[-1].stop == len(lens)
    blocks = [i for b in plan.batches for i in b.instances]
    assert len(blocks) == len(set(blocks))
    assert all(sum(lens[b.first:b.stop]) <= sum(free[i] for i in b.instances) for b in plan.batches)


def test_dp_splits_a_long_prompt_from_short_ones():
    # one 60k prompt and three short ones on 4 instances: the short ones must not wait for the long one
    lens = [60000, 300, 200, 100]
    plan = plan_prefill_batches(lens, [0, 1, 2, 3], [120000] * 4, COST.prefill_time_s)
    assert len(plan.batches) > 1
    assert plan.batches[0] == PrefillBatch(0, 1, plan.batches[0].instances, plan.batches[0].time_s)
    one_batch = COST.prefill(lens, 4) * sum(1 / x for x in lens)
    assert plan.objective < one_batch


# -- dispatch, allocation, scaling plan ----------------------------------------------------------------
def test_admit_is_fcfs_and_keeps_a_slot_per_running_request():
    assert policy.admit([100, 50, 10], free_tokens=160, num_running=0, max_requests=8) == 3
    assert policy.admit([100, 50, 10], free_tokens=160, num_running=1, max_requests=8) == 2
    assert policy.admit([200, 10], free_tokens=160, num_running=0, max_requests=8) == 0  # the head is never skipped
    assert policy.admit([1, 1, 1], free_tokens=160, num_running=0, max_requests=2) == 2


def test_allocation_takes_idle_instances_before_decoding_ones():
    cap = 100000
    residents = [policy.Resident("a", ((0, 50000),), 1.0), policy.Resident("b", ((1, 30000),), 1.0)]
    chosen = policy.allocate_prefill_instances([50000, 30000, 0, 0], cap, [80000], residents, COST.prefill_time_s)
    assert set(chosen) == {2, 3}  # the idle ones hold it and pausing decoders does not pay
    # a prompt too large for the idle ones must take decoding instances too (least loaded first)
    chosen = policy.allocate_prefill_instances([50000, 30000, 0, 0], cap, [250000], residents, COST.prefill_time_s)
    assert set(chosen) == {1, 2, 3}
    assert policy.allocate_prefill_instances([cap] * 4, cap, [10], residents, COST.prefill_time_s) == ()


def test_allocation_scales_prefill_up_over_cheap_pauses():
    # instance 3 holds one decoder 500 tokens in (pause weight 1/500). Fifty 2k prompts (Σ 1/l =
    # 0.025) gain ~0.6 s from a 4th instance: worth pausing it. One 100k prompt (1/l = 1e-5)
    # gains ~1.8 s, but input-normalized that is worth less than the decoder's pause.
    residents = [policy.Resident("a", ((3, 1000),), 1 / 500)]
    chosen = policy.allocate_prefill_instances([0, 0, 0, 1000], 120000, [2000] * 50, residents, COST.prefill_time_s)
    assert set(chosen) == {0, 1, 2, 3}
    chosen = policy.allocate_prefill_instances([0, 0, 0, 1000], 120000, [100000], residents, COST.prefill_time_s)
    assert set(chosen) == {0, 1, 2}


def test_place_kv_scales_down_to_the_fewest_instances():
    shards = policy.place_kv([3000, 500], [4, 5, 6], [2000, 10000, 8000])
    assert shards == (((5, 3000),), ((6, 500),))  # each on the freest at its turn; 4 is freed
    shards = policy.place_kv([15000], [4, 5, 6], [2000, 10000, 8000])
    assert shards == (((5, 10000), (6, 5000)),)
    with pytest.raises(ValueError, match="do not fit"):
        policy.place_kv([30000], [4, 5], [2000, 10000])


def test_scale_up_and_victim():
    assert policy.scale_up_target([100, 40, 40, 10], 100, excluded={3}) == 1
    assert policy.scale_up_target([100, 100], 100) is None
    assert policy.preemption_victim([(3, "c"), (1, "a"), (7, "z")]) == "z"


# -- the node -------------------------------------------------------------------------------------------
def run_node(specs, capacity, max_prefill=64, num_instances=4):
    cost = COST if num_instances == 4 else EspCostModel(COST.base, num_instances)
    requests = [Request(f"r{i}", prompt_len=p, sampling=SamplingParams(o), arrival_time=t)
                for i, (p, o, t) in enumerate(specs)]  # fmt: skip
    node = EspNode(cost, EspSettings(capacity_tokens=capacity, max_prefill_requests=max_prefill), check=True)
    return node, node.run(requests).freeze(), requests


def check_invariants(node, log, requests, capacity):
    assert max(node.stats.peak_used) <= capacity  # (EspNode also raises at the over-committing call)
    assert node.used == [0] * node.num_instances  # every KV token given back
    by_id = {r.request_id: r for r in requests}
    assert sorted(info.request_id for info in log.requests) == sorted(by_id)  # each logged once
    tokens = np.bincount(log.token_req, minlength=len(requests))
    for i, info in enumerate(log.requests):  # (log order is arrival order)
        if log.rejected[i]:
            assert tokens[i] == 0
            continue
        assert log.finish_reason[i] == "length" and np.isfinite(log.finish_s[i])  # finished, once
        assert tokens[i] == by_id[info.request_id].sampling.max_new_tokens


def test_invariants_on_random_workloads():
    reached = collections.Counter()

    @settings(max_examples=40, deadline=None)
    @example(specs=[(10000, 30, 0.0)], capacity=10010, max_prefill=64)  # outgrows its one instance: scale-up
    @example(specs=[(30000, 5, 0.0), (300, 5, 0.0), (200, 5, 0.0)], capacity=60000, max_prefill=64)  # DP: 2 batches
    @given(specs=st.lists(st.tuples(st.integers(1, 30000), st.integers(1, 60), st.floats(0, 5)), min_size=1, max_size=25),
           capacity=st.sampled_from([8000, 20000, 60000]), max_prefill=st.sampled_from([2, 64]))
    def check(specs, capacity, max_prefill):
        node, log, requests = run_node(specs, capacity, max_prefill)
        check_invariants(node, log, requests, capacity)
        s = node.stats
        reached.update(scale_down=s.scale_downs > 0, scale_up=s.scale_ups > 0, multi_batch=s.multi_batch_plans > 0,
                       preemption=s.preemptions > 0)  # fmt: skip

    check()
    for path in ("scale_down", "scale_up", "multi_batch"):
        assert reached[path] > 0, f"no example reached {path}: {reached}"


def test_scale_down_then_scale_up_by_hand():
    # A lone 10k prompt prefills over all 4 idle instances (ring), its KV lands on one (scale-down);
    # with 10,010-token instances it outgrows that one after 10 decode tokens and scales up.
    node, log, requests = run_node([(10000, 30, 0.0)], capacity=10010)
    check_invariants(node, log, requests, 10010)
    assert node.stats.prefill_batches == 1 and node.stats.scale_downs == 1 and node.stats.scale_ups == 1
    assert log.step_prefill_tokens[0] == 10000
    assert log.step_duration_s[0] == pytest.approx(COST.prefill([10000], 4))


def test_preemption_when_no_instance_has_room():
    # two requests whose outputs outgrow the whole node: the newer one is preempted, recomputed
    # after the older finishes, and both still finish with all their tokens
    node, log, requests = run_node([(3000, 900, 0.0), (3000, 900, 0.001)], capacity=1800)
    check_invariants(node, log, requests, 1800)
    assert node.stats.preemptions >= 1 and log.preemptions[1] >= 1 and log.preemptions[0] == 0


def test_a_request_larger_than_the_node_is_rejected():
    node, log, requests = run_node([(50000, 10, 0.0), (100, 5, 0.0)], capacity=10000)
    assert log.rejected.tolist() == [True, False]
    assert "exceeds the node's KV" in log.finish_reason[0]


def test_nothing_starves_under_a_stream_of_short_requests():
    # a long request at the head, then a stream of short ones: FCFS admission serves it first
    specs = [(30000, 20, 0.0)] + [(200, 20, 0.01 * i) for i in range(1, 200)]
    node, log, requests = run_node(specs, capacity=12000)
    check_invariants(node, log, requests, 12000)
    assert log.first_scheduled_s[0] == 0.0
