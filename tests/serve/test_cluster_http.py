"""A cluster of real engines (the tiny checkpoint) served over HTTP on 127.0.0.1 by ``ClusterLoop``:
greedy outputs through a prefill/decode pool equal ``LLM.generate`` and a stream in flight when the
server stops drains to its end; a request migrated live mid-stream keeps streaming the tokens it
would have got unmigrated; a replica that raises during a step has its requests finished elsewhere;
no block stays held on any replica. (Each engine compiles its own step shapes: one case runs by
default, the others are slow.)"""

from __future__ import annotations

import dataclasses
import json
import threading

import httpx
import jax
import pytest

import jaxserve
from jaxserve.cluster import routers
from jaxserve.cluster.migration import MigrationSettings
from jaxserve.config import override
from jaxserve.serve.cluster_loop import ClusterLoop
from jaxserve.serve.cluster_serving import cluster_serving, engine_parts, served_model
from jaxserve.serve.testing import running_server

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


def tiny_config(**values):
    """The conftest's engine options (Sarathi, 8 sequences, chunks of 16, 160 blocks of 4) as config keys."""
    from configs import default

    base = {"scheduler.name": "sarathi", "scheduler.max_num_seqs": 8, "scheduler.chunk_size": 16, "kv.num_blocks": 160,
            "kv.block_size": 4, "engine.compile_cache": jax.config.jax_compilation_cache_dir or ""}  # fmt: skip
    return override(default.get_config(), {**base, **values})


def references(llm, prompts, n: int) -> list[list[int]]:
    """Greedy tokens of ``llm``'s engine, EOS not stopping them (the requests below ignore it)."""
    requests = [jaxserve.Request(f"ref{i}", prompt_token_ids=tuple(p), sampling=jaxserve.SamplingParams(n, temperature=0.0))
                for i, p in enumerate(prompts)]  # fmt: skip
    run = llm.engine.serve(requests)
    return [list(run.finished[r.request_id].output_token_ids) for r in requests]


def complete(url: str, prompt, n: int) -> list[int]:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "return_token_ids": True, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def stream(url: str, prompt, n: int, out: dict) -> None:
    """Streams a completion; ``out`` gets its token ids, finish reason and any error chunk."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "return_token_ids": True,
            "ignore_eos": True}  # fmt: skip
    out.update(tokens=[], finish=None, error=None)
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    out["error"] = event["error"]["message"]
                    continue
                out["tokens"] += event["choices"][0]["token_ids"]
                out["finish"] = event["choices"][0]["finish_reason"] or out["finish"]


def assert_no_blocks_held(loop: ClusterLoop) -> None:
    for m in loop.cluster.members:
        if m.live:
            state = m.replica.state
            assert state.kv.device.num_used == 0 and not state.incoming and not state.outgoing, f"replica {m.index}"


def serve_then_stop_mid_stream(model, loop: ClusterLoop, prompts, refs) -> None:
    """Serves ``prompts`` one by one (their tokens must be ``refs[:-1]``), then stops the server
    while a last stream ([20, 21], ``refs[-1]``) is in flight: it must drain to its end."""
    out = {}
    with running_server(model, loop=loop, grace_s=120.0) as url:
        for p, ref in zip(prompts, refs):
            assert complete(url, p, len(ref)) == ref
        metrics = dict(line.split("{", 1)[0:1] + line.rsplit(" ", 1)[1:] for line in httpx.get(url + "/metrics").text.splitlines()
                       if line.startswith("jaxserve:"))  # fmt: skip  (name -> its last value)
        assert float(metrics["jaxserve:generation_tokens_total"]) == sum(map(len, refs[:-1]))
        assert float(metrics["jaxserve:kv_cache_blocks_used"]) == 0.0
        streaming = threading.Thread(target=stream, args=(url, [20, 21], len(refs[-1]), out))
        streaming.start()
        while not out.get("tokens"):
            streaming.join(0.01)
    streaming.join()
    assert out["tokens"] == refs[-1] and out["finish"] == "length" and out["error"] is None
    assert not loop.running and loop.snapshot.num_unfinished == 0
    assert_no_blocks_held(loop)


def test_one_engine_behind_the_cluster_loop_serves_generate_outputs_and_drains_on_stop(llm):
    """The session's engine (compiled already) as a one-replica cluster: the default run's case."""
    from jaxserve.cluster.engines import engine_replica

    loop = ClusterLoop([engine_replica(llm.runner, llm.scheduler)], routers.make("round_robin"))
    serve_then_stop_mid_stream(llm, loop, PROMPTS[:2], references(llm, PROMPTS[:2] + [[20, 21]], 8))


@pytest.mark.slow  # two more engines compile their step shapes
def test_a_prefill_decode_pool_serves_llm_generate_outputs_and_drains_on_stop(llm, model_dir):
    prompts = PROMPTS[:2]
    config = tiny_config(**{"cluster.num_replicas": 2, "cluster.pools.prefill": 1, "cluster.pools.decode": 1})
    loop, model = cluster_serving(config, str(model_dir))
    serve_then_stop_mid_stream(model, loop, prompts, references(llm, prompts + [[20, 21]], 12))
    records = loop.cluster.handoff.records
    assert len(records) == len(prompts) + 1 and all(r.outcome == "done" for r in records)
    assert loop.log.freeze().step_replica.tolist().count(1) >= 11  # the decode replica decoded


@dataclasses.dataclass(frozen=True)
class MoveOnce:
    """Moves replica 0's first decoding request with at least ``tokens`` tokens of KV to replica 1."""

    tokens: int

    def plan(self, view, candidates, busy):
        for c in candidates[0] if 0 in candidates else ():
            if c.num_tokens >= self.tokens:
                return ((c.request_id, 0, 1),)
        return ()


@pytest.mark.slow  # two more engines compile their step shapes
def test_a_request_migrated_live_mid_stream_streams_the_unmigrated_tokens(llm, model_dir):
    ref = references(llm, [[30, 31, 32, 33, 34]], 48)[0]
    parts = engine_parts(tiny_config(**{"cluster.num_replicas": 2}), str(model_dir))
    loop = ClusterLoop(parts.specs, routers.make("round_robin"),
                       migration=MigrationSettings("live", MoveOnce(20), interval_s=0.001, final_stage_blocks=1))  # fmt: skip
    out = {}
    with running_server(served_model(parts.specs, str(model_dir)), loop=loop) as url:
        stream(url, [30, 31, 32, 33, 34], 48, out)
    assert out["tokens"] == ref and out["finish"] == "length"
    done = [r for r in loop.cluster.migrator.records if r.outcome == "done"]
    assert len(done) == 1 and done[0].num_stages >= 2 and done[0].num_bytes > 0  # copied in stages, real KV
    assert set(loop.log.freeze().step_replica.tolist()) == {0, 1}
    assert_no_blocks_held(loop)


@pytest.mark.slow  # two more engines compile their step shapes
def test_a_replica_that_raises_mid_stream_has_its_requests_finished_elsewhere(llm, model_dir):
    refs = references(llm, PROMPTS, 20)
    parts = engine_parts(tiny_config(**{"cluster.num_replicas": 2}), str(model_dir))
    runner = parts.specs[0].executor
    execute, calls = runner.execute, []

    def crashing(plan):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("device lost")
        return execute(plan)

    runner.execute = crashing
    loop = ClusterLoop(parts.specs, routers.make("round_robin"))
    outs = [{} for _ in PROMPTS]
    with running_server(served_model(parts.specs, str(model_dir)), loop=loop) as url:
        threads = [threading.Thread(target=stream, args=(url, p, 20, o)) for p, o in zip(PROMPTS, outs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for out, ref in zip(outs, refs):
        assert out["tokens"] == ref and out["finish"] == "length" and out["error"] is None
    assert [i for _, i, _ in loop.cluster.replica_failures] == [0]
    assert int(loop.log.freeze().retries.sum()) >= 1
    assert_no_blocks_held(loop)
