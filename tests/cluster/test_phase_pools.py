"""Phase pools (DistServe, Splitwise): transfer timing computed by hand, decode admission waiting on
the transfer and on free blocks, links shared in order, every request served exactly once through
handoffs, faults on either side, and the fast path changing nothing."""

from __future__ import annotations

import collections
import dataclasses

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from cluster_testing import COST, Pinned, assert_each_request_served_once, workload
from log_testing import assert_same_log

import jaxserve
from jaxserve.cluster import Cluster, ClusterEvent, ReplicaSpec
from jaxserve.cluster import routers
from jaxserve.cluster.handoff import PoolSettings
from jaxserve.cluster.kv_transfer import KVLink, transfer_end
from jaxserve.cluster.migration import MigrationSettings
from jaxserve.kv import KVConfig
from jaxserve.sim.executor import SimExecutor

KV = KVConfig(400, 16)
BYTES_PER_BLOCK = KV.block_size * COST.kv_bytes_per_token_device  # 16 tokens x 512 KiB (llama-2-7b, bf16)
LINK = KVLink(bandwidth=1e9, latency_s=1e-3)  # slow enough that copies show in the timeline


def spec(role: str, kv: KVConfig = KV, scheduler: str = "vllm") -> ReplicaSpec:
    return ReplicaSpec(jaxserve.scheduler.make(scheduler), kv, SimExecutor(COST), role=role,
                       kv_bytes_per_block=BYTES_PER_BLOCK, num_layers=COST.model.num_layers)  # fmt: skip


def request(rid: str, prompt_len: int, max_new: int, t: float = 0.0) -> jaxserve.Request:
    return jaxserve.Request(rid, prompt_len=prompt_len, sampling=jaxserve.SamplingParams(max_new), arrival_time=t)


def run(specs, requests, **pools):
    cluster = Cluster(specs, routers.make("round_robin"), step_errors="raise", pools=PoolSettings(**{"link": LINK, **pools}))
    return cluster, cluster.run(requests).freeze()


def steps_of(log, replica: int):
    """(start, end) of each step replica ``replica`` ran, in order."""
    mine = log.step_replica == replica
    return list(zip((log.step_end_s - log.step_duration_s)[mine].tolist(), log.step_end_s[mine].tolist()))


def token_times(log, rid: str) -> np.ndarray:
    i = [info.request_id for info in log.requests].index(rid)
    return np.sort(log.token_time_s[log.token_req == i])


# -- timing by hand ---------------------------------------------------------------------------------
def test_transfer_end_by_hand():
    link = KVLink(bandwidth=100.0, latency_s=1.0)  # 100 bytes/s
    # whole: starts when both the KV is ready and the link is free
    assert transfer_end(link, 500.0, ready_s=10.0) == 10.0 + 1.0 + 5.0
    assert transfer_end(link, 500.0, ready_s=10.0, link_free_s=12.0) == 12.0 + 1.0 + 5.0
    # layer by layer, a fast link: only the last layer's share (500/4 bytes) follows the step's end
    assert transfer_end(link, 500.0, ready_s=20.0, step_start_s=0.0, num_layers=4, step_bytes=500.0) == 20.0 + 1.25 + 1.0
    # layers every 2.5 s, each sent in 1.25 s: the last leaves at 10, arrives at 11.25
    assert transfer_end(link, 500.0, ready_s=10.0, step_start_s=0.0, num_layers=4, step_bytes=500.0) == 10.0 + 1.25 + 1.0
    # a slow link (5 s per layer): the first layer is ready at 2.5 s, then the link is the bottleneck
    assert transfer_end(link, 2000.0, ready_s=10.0, step_start_s=0.0, num_layers=4, step_bytes=2000.0) == 2.5 + 20.0 + 1.0
    # a busy link: it sends everything from when it is free
    assert transfer_end(link, 500.0, ready_s=10.0, step_start_s=0.0, num_layers=4, step_bytes=500.0,
                        link_free_s=9.0) == 9.0 + 5.0 + 1.0  # fmt: skip
    # an earlier chunk's 400 bytes were ready at the step's start; the step made 100 over 4 layers
    assert transfer_end(link, 500.0, ready_s=2.0, step_start_s=0.0, num_layers=4, step_bytes=100.0) == 0.0 + 5.0 + 1.0
    assert transfer_end(link, 500.0, ready_s=8.0, step_start_s=0.0, num_layers=4, step_bytes=100.0) == 8.0 + 0.25 + 1.0
    with pytest.raises(ValueError, match="num_layers"):
        transfer_end(link, 500.0, ready_s=1.0, step_start_s=2.0)


def test_a_request_decodes_on_the_decode_replica_after_its_whole_transfer():
    cluster, log = run([spec("prefill"), spec("decode")], [request("a", 100, 5)])
    (prefill,) = steps_of(log, 0)  # the prompt, sampling the first token
    decode = steps_of(log, 1)
    assert len(decode) == 4  # tokens 2..5
    (record,) = cluster.handoff.records
    num_blocks = -(-100 // KV.block_size)
    assert (record.num_blocks, record.num_bytes) == (num_blocks, num_blocks * BYTES_PER_BLOCK)
    assert record.ready_s == prefill[1] and record.destination == 1 and record.outcome == "done"
    end = prefill[1] + LINK.latency_s + num_blocks * BYTES_PER_BLOCK / LINK.bandwidth
    assert record.end_s == pytest.approx(end, rel=1e-12)
    assert decode[0][0] == pytest.approx(end, rel=1e-12)  # decode admission waited for the copy
    times = token_times(log, "a")
    assert times[0] == prefill[1] and times[1] == decode[0][1]  # TTFT is the prefill's; TPOT pays the copy
    assert [m.replica.state.kv.device.num_used for m in cluster.members] == [0, 0]


def test_layer_overlap_hides_the_copy_behind_the_prefill():
    cluster, log = run([spec("prefill"), spec("decode")], [request("a", 1000, 3)], overlap="layer")
    (prefill,) = steps_of(log, 0)
    (record,) = cluster.handoff.records
    assert record.overlapped
    expected = transfer_end(LINK, record.num_bytes, ready_s=prefill[1], step_start_s=prefill[0],
                            num_layers=COST.model.num_layers, step_bytes=record.num_bytes)  # fmt: skip
    assert record.end_s == pytest.approx(expected, rel=1e-12)
    whole = prefill[1] + LINK.transfer_s(record.num_bytes)
    assert record.end_s < whole  # the copy ran under the prefill
    assert steps_of(log, 1)[0][0] == pytest.approx(record.end_s, rel=1e-12)


@pytest.mark.parametrize("scope", ["source", "cluster"])
def test_transfers_queue_on_a_shared_link_in_order(scope):
    # Two prefill replicas finish identical prompts at the same moment: on one cluster-wide link
    # the second copy waits for the first; with a link per prefill replica they run side by side.
    specs = [spec("prefill"), spec("prefill"), spec("decode")]
    cluster, log = run(specs, [request("a", 500, 2), request("b", 500, 2)], link_scope=scope)
    a, b = sorted(cluster.handoff.records, key=lambda r: r.request_id)
    assert a.ready_s == b.ready_s
    copy = LINK.transfer_s(a.num_bytes)
    assert a.end_s == pytest.approx(a.ready_s + copy, rel=1e-12)
    assert b.end_s == pytest.approx(a.ready_s + copy * (2 if scope == "cluster" else 1), rel=1e-12)


def test_decode_admission_waits_for_free_blocks_while_the_prefill_replica_holds_the_kv():
    # The decode pool holds one request's KV at a time: b's handoff waits for a to finish, its KV
    # kept on the prefill replica meanwhile, and then decodes correctly.
    small = KVConfig(40, 16)
    requests = [request("a", 400, 40), request("b", 400, 10, t=0.001)]
    held = []
    cluster = Cluster([spec("prefill"), spec("decode", small)], routers.make("round_robin"), step_errors="raise",
                      pools=PoolSettings(link=LINK))  # fmt: skip
    prefill = cluster.members[0]
    original = cluster.handoff.poke

    def poke(now):
        if cluster.handoff.waiting:
            held.append(prefill.replica.state.kv.device.num_used)
        return original(now)

    cluster.handoff.poke = poke
    log = cluster.run(requests).freeze()
    assert_each_request_served_once(log, requests)
    rec = {r.request_id: r for r in cluster.handoff.records}
    a_done = token_times(log, "a")[-1]
    assert rec["b"].ready_s < a_done <= rec["b"].start_s  # it waited for a's blocks
    assert held and min(held) >= 400 // 16  # b's 25 blocks stayed on the prefill replica while it waited
    assert token_times(log, "b")[1] > rec["b"].end_s
    assert [m.replica.state.kv.device.num_used for m in cluster.members] == [0, 0]


def test_a_mixed_replica_takes_the_handoff_when_the_decode_pool_is_full():
    small = KVConfig(40, 16)
    specs = [spec("prefill"), spec("decode", small), spec("mixed")]
    requests = [request("a", 400, 40), request("b", 400, 10, t=0.001)]
    cluster = Cluster(specs, Pinned(0), step_errors="raise", pools=PoolSettings(link=LINK))
    log = cluster.run(requests).freeze()
    assert_each_request_served_once(log, requests)
    rec = {r.request_id: r for r in cluster.handoff.records}
    assert (rec["a"].destination, rec["b"].destination) == (1, 2)
    assert rec["b"].start_s == rec["b"].ready_s  # it did not wait


def test_a_request_no_decode_replica_can_hold_is_failed_with_the_reason():
    tiny = KVConfig(8, 16)
    requests = [request("big", 300, 4), request("ok", 50, 4)]
    cluster, log = run([spec("prefill"), spec("decode", tiny)], requests)
    reasons = dict(zip([i.request_id for i in log.requests], log.finish_reason))
    assert reasons["ok"] == "length"
    assert reasons["big"] == ("failed: no decode or mixed replica can hold it (prompt + max_new_tokens = 304 tokens; "
                              "replica 1's pool holds 128 tokens)")
    assert [m.replica.state.kv.device.num_used for m in cluster.members] == [0, 0]


def test_a_router_sees_a_prefill_replica_busy_until_its_step_ends():
    # The prefill replica's long step hands its request off at the step's start (the cluster runs a
    # step atomically); until the step ends, the request is still its work: join-shortest-queue must
    # send the next arrival to the idle prefill replica, not pile it behind the long prompt.
    requests = [request("long", 3000, 4), request("short", 16, 4, t=0.01)]
    cluster = Cluster([spec("prefill"), spec("prefill"), spec("decode")], routers.make("shortest_queue"),
                      step_errors="raise", pools=PoolSettings(link=LINK))  # fmt: skip
    log = cluster.run(requests).freeze()
    placed = {rid: i for _, rid, i in cluster.placements if i != 2}
    assert placed == {"long": 0, "short": 1}
    assert token_times(log, "short")[0] < token_times(log, "long")[0]  # it did not wait for the long prefill


# -- whole runs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["vllm", "sarathi"])
@pytest.mark.parametrize("pick", ["least_kv", "shortest_queue"])
def test_every_request_is_served_once_through_handoffs(scheduler, pick):
    requests = workload(3, 250, rate=20.0)
    specs = [spec("prefill", scheduler=scheduler), spec("prefill", scheduler=scheduler),
             spec("decode", KVConfig(150, 16)), spec("decode", KVConfig(150, 16))]  # fmt: skip
    cluster, log = run(specs, requests, decode_pick=pick, overlap="layer")
    assert_each_request_served_once(log, requests)
    assert not any(r.startswith("failed") for r in log.finish_reason)
    records = cluster.handoff.records
    one_token = sum(r.sampling.max_new_tokens == 1 for r in requests)  # finished by their prefill
    assert sum(r.outcome == "done" for r in records) == len(requests) - one_token
    assert any(r.start_s > r.ready_s for r in records)  # the small decode pools made some wait
    # decode replicas compute prompts only to recompute requests they preempted
    decode_steps = np.isin(log.step_replica, [2, 3])
    preempted = log.preemptions > 0
    recompute = (log.prompt_len[preempted] + np.array([r.sampling.max_new_tokens for r in requests])[preempted]).sum()
    assert log.step_prefill_tokens[decode_steps].sum() <= recompute * log.preemptions.max(initial=0)
    assert [m.replica.state.kv.device.num_used for m in cluster.members] == [0, 0, 0, 0]


@pytest.mark.parametrize("scheduler, overlap, scale", [("vllm", "none", 1), ("sarathi", "layer", 6)])
def test_the_fast_path_changes_nothing_with_pools(scheduler, overlap, scale):
    # scale 6: long prompts, chunked by Sarathi; decode replicas in deferred runs are ranked as of now
    requests = [jaxserve.Request(r.request_id, prompt_len=r.prompt_len * scale, sampling=r.sampling,
                                 arrival_time=r.arrival_time) for r in workload(4, 200, rate=15.0)]  # fmt: skip
    runs = []
    for fast in (False, True):
        specs = [spec("prefill", scheduler=scheduler), spec("decode", KVConfig(2000, 16)), spec("decode", KVConfig(2000, 16))]
        cluster = Cluster(specs, routers.make("round_robin"), fast_forward=fast, step_errors="raise",
                          pools=PoolSettings(link=LINK, overlap=overlap))  # fmt: skip
        runs.append((cluster.run(requests).freeze(), [dataclasses.astuple(r) for r in cluster.handoff.records]))
    assert_same_log(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and len(runs[0][1]) > 100


@pytest.mark.parametrize("failing", [0, 2])
def test_a_failed_replica_on_either_side_loses_nothing(failing):
    requests = workload(5, 200, rate=20.0)
    specs = [spec("prefill"), spec("prefill"), spec("decode"), spec("decode")]
    cluster = Cluster(specs, routers.make("round_robin"), step_errors="raise", pools=PoolSettings(link=LINK))
    log = cluster.run(requests, [ClusterEvent(3.0, "fail", replica=failing)]).freeze()
    assert_each_request_served_once(log, requests)
    assert log.retries.sum() > 0
    outcomes = [r.outcome for r in cluster.handoff.records]
    assert any(o.startswith(f"aborted: {'source' if failing == 0 else 'destination'} replica failed") for o in outcomes)
    assert all(m.replica.state.kv.device.num_used == 0 for m in cluster.members if m.live)


# -- random pools ---------------------------------------------------------------------------------------
REACHED: collections.Counter = collections.Counter()


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(5, 60), rate=st.floats(5.0, 80.0),
       prefill=st.integers(1, 2), decode=st.integers(0, 2), mixed=st.integers(0, 1),
       decode_blocks=st.integers(12, 200), overlap=st.sampled_from(["none", "layer"]),
       scope=st.sampled_from(["source", "cluster"]), pick=st.sampled_from(["least_kv", "shortest_queue"]),
       bandwidth=st.sampled_from([25e9, 2e8]), fail=st.one_of(st.none(), st.tuples(st.floats(0.0, 4.0), st.integers(0, 4))),
       scheduler=st.sampled_from(["vllm", "sarathi"]))  # fmt: skip
def test_random_phase_pools_lose_nothing_and_leak_nothing(seed, n, rate, prefill, decode, mixed, decode_blocks, overlap,
                                                          scope, pick, bandwidth, fail, scheduler):
    """Random pools, pool sizes, links and a failure: every request is served once or failed with a
    reason, decode replicas take no arrivals, transfers are timed in order, and no block leaks."""
    if decode + mixed == 0:
        decode = 1
    specs = ([spec("prefill", scheduler=scheduler)] * prefill + [spec("decode", KVConfig(decode_blocks, 16))] * decode
             + [spec("mixed", KVConfig(decode_blocks, 16))] * mixed)  # fmt: skip
    requests = workload(seed, n, rate)
    events = [] if fail is None or fail[1] >= len(specs) else [ClusterEvent(fail[0], "fail", replica=fail[1])]
    cluster = Cluster(specs, routers.make("shortest_queue"), step_errors="raise",
                      pools=PoolSettings(KVLink(bandwidth, 1e-4), scope, overlap, pick))  # fmt: skip
    log = cluster.run(requests, events).freeze()
    assert_each_request_served_once(log, requests)
    decode_replicas = {m.index for m in cluster.members if m.role == "decode"}
    arrivals = {rid for rid in (r.request_id for r in requests)}
    routed = [(rid, i) for t, rid, i in cluster.placements if rid in arrivals and i in decode_replicas]
    moved = {(r.request_id, r.destination) for r in cluster.handoff.records if r.outcome == "done"}
    assert all(p in moved for p in routed), "a decode replica got a request the router placed, not a handoff"
    for r in cluster.handoff.records:
        REACHED[r.outcome.split(":")[0]] += 1
        if r.outcome == "done":
            assert r.ready_s <= r.start_s <= r.end_s and r.num_bytes > 0
            REACHED["waited"] += r.start_s > r.ready_s
            REACHED["overlapped"] += r.overlapped
            REACHED["to mixed"] += cluster.members[r.destination].role == "mixed"
    REACHED["replica failed"] += bool(events) and any(o.outcome.startswith("aborted") for o in cluster.handoff.records)
    for m in cluster.members:
        if m.live:
            state = m.replica.state
            assert state.kv.device.num_used == 0 and not state.incoming and not state.outgoing, m.index


def test_random_phase_pools_reached_every_path():
    """Runs after the property test in this module: its examples must have reached each path."""
    for path in ("done", "waited", "overlapped", "to mixed", "failed", "aborted", "replica failed"):
        assert REACHED[path] > 0, f"no example reached {path!r}: {dict(REACHED)}"


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_phase_pools_are_clear_errors():
    with pytest.raises(ValueError, match="role must be one of"):
        spec("prompt")
    with pytest.raises(ValueError, match="cannot serve both phases"):
        Cluster([spec("prefill"), spec("prefill")], routers.make("round_robin"))
    with pytest.raises(ValueError, match="cannot serve both phases"):
        Cluster([spec("decode")], routers.make("round_robin"))
    with pytest.raises(ValueError, match="phase pools and migration"):
        Cluster([spec("prefill"), spec("decode")], routers.make("round_robin"), migration=MigrationSettings("live"))
    with pytest.raises(ValueError, match="overlap must be one of"):
        PoolSettings(overlap="chunk")
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        KVLink(bandwidth=0.0)
    assert dataclasses.replace(spec("decode"), role="mixed").role == "mixed"
