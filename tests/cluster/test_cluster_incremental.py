"""The cluster's incremental API (what a real-time driver uses): arrivals submitted as they come and
the loop advanced in pieces give the very log of ``run`` (colocated with migration and events, and
phase pools); ``abort`` takes a request out wherever it is and frees its blocks; ``wait_until``
moves ready replicas to a driver's clock."""

from __future__ import annotations

import math

import pytest
from cluster_testing import COST, Pinned, assert_each_request_served_once, workload
from log_testing import assert_same_log

import jaxserve
from jaxserve.cluster import Cluster, ClusterEvent, ReplicaSpec, routers
from jaxserve.cluster.handoff import PoolSettings
from jaxserve.cluster.kv_transfer import KVLink
from jaxserve.cluster.migration import MigrationSettings
from jaxserve.cluster.migration_policy import LlumnixPolicy
from jaxserve.kv import KVConfig
from jaxserve.sim.executor import SimExecutor

BYTES_PER_BLOCK = 16 * COST.kv_bytes_per_token_device


def spec(num_blocks=150, scheduler="vllm", role="mixed") -> ReplicaSpec:
    return ReplicaSpec(jaxserve.scheduler.make(scheduler), KVConfig(num_blocks, 16), SimExecutor(COST),
                       kv_bytes_per_block=BYTES_PER_BLOCK, role=role)  # fmt: skip


def colocated(fast_forward=True):
    return Cluster([spec(), spec(), spec(120, "sarathi")], Pinned(0), fast_forward=fast_forward, step_errors="raise",
                   migration=MigrationSettings("live", LlumnixPolicy(0.0, 3.0), interval_s=0.1))  # fmt: skip


def pooled(fast_forward=True):
    specs = [spec(role="prefill"), spec(role="decode"), spec(role="decode"), spec()]
    return Cluster(specs, routers.make("round_robin"), fast_forward=fast_forward, step_errors="raise",
                   pools=PoolSettings(KVLink(2e9, 1e-4)))  # fmt: skip


EVENTS = {colocated: [ClusterEvent(2.0, "drain", replica=1), ClusterEvent(3.0, "fail", replica=2),
                      ClusterEvent(3.5, "add", spec=spec())],
          pooled: [ClusterEvent(2.5, "fail", replica=1)]}  # fmt: skip


def piecewise(cluster, requests, events):
    """Submits each request just before the loop reaches its arrival, advancing between them."""
    for e in events:
        cluster.add_event(e)
    for r in sorted(requests, key=lambda r: r.arrival_time):
        cluster.advance(math.nextafter(r.arrival_time, -math.inf))  # (ties: an arrival goes before steps)
        cluster.submit(r)
    cluster.advance()
    return cluster.finish()


@pytest.mark.parametrize("make", [colocated, pooled])
@pytest.mark.parametrize("fast_forward", [False, True])
def test_submitting_as_requests_come_gives_the_log_of_run(make, fast_forward):
    requests = workload(5, 120, rate=40.0)
    whole = make(fast_forward)
    log = whole.run(requests, EVENTS[make]).freeze()
    parts = make(fast_forward)
    assert_same_log(log, piecewise(parts, requests, EVENTS[make]).freeze())
    assert_each_request_served_once(log, requests)
    if make is colocated:
        assert len(whole.migrator.records) > 3
        assert [r.outcome for r in whole.migrator.records] == [r.outcome for r in parts.migrator.records]
    else:
        assert len(whole.handoff.records) == len(parts.handoff.records) > 50


def test_submit_refuses_a_repeated_id_and_an_arrival_in_the_past():
    cluster = colocated()
    r = jaxserve.Request("a", prompt_len=10, sampling=jaxserve.SamplingParams(4), arrival_time=1.0)
    cluster.submit(r)
    with pytest.raises(ValueError, match="already submitted"):
        cluster.submit(r)
    cluster.advance(2.0)
    with pytest.raises(ValueError, match="before the cluster's clock"):
        cluster.submit(jaxserve.Request("b", prompt_len=10, sampling=jaxserve.SamplingParams(4), arrival_time=0.5))
    assert cluster.next_time() == math.inf  # "a" was served


def held_blocks(cluster) -> int:
    return sum(m.replica.state.kv.device.num_used for m in cluster.members if m.live)


def test_abort_takes_a_request_out_wherever_it_is():
    cluster = Cluster([spec(), spec()], routers.make("round_robin"), fast_forward=False)
    reqs = [jaxserve.Request(f"r{i}", prompt_len=100, sampling=jaxserve.SamplingParams(50), arrival_time=0.1 * i)
            for i in range(4)]  # fmt: skip
    for r in reqs:
        cluster.submit(r)
    cluster.advance(0.25)  # r0..r2 placed and running, r3 not arrived yet
    assert cluster.abort("r3") and cluster.abort("r1") and cluster.abort("unknown")
    assert "r1" not in cluster.members[1].requests
    cluster.advance()
    log = cluster.finish().freeze()
    served = {info.request_id for i, info in enumerate(log.requests) if log.finish_reason[i] == "length"}
    assert served == {"r0", "r2"} and "r3" not in {info.request_id for info in log.requests}
    assert held_blocks(cluster) == 0


def test_abort_waits_while_a_request_is_between_replicas():
    cluster = Cluster([spec(role="prefill"), spec(role="decode")], routers.make("round_robin"), fast_forward=False,
                      pools=PoolSettings(KVLink(1e6, 1e-4)))  # a slow link: the handoff takes a while  # fmt: skip
    cluster.submit(jaxserve.Request("a", prompt_len=200, sampling=jaxserve.SamplingParams(20), arrival_time=0.0))
    while not cluster.handoff.active:
        cluster.advance(cluster.next_time())
    assert not cluster.abort("a")  # its KV is on the way: not yet
    cluster.advance(cluster.handoff.next_time())
    assert cluster.abort("a")  # landed on the decode replica: out
    cluster.advance()
    cluster.finish()
    assert held_blocks(cluster) == 0 and cluster.next_time() == math.inf


def test_a_request_aborted_at_the_router_is_never_placed():
    cluster = Cluster([spec()], routers.make("fair", max_waiting=1), fast_forward=False)
    for i in range(3):
        cluster.submit(jaxserve.Request(f"r{i}", prompt_len=50, sampling=jaxserve.SamplingParams(10), arrival_time=0.0))
    cluster.advance(0.0)
    held = [r.request_id for r in cluster.router.pending(cluster.router_state)]
    assert held, "fair dispatch holds requests back"
    assert cluster.abort(held[-1])
    cluster.advance()
    cluster.finish()
    assert held[-1] not in {rid for _, rid, _ in cluster.placements}


def test_wait_until_moves_ready_replicas_to_the_driver_clock():
    cluster = Cluster([spec(), spec()], routers.make("round_robin"), fast_forward=False)
    cluster.submit(jaxserve.Request("a", prompt_len=10, sampling=jaxserve.SamplingParams(3), arrival_time=0.0))
    cluster.advance(0.0)  # placed on replica 0, its first step run at 0: the next one is due at its end
    assert 0 < cluster.next_time() < 5.0
    cluster.wait_until(5.0)
    assert cluster.members[0].replica.now == 5.0 and cluster.members[1].replica.now == 0.0  # (1 is idle)
    assert cluster.now == 5.0 and cluster.next_time() == 5.0
    cluster.advance(5.0)
    log = cluster.log.freeze()
    assert len(log.step_end_s) == 2 and log.step_end_s[1] - log.step_duration_s[1] == 5.0
