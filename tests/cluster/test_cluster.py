"""The cluster loop: one replica equals run_replica, the fast path changes nothing, events (add,
drain, remove, fail) do what they say, and nothing is lost or served twice."""

from __future__ import annotations

import numpy as np
import pytest
from cluster_testing import COST, assert_each_request_served_once, tokens_per_request, workload
from log_testing import assert_same_log

import jaxserve
from jaxserve.cluster import Cluster, ClusterEvent, ReplicaSpec, run_cluster
from jaxserve.cluster import routers
from jaxserve.cluster.faults import continuation
from jaxserve.kv import KVConfig
from jaxserve.metrics import summarize
from jaxserve.runtime import run_replica
from jaxserve.sim import RooflineCostModel, get_hardware, get_model
from jaxserve.sim.executor import SimExecutor

KV = KVConfig(400, 16)


def spec(scheduler="vllm", hardware="a100-80gb", kv=KV) -> ReplicaSpec:
    cost = COST if hardware == "a100-80gb" else RooflineCostModel(get_model("llama-2-7b"), get_hardware(hardware))
    return ReplicaSpec(jaxserve.scheduler.make(scheduler), kv, SimExecutor(cost))


@pytest.mark.parametrize("scheduler", ["vllm", "sarathi", "orca"])
@pytest.mark.parametrize("fast_forward", [False, True])
def test_one_replica_cluster_is_run_replica(scheduler, fast_forward):
    requests = workload(0, 150, rate=25.0)
    alone = run_replica(jaxserve.scheduler.make(scheduler), KV, SimExecutor(COST), requests, fast_forward=fast_forward)
    clustered = run_cluster([spec(scheduler)], routers.make("round_robin"), requests, fast_forward=fast_forward)
    assert_same_log(clustered.freeze(), alone.freeze())


@pytest.mark.parametrize("router", ["round_robin", "shortest_queue", "fair", "freeness"])
def test_the_fast_path_changes_nothing(router):
    requests = workload(1, 200, rate=60.0, clients="AAB")
    events = [ClusterEvent(1.0, "fail", replica=1), ClusterEvent(1.5, "add", spec=spec("sarathi"))]
    logs = [run_cluster([spec(), spec("sarathi", "h100-sxm"), spec()], routers.make(router), requests, events,
                        fast_forward=ff).freeze() for ff in (False, True)]  # fmt: skip
    assert_same_log(*logs)
    np.testing.assert_array_equal(logs[0].step_replica, logs[1].step_replica)
    assert_each_request_served_once(logs[1], requests)


@pytest.mark.parametrize("router", ["round_robin", "fair"])
def test_the_fast_path_changes_nothing_with_chunked_prefills(router):
    """Long prompts make Sarathi replicas take closed-form prefill runs: they must stop where the
    cluster places arrivals on them, as deferred decode runs are cut."""
    requests = [jaxserve.Request(r.request_id, prompt_len=r.prompt_len * 6, sampling=r.sampling, arrival_time=r.arrival_time)
                for r in workload(4, 150, rate=15.0)]  # fmt: skip
    logs = [run_cluster([spec("sarathi", kv=KVConfig(2000, 16)), spec("sarathi", kv=KVConfig(2000, 16))],
                        routers.make(router), requests, fast_forward=ff).freeze() for ff in (False, True)]  # fmt: skip
    assert_same_log(*logs)
    chunk = jaxserve.scheduler.make("sarathi").chunk_size
    assert sum(r.prompt_len > 2 * chunk for r in requests) > 10  # many prompts span several chunks
    assert_each_request_served_once(logs[1], requests)


def test_round_robin_replicas_serve_their_share_as_if_alone():
    requests = workload(2, 120, rate=30.0)
    log = run_cluster([spec("vllm"), spec("sarathi", "h100-sxm")], routers.make("round_robin"), requests).freeze()
    for i, name in enumerate(("vllm", "sarathi")):
        share = [r for r in requests if int(r.request_id[1:]) % 2 == i]
        hardware = ("a100-80gb", "h100-sxm")[i]
        alone = run_replica(jaxserve.scheduler.make(name), KV, spec(name, hardware).executor, share).freeze()
        mine = np.isin([info.request_id for info in log.requests], [r.request_id for r in share])
        np.testing.assert_allclose(log.finish_s[mine], alone.finish_s)
        np.testing.assert_allclose(log.step_end_s[log.step_replica == i], alone.step_end_s)


def test_drain_remove_and_add_change_where_requests_go():
    requests = workload(3, 300, rate=40.0)
    events = [ClusterEvent(2.0, "drain", replica=0), ClusterEvent(3.0, "remove", replica=1),
              ClusterEvent(4.0, "add", spec=spec())]  # fmt: skip
    cluster = Cluster([spec(), spec(), spec()], routers.make("round_robin"))
    log = cluster.run(requests, events).freeze()
    assert_each_request_served_once(log, requests)
    placed = {r: [t for t, _, i in cluster.placements if i == r] for r in range(4)}
    assert max(placed[0]) <= 2.0 and max(placed[1]) <= 3.0  # nothing new after the drain / removal
    assert min(placed[3]) >= 4.0 and len(placed[3]) > 10  # the added replica takes work once it joined
    assert log.step_end_s[log.step_replica == 3].min() > 4.0
    assert [m.status for m in cluster.members] == ["draining", "removed", "up", "up"]
    assert not cluster.members[0].replica.has_unfinished and not cluster.members[1].replica.has_unfinished
    assert sorted(rid for _, rid, _ in cluster.placements) == sorted(r.request_id for r in requests)


def test_a_failed_replica_s_requests_finish_elsewhere_exactly_once():
    requests = workload(4, 200, rate=50.0)
    cluster = Cluster([spec(), spec()], routers.make("shortest_queue"))
    log = cluster.run(requests, [ClusterEvent(1.5, "fail", replica=0)]).freeze()
    assert_each_request_served_once(log, requests)
    m = summarize(log)
    assert m["num_retried"] == int((log.retries > 0).sum()) > 0 and m["num_failed"] == 0
    assert m["lost_tokens"] == log.lost_tokens > 0
    assert (log.step_end_s[log.step_replica == 0] <= 1.5 + 1.0).all()  # its last step ended (it was mid-step)
    assert m["num_finished"] == len(requests)


def test_requests_queued_on_a_failed_replica_are_not_lost():
    """Overloaded: the failed replica holds requests that have no token yet; they start elsewhere."""
    requests = workload(7, 300, rate=200.0)
    log = run_cluster([spec(), spec()], routers.make("round_robin"), requests, [ClusterEvent(0.5, "fail", replica=1)]).freeze()
    assert_each_request_served_once(log, requests)
    first_token = np.full(log.num_requests, np.inf)
    np.minimum.at(first_token, log.token_req, log.token_time_s)
    waiting_at_failure = (log.retries > 0) & (first_token > 0.5)
    assert waiting_at_failure.sum() > 10 and ((log.retries > 0) & (first_token < 0.5)).any()


def test_when_every_replica_fails_the_rest_is_reported_failed_not_lost():
    requests = workload(5, 80, rate=40.0)
    log = run_cluster([spec(), spec()], routers.make("round_robin"), requests,
                      [ClusterEvent(0.5, "fail", replica=0), ClusterEvent(0.7, "fail", replica=1)]).freeze()  # fmt: skip
    reasons = set(log.finish_reason)
    assert "failed: no replica is accepting requests" in reasons
    assert log.failed.sum() + sum(r in ("stop", "length") for r in log.finish_reason) == len(requests)
    m = summarize(log)
    assert m["num_failed"] == int(log.failed.sum()) > 0
    assert any(k.startswith("no replica") for k in m["failures"])


def test_continuation_appends_delivered_tokens():
    r = jaxserve.Request("a", prompt_token_ids=[5, 6, 7], sampling=jaxserve.SamplingParams(10), arrival_time=1.0)
    c = continuation(r, (8, 9, 4), 2, now=3.0)
    assert c.prompt_token_ids == (5, 6, 7, 8, 9) and c.sampling.max_new_tokens == 8 and c.arrival_time == 3.0
    length_only = continuation(jaxserve.Request("b", prompt_len=30, sampling=jaxserve.SamplingParams(4)), (), 3, now=2.0)
    assert length_only.prompt_len == 33 and length_only.sampling.max_new_tokens == 1
    with pytest.raises(ValueError, match="has all its tokens"):
        continuation(r, (), 10, now=3.0)


@pytest.mark.parametrize("event, needle", [
    (lambda: ClusterEvent(1.0, "explode", replica=0), "kind must be one of"),
    (lambda: ClusterEvent(-1.0, "fail", replica=0), "time_s must be >= 0"),
    (lambda: ClusterEvent(1.0, "add"), "'add' takes a spec"),
    (lambda: ClusterEvent(1.0, "fail", replica=0, spec=spec()), "'add' takes a spec"),
])  # fmt: skip
def test_bad_cluster_events(event, needle):
    with pytest.raises(ValueError, match=needle):
        event()


def test_an_event_for_a_replica_that_does_not_exist_names_it():
    with pytest.raises(ValueError, match=r"no replica 5 \(replicas 0..1\)"):
        run_cluster([spec(), spec()], routers.make("round_robin"), workload(6, 5, 10.0), [ClusterEvent(0.1, "drain", replica=5)])
    with pytest.raises(ValueError, match="at least one replica"):
        Cluster([], routers.make("round_robin"))
