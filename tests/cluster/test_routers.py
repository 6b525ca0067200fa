"""Routers: each policy's choice on hand-built views, and (hypothesis) every router on random
workloads and cluster events loses nothing, serves nothing twice and is deterministic."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import jaxserve
from jaxserve.cluster import ClusterEvent, ClusterView, ReplicaSpec, ReplicaView, run_cluster
from jaxserve.cluster import routers
from jaxserve.cluster.view import no_cache
from jaxserve.kv import KVConfig
from jaxserve.metrics import service_trace
from jaxserve.sim import RooflineCostModel, get_hardware, get_model
from jaxserve.sim.executor import SimExecutor

from cluster_testing import assert_each_request_served_once

COST = RooflineCostModel(get_model("llama-2-7b"), get_hardware("a100-80gb"))


def replica(index, *, waiting=0, running=0, queued=0, used=0, blocks=100, accepting=True, high=0, cached=no_cache):
    return ReplicaView(index, accepting, waiting, running, queued, used, blocks, 16, high, cached)


def view(*replicas, served=None) -> ClusterView:
    from jaxserve.persistent import EMPTY_MAP

    return ClusterView(0.0, tuple(replicas), EMPTY_MAP.update(served or {}))


def request(i, prompt_len=32, client="A", ids=None, priority=0):
    return jaxserve.Request(f"q{i}", prompt_token_ids=ids, prompt_len=None if ids else prompt_len,
                            sampling=jaxserve.SamplingParams(4), client_id=client, priority=priority)  # fmt: skip


def place(router, v, requests, state=None):
    state = router.init(len(v.replicas)) if state is None else state
    for r in requests:
        state = router.submit(state, r)
    state, placements = router.dispatch(state, v)
    return state, [(r.request_id, i) for r, i in placements]


def test_registry_lists_every_router_and_names_bad_options():
    assert routers.available() == ("fair", "freeness", "least_kv", "prefix_affinity", "round_robin", "shortest_queue")
    with pytest.raises(ValueError, match="unknown router 'nope'; available: fair, freeness"):
        routers.make("nope")
    with pytest.raises(ValueError, match="router 'fair' has no option 'max_wait'; options: max_waiting"):
        routers.make("fair", max_wait=3)
    with pytest.raises(ValueError, match="max_waiting must be an int >= 1"):
        routers.make("fair", max_waiting=0)


def test_round_robin_skips_replicas_not_accepting():
    v = view(replica(0), replica(1, accepting=False), replica(2))
    _, p = place(routers.make("round_robin"), v, [request(i) for i in range(4)])
    assert [i for _, i in p] == [0, 2, 0, 2]


def test_shortest_queue_and_least_kv_see_the_requests_they_just_placed():
    v = view(replica(0, waiting=2, running=3), replica(1, running=1), replica(2, running=4, used=0))
    _, p = place(routers.make("shortest_queue"), v, [request(i) for i in range(4)])
    assert [i for _, i in p] == [1, 1, 1, 1]  # 1 -> 2 -> 3 -> 4 requests: still <= the others (5, 4; ties: index)
    v = view(replica(0, used=50), replica(1, used=10, blocks=20), replica(2, used=30))
    _, p = place(routers.make("least_kv"), v, [request(0, 160), request(1, 160)])
    assert [i for _, i in p] == [2, 2]  # loads 0.5 / 0.5 / 0.3, then 0.4 after 10 queued blocks


def test_freeness_is_llumnix_s_formula():
    r = replica(0, running=4, used=40, queued=160, blocks=100, high=2)
    assert routers.freeness(r) == (100 - 40 - 10) / 4 and routers.freeness(r, headroom_blocks=5) == (100 - 50 - 10) / 4
    v = view(replica(0, running=1, used=90), replica(1, running=10, used=20), replica(2, accepting=False))
    _, p = place(routers.make("freeness"), v, [request(0)])
    assert p == [("q0", 0)]  # (100 - 90) / 1 = 10 beats (100 - 20) / 10 = 8: per-request room counts


def test_prefix_affinity_follows_the_prefix_unless_load_is_uneven():
    router = routers.make("prefix_affinity", balance_abs_threshold=4)
    shared = list(range(1, 65))  # 4 blocks of 16
    v = view(replica(0), replica(1), replica(2))
    state, p = place(router, v, [request(0, ids=shared + [7])])
    assert p == [("q0", 0)]  # nothing cached anywhere: the shortest queue
    v = view(replica(0, running=3), replica(1), replica(2))
    state, p = place(router, v, [request(1, ids=shared + [9, 9])], state)
    assert p == [("q1", 0)]  # its 4 leading blocks were sent to 0 (the router's record), despite 3 running there
    _, p = place(router, v, [request(2, ids=list(range(100, 140)))], state)
    assert p == [("q2", 1)]  # no match: the shortest queue
    busy = view(replica(0, running=20), replica(1, running=2), replica(2, running=2))
    _, p = place(router, busy, [request(3, ids=shared + [5])], state)
    assert p == [("q3", 1)]  # 20 - 2 > 4 and 20 > 1.5 x 2: imbalanced, load wins over the cache
    real = view(replica(0), replica(1), replica(2, cached=lambda r: 4))
    _, p = place(router, real, [request(4, ids=shared + [1])])
    assert p == [("q4", 2)]  # a replica's real prefix cache counts too


def test_fair_dispatch_holds_work_and_serves_the_least_served_client():
    router = routers.make("fair", max_waiting=1)
    full = view(replica(0, waiting=1), replica(1, waiting=1))
    state, p = place(router, full, [request(0, client="A"), request(1, client="B")])
    assert p == [] and [r.request_id for r in router.pending(state)] == ["q0", "q1"]  # held at the router
    room = view(replica(0, waiting=1), replica(1), served={"A": 100, "B": 10})
    state, p = place(router, room, [], state)
    assert p == [("q1", 1)]  # one slot: B has the smaller counter (2 x 10 output tokens < 2 x 100)
    assert [r.request_id for r in router.pending(state)] == ["q0"]


def test_fair_dispatch_gives_clients_equal_service_across_replicas():
    """Two clients overload a 2-replica cluster, B at twice A's rate: shortest-queue routing serves
    them in proportion to their rates, fair dispatch equally (VTC's result, kept across replicas)."""
    rng = np.random.default_rng(0)
    reqs = []
    for client, rate in (("A", 6.0), ("B", 12.0)):
        times = np.cumsum(rng.exponential(1 / rate, int(rate * 60)))
        reqs += [jaxserve.Request(f"{client}{i}", prompt_len=256, sampling=jaxserve.SamplingParams(256),
                                  arrival_time=float(t), client_id=client) for i, t in enumerate(times)]  # fmt: skip
    kv = KVConfig(400, 16)
    shares = {}
    for name in ("shortest_queue", "fair"):
        specs = [ReplicaSpec(jaxserve.scheduler.make("vllm"), kv, SimExecutor(COST)) for _ in range(2)]
        log = run_cluster(specs, routers.make(name), reqs, max_sim_time_s=40.0).freeze()
        trace = service_trace(log)
        service = dict(zip(trace.clients, trace.service[:, -1]))
        shares[name] = service["A"] / (service["A"] + service["B"])
    assert shares["shortest_queue"] < 0.4 and 0.45 < shares["fair"] < 0.55, shares


# -- properties ----------------------------------------------------------------------------------------


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 80))
    rate = draw(st.floats(2.0, 200.0))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, n))
    shared = list(range(1, 33))
    reqs = []
    for i, t in enumerate(times):
        kind = rng.integers(3)
        if kind == 0:  # a prompt sharing a prefix with others (prefix routing's path)
            ids = shared + rng.integers(1, 500, int(rng.integers(1, 40))).tolist()
            reqs.append(jaxserve.Request(f"r{i}", prompt_token_ids=ids, sampling=jaxserve.SamplingParams(int(rng.integers(1, 60))),
                                         arrival_time=float(t), client_id="AB"[i % 2], priority=-int(rng.integers(2))))
        else:
            reqs.append(jaxserve.Request(f"r{i}", prompt_len=int(rng.integers(1, 300 if kind == 1 else 900)),
                                         sampling=jaxserve.SamplingParams(int(rng.integers(1, 120))),
                                         arrival_time=float(t), client_id="AB"[i % 2]))  # fmt: skip
    num = draw(st.integers(1, 4))
    events = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["fail", "drain", "remove", "add"]))
        t = draw(st.floats(0.0, float(times[-1]) + 1.0))
        events.append((t, kind, None if kind == "add" else draw(st.integers(0, num - 1))))
    router = draw(st.sampled_from(routers.available()))
    blocks = draw(st.sampled_from([40, 400]))
    return reqs, num, events, router, blocks


def build(num, events, blocks):
    def spec():
        return ReplicaSpec(jaxserve.scheduler.make("vllm", enable_prefix_caching=True), KVConfig(blocks, 16), SimExecutor(COST))

    specs = [spec() for _ in range(num)]
    return specs, [ClusterEvent(t, "add", spec=spec()) if kind == "add" else ClusterEvent(t, kind, replica=r)
                   for t, kind, r in events]  # fmt: skip


def test_routers_lose_nothing_serve_nothing_twice_and_are_deterministic():
    """And its examples reach every router, faults with retries, a cluster with no replica left,
    drains, removals, added replicas and rejections."""
    covered: collections.Counter = collections.Counter()

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
    @given(scenario=scenarios())
    def run(scenario):
        reqs, num, events, router, blocks = scenario
        specs, evs = build(num, events, blocks)
        log = run_cluster(specs, routers.make(router), reqs, evs).freeze()
        assert_each_request_served_once(log, reqs)
        assert "unfinished" not in log.finish_reason  # no time limit: all served, rejected or failed
        specs, evs = build(num, events, blocks)
        again = run_cluster(specs, routers.make(router), reqs, evs).freeze()
        np.testing.assert_array_equal(log.step_end_s, again.step_end_s)
        np.testing.assert_array_equal(log.step_replica, again.step_replica)
        assert log.finish_reason == again.finish_reason
        event(f"router {router}")
        covered["router " + router] += 1
        covered["retried after a failure"] += int(log.retries.sum() > 0)
        covered["failed: no replica left"] += int(log.failed.any())
        covered["drain or remove"] += int(any(e.kind in ("drain", "remove") for e in evs))
        covered["replica added"] += int(any(e.kind == "add" for e in evs))
        covered["rejected"] += int(log.rejected.any())

    run()
    for path in ["retried after a failure", "failed: no replica left", "drain or remove", "replica added", "rejected",
                 *("router " + r for r in routers.available())]:  # fmt: skip
        assert covered[path] > 0, (path, dict(covered))
