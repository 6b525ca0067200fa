"""A colocated cluster served in real time: one engine loop per replica (fake executors), a router
from ``jaxserve.cluster.routers`` placing each request as it arrives; every request streams its
tokens, the replicas share the work as the router says, aborts reach the right replica, a router
that holds requests back (fair dispatch) places them as steps free room, and stopping ends all."""

from __future__ import annotations

import threading

import pytest
from loop_testing import Collector, CountingExecutor, expected, request

from jaxserve import scheduler as schedulers
from jaxserve.cluster import routers
from jaxserve.cluster.cluster import ReplicaSpec
from jaxserve.kv.config import KVConfig
from jaxserve.runtime import RunLimits
from jaxserve.serve.engine_loop import Draining
from jaxserve.serve.routed import RoutedLoops

KV = KVConfig(num_blocks=64, block_size=4)


def specs(n: int, step_s: float = 0.002):
    return [ReplicaSpec(schedulers.make("sarathi", max_num_seqs=4, chunk_size=8), KV, CountingExecutor(step_s),
                        RunLimits(max_context=128), f"r{i}") for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("router", ["round_robin", "least_kv", "shortest_queue", "fair"])
def test_requests_spread_over_the_replicas_and_all_complete(router):
    loops = RoutedLoops(specs(3), routers.make(router)).start()
    sinks = {f"q{i}": Collector() for i in range(12)}
    prompts = {rid: [i % 40 + 1] * (2 + i) for i, rid in enumerate(sinks)}

    def client(rid):
        loops.submit(request(rid, prompts[rid], 20), sinks[rid])

    threads = [threading.Thread(target=client, args=(rid,)) for rid in sinks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rid, sink in sinks.items():
        assert sink.wait().tokens == expected(prompts[rid], 20) and sink.last.finish_reason == "length"
    served = [loop.log.freeze().num_requests for loop in loops.loops]
    assert sum(served) == 12 and min(served) >= 1  # every replica took part
    if router == "round_robin":
        assert served == [4, 4, 4]
    loops.stop()
    snap = loops.snapshot
    assert snap.kv_blocks_used == 0 and snap.num_unfinished == 0 and not loops.running


def test_abort_reaches_the_replica_and_stop_ends_everything():
    loops = RoutedLoops(specs(2, step_s=0.005), routers.make("round_robin")).start()
    a, b = Collector(), Collector()
    loops.submit(request("a", [1, 2], 100), a)
    loops.submit(request("b", [3, 4], 100), b)
    while len(b.tokens) < 3:
        b.done.wait(0.002)
    loops.abort("b")  # on replica 1
    assert b.wait().last.finish_reason == "abort" and len(b.tokens) < 100
    assert loops.loops[1].snapshot.kv_blocks_used == 0
    loops.stop(grace_s=0.05)
    assert a.wait().last.finish_reason == "abort"
    with pytest.raises(Draining):
        loops.submit(request("late", [1], 2), Collector())
    with pytest.raises(ValueError, match="colocated"):
        import dataclasses

        RoutedLoops([dataclasses.replace(specs(1)[0], role="prefill")], routers.make("round_robin"))


@pytest.mark.slow  # a second engine compiles its own step shapes
def test_a_server_over_two_engines_matches_llm_generate(llm, model_dir):
    import httpx

    import jaxserve
    from conftest import LLM_OPTIONS
    from jaxserve.cluster.engines import engine_replica
    from jaxserve.serve.testing import running_server

    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    refs = llm.generate(prompts, jaxserve.SamplingParams(8, temperature=0.0))
    other = jaxserve.LLM(str(model_dir), **LLM_OPTIONS)
    loops = RoutedLoops([engine_replica(x.runner, x.scheduler) for x in (llm, other)], routers.make("round_robin"))
    with running_server(llm, loop=loops) as url:
        for p, ref in zip(prompts, refs):
            body = {"prompt": p, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
            assert httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["token_ids"] == list(ref.token_ids)
    assert [loop.log.freeze().num_requests for loop in loops.loops] == [2, 2]
