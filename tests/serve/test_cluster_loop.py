"""A whole cluster served in real time (fake executors: predictable tokens, a few ms per step): every
request streams exactly its tokens through a colocated cluster, a prefill/decode pool and a live
migration mid-stream; a replica whose step raises fails and its requests finish elsewhere, or end
with an error naming why when no replica is left; aborts, max_queue and stopping behave as on one
engine; no block is left held anywhere."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from loop_testing import Collector, CountingExecutor, expected, request

from jaxserve import scheduler as schedulers
from jaxserve.cluster import routers
from jaxserve.cluster.cluster import ReplicaSpec
from jaxserve.cluster.handoff import PoolSettings
from jaxserve.cluster.migration import MigrationSettings
from jaxserve.kv.config import KVConfig
from jaxserve.runtime import RunLimits
from jaxserve.serve.cluster_loop import ClusterLoop
from jaxserve.serve.engine_loop import Draining, QueueFull

KV = KVConfig(num_blocks=64, block_size=4)


def spec(role="mixed", executor=None, step_s=0.002):
    return ReplicaSpec(schedulers.make("sarathi", max_num_seqs=4, chunk_size=8), KV, executor or CountingExecutor(step_s),
                       RunLimits(max_context=128), role=role)  # fmt: skip


class FailsAt(CountingExecutor):
    """Raises in its ``at``-th step (a crashed engine), then steps normally."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def execute(self, plan):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("device lost")
        return super().execute(plan)


@dataclasses.dataclass(frozen=True)
class MoveWhen:
    """A migration policy that moves ``rid`` from replica 0 to 1 once it has ``tokens`` tokens of KV."""

    rid: str
    tokens: int

    def plan(self, view, candidates, busy):
        for c in candidates[0] if 0 in candidates else ():
            if c.request_id == self.rid and c.num_tokens >= self.tokens:
                return ((self.rid, 0, 1),)
        return ()


def submit_all(loop, prompts: dict, n: int) -> dict:
    sinks = {rid: Collector() for rid in prompts}
    threads = [threading.Thread(target=loop.submit, args=(request(rid, p, n), sinks[rid])) for rid, p in prompts.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sinks


def assert_no_blocks_held(loop):
    for m in loop.cluster.members:
        if m.live:
            state = m.replica.state
            assert state.kv.device.num_used == 0 and not state.incoming and not state.outgoing, f"replica {m.index}"
    assert loop.snapshot.kv_blocks_used == 0 and loop.snapshot.num_unfinished == 0


PROMPTS = {f"q{i}": [i % 40 + 1] * (2 + i) for i in range(10)}


def test_a_colocated_cluster_streams_every_request():
    loop = ClusterLoop([spec(), spec(), spec()], routers.make("least_kv")).start()
    sinks = submit_all(loop, PROMPTS, 20)
    for rid, sink in sinks.items():
        assert sink.wait().tokens == expected(PROMPTS[rid], 20) and sink.last.finish_reason == "length"
    loop.stop()
    assert set(loop.log.freeze().step_replica.tolist()) == {0, 1, 2}
    assert_no_blocks_held(loop)


def test_a_prefill_decode_pool_hands_every_request_over_and_streams_it():
    loop = ClusterLoop([spec("prefill"), spec("decode"), spec("decode")], routers.make("round_robin"),
                       pools=PoolSettings()).start()  # fmt: skip
    sinks = submit_all(loop, PROMPTS, 12)
    for rid, sink in sinks.items():
        assert sink.wait().tokens == expected(PROMPTS[rid], 12)
    loop.stop()
    records = loop.cluster.handoff.records
    assert len(records) == len(PROMPTS) and all(r.outcome == "done" for r in records)
    log = loop.log.freeze()
    assert {1, 2} <= set(log.step_replica.tolist())  # the decode replicas decoded
    assert_no_blocks_held(loop)


def test_a_request_migrated_live_mid_stream_keeps_streaming_the_same_tokens():
    loop = ClusterLoop([spec(step_s=0.004), spec(step_s=0.004)], routers.make("round_robin"),
                       migration=MigrationSettings("live", MoveWhen("m", 12), interval_s=0.005)).start()  # fmt: skip
    sink = Collector()
    loop.submit(request("m", [7, 8, 9], 40), sink)
    assert sink.wait().tokens == expected([7, 8, 9], 40) and sink.last.finish_reason == "length"
    loop.stop()
    done = [r for r in loop.cluster.migrator.records if r.outcome == "done"]
    assert len(done) == 1 and (done[0].source, done[0].destination) == (0, 1)
    assert set(loop.log.freeze().step_replica.tolist()) == {0, 1}  # its only request: it decoded on both
    assert_no_blocks_held(loop)


def test_a_replica_that_raises_fails_and_its_requests_finish_elsewhere():
    loop = ClusterLoop([spec(executor=FailsAt(6)), spec()], routers.make("round_robin")).start()
    sinks = submit_all(loop, PROMPTS, 15)
    for rid, sink in sinks.items():
        assert sink.wait().tokens == expected(PROMPTS[rid], 15) and sink.last.finish_reason == "length", rid
    loop.stop()
    failures = loop.cluster.replica_failures
    assert [(i, why) for _, i, why in failures] == [(0, "step raised RuntimeError: device lost")]
    assert int(loop.log.freeze().retries.sum()) >= 1
    assert_no_blocks_held(loop)


def test_when_no_replica_is_left_the_stream_ends_with_the_reason():
    loop = ClusterLoop([spec(executor=FailsAt(3))], routers.make("round_robin")).start()
    sink = Collector()
    loop.submit(request("a", [1, 2, 3], 30), sink)
    sink.wait()
    assert sink.last.finish_reason == "error" and "no replica is accepting" in sink.last.error
    assert sink.tokens == expected([1, 2, 3], 30)[: len(sink.tokens)]  # what it had got stands
    loop.stop()


def test_abort_queue_limit_and_stop():
    loop = ClusterLoop([spec(step_s=0.005), spec(step_s=0.005)], routers.make("round_robin"), max_queue=50).start()
    a, b = Collector(), Collector()
    loop.submit(request("a", [1, 2], 100), a)
    loop.submit(request("b", [3, 4], 100), b)
    while len(b.tokens) < 3 and not b.done.is_set():
        b.done.wait(0.002)
    loop.abort("b")
    assert b.wait().last.finish_reason == "abort" and len(b.tokens) < 100
    big = Collector()
    loop.submit(request("big", [1, 2], 200), big)  # over the replicas' context of 128
    assert big.wait().last.finish_reason == "rejected" and "context 128" in big.last.error
    loop.stop(grace_s=0.05)
    assert a.wait().last.finish_reason == "abort"
    with pytest.raises(Draining):
        loop.submit(request("late", [1], 2), Collector())
    assert_no_blocks_held(loop)
    full = ClusterLoop([spec()], routers.make("round_robin"), max_queue=0)  # not started: nothing is taken
    with pytest.raises(QueueFull):
        full.submit(request("x", [1], 2), Collector())
