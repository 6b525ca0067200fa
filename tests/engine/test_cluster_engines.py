"""Real engines in a cluster (tiny checkpoint, CPU): a request live-migrated mid-decode gives the
tokens of an unmigrated run, the source frees every block and the destination holds exactly the
request's; a migration whose destination fills up mid-way aborts with the request still correct on
the source; a replica whose step raises fails and its requests finish elsewhere with the same
tokens; phase pools (prefill on engine A, its KV copied into engine B's pages, decode on B) give the
single-engine tokens, and a handoff into a full B waits, or fails cleanly when B can never hold it.
Each runs on in-process ModelRunners, and again on Ray actors when ray is installed."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
from cluster_testing import NeverPolicy, Pinned, start_migration_when
from engine_testing import RUNNER_KV, greedy, prompt, request

from jaxserve.cluster import Cluster
from jaxserve.cluster import routers
from jaxserve.cluster.engines import engine_replica
from jaxserve.cluster.handoff import PoolSettings
from jaxserve.cluster.migration import MigrationSettings
from jaxserve.engine.engine import Engine
from jaxserve.kv.config import KVConfig
from jaxserve.request import SamplingParams
from jaxserve.scheduler import make
from jaxserve.scheduler import migration as moves

SECOND_KV = KVConfig(num_blocks=40, block_size=RUNNER_KV.block_size)
HAS_RAY = importlib.util.find_spec("ray") is not None


def sampled(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.9, top_k=20, seed=1234)


# Long enough to outlast a live migration's stages: a copy between Ray actors takes ~10 ms, in
# which the tiny model decodes about ten tokens on the source.
REQUESTS = {
    "greedy": request("g", prompt(1, 9), greedy(48)),
    "seeded": request("s", prompt(2, 11), sampled(48)),
}
LIVE = MigrationSettings("live", policy=None, max_stages=3, final_stage_blocks=4)


@pytest.fixture(scope="module", params=["in-process", pytest.param("ray", marks=pytest.mark.skipif(
    not HAS_RAY, reason="ray is not installed (pip install -e '.[ray]')"))])  # fmt: skip
def executors(request, runner, llama_params, llama):
    """Two executors with different pool sizes: the session runner (64 blocks) and a 40-block one,
    in this process, or both in Ray actors."""
    if request.param == "in-process":
        from jaxserve.engine.model_runner import ModelRunner

        cfg, params = llama_params
        yield runner, ModelRunner(cfg, params, SECOND_KV)
        return
    import jax

    from jaxserve.engine.ray_executor import RayExecutor, init_local_ray

    init_local_ray(num_cpus=2)
    cache = jax.config.jax_compilation_cache_dir
    pair = (RayExecutor.start(llama[0], RUNNER_KV, compile_cache=cache, num_cpus=0.5),
            RayExecutor.start(llama[0], SECOND_KV, compile_cache=cache, num_cpus=0.5))  # fmt: skip
    yield pair
    for ex in pair:
        ex.shutdown()


@pytest.fixture(scope="module")
def reference(runner):
    """Each request's tokens served alone on one engine, without migration."""
    run = Engine(runner, make("vllm"), RUNNER_KV).serve(list(REQUESTS.values()))
    return {rid: f.output_token_ids for rid, f in run.finished.items()}


def cluster_of(executors, **kwargs) -> Cluster:
    specs = [engine_replica(ex, make("vllm"), f"engine {i}") for i, ex in enumerate(executors)]
    return Cluster(specs, Pinned(0), fast_forward=False, **kwargs)


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_a_live_migrated_request_gives_the_unmigrated_tokens(executors, reference, kind):
    req = REQUESTS[kind]
    cluster = cluster_of(executors, migration=dataclasses.replace(LIVE, policy=NeverPolicy()))
    records = start_migration_when(cluster, req.request_id, 5)
    at_completion = []
    done = cluster.migrator._stage_done

    def spy(move, now):
        done(move, now)
        if move.record.outcome == "done":
            src, dst = (m.replica.state for m in cluster.members)
            r = dst.running.row_index(req.request_id)
            at_completion.append((src.kv.device.num_used, dst.running.block_tables[r], int(dst.running.num_computed[r]),
                                  dst.kv.device.num_used, dict(dst.kv.device.refcounts.items())))  # fmt: skip

    cluster.migrator._stage_done = spy
    cluster.run([req])
    (record,) = records
    assert record.outcome == "done" and record.num_stages >= 1 and record.num_bytes > 0, record
    assert cluster.outputs[req.request_id] == reference[req.request_id]
    (src_used, table, computed, dst_used, refs) = at_completion[0]
    assert src_used == 0, "the source kept blocks after the migration"
    assert len(table) == -(-computed // RUNNER_KV.block_size) and dst_used == len(table)
    assert refs == {b: 1 for b in table}, "the destination holds other blocks than the request's"
    assert any(cluster.log.freeze().step_replica == 1), "the destination never decoded it"


def test_a_migration_whose_destination_fills_up_aborts_and_the_source_finishes_it(executors, reference):
    req = REQUESTS["greedy"]
    # the first stage copies the prompt's full blocks; the last would need at least one more
    cluster = cluster_of(executors, migration=dataclasses.replace(LIVE, policy=NeverPolicy(), final_stage_blocks=1))
    dst = cluster.members[1]

    def fill_destination():  # after the first stage's handshake, someone else takes every free block
        state = dst.replica.state
        dst.replica.replace_state(moves.reserve_incoming(dst.spec.scheduler, state, "filler", state.kv.device.num_free))

    records = start_migration_when(cluster, req.request_id, 4, then=fill_destination)
    log = cluster.run([req]).freeze()
    (record,) = records
    assert record.outcome.startswith("aborted: handshake refused"), record.outcome
    assert cluster.outputs[req.request_id] == reference[req.request_id]
    assert not any(log.step_replica == 1)
    dst_state = dst.replica.state
    assert set(dst_state.incoming) == {"filler"}, "the aborted migration left a reservation behind"
    assert dst_state.kv.device.num_used == len(dst_state.incoming["filler"])
    assert cluster.members[0].replica.state.kv.device.num_used == 0


class FailingExecutor:
    """Delegates to ``inner``; its ``fail_at``-th execute raises (a crashed engine)."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, plan):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("device lost")
        return self.inner.execute(plan)


def test_a_replica_whose_step_raises_fails_and_its_requests_finish_elsewhere(executors, reference):
    reqs = [REQUESTS["greedy"]]
    cluster = Cluster([engine_replica(FailingExecutor(executors[0], fail_at=4), make("vllm"), "crashes"),
                       engine_replica(executors[1], make("vllm"), "survivor")], Pinned(0), fast_forward=False)  # fmt: skip
    log = cluster.run(reqs).freeze()
    assert [(i, why) for _, i, why in cluster.replica_failures] == [(0, "step raised RuntimeError: device lost")]
    assert cluster.members[0].status == "failed"
    assert log.retries.tolist() == [1] and log.finish_reason == ("length",)
    # greedy: the continuation (prompt + delivered tokens, recomputed) goes on with the same tokens
    assert cluster.outputs["g"] == reference["g"]
    assert cluster.members[1].replica.state.kv.device.num_used == 0


def test_round_robin_engines_serve_like_one_engine(executors, reference):
    cluster = Cluster([engine_replica(ex, make("vllm")) for ex in executors], routers.make("round_robin"), fast_forward=False)
    cluster.run(list(REQUESTS.values()))
    assert cluster.outputs == reference


# -- phase pools: prefill on A, decode on B ---------------------------------------------------------
def pools_of(executors, decode_kv=None, decode_seqs: int = 8) -> Cluster:
    """Engine A (64 blocks) computes prompts, engine B (40 blocks, or ``decode_kv``) decodes."""
    a, b = executors
    prefill = dataclasses.replace(engine_replica(a, make("vllm"), "prefill"), role="prefill")
    decode = dataclasses.replace(engine_replica(b, make("vllm", max_num_seqs=decode_seqs), "decode"), role="decode",
                                 kv=decode_kv or b.kv)  # fmt: skip
    return Cluster([prefill, decode], routers.make("round_robin"), fast_forward=False, pools=PoolSettings())


def spy_handoffs(cluster) -> list:
    """At each completed handoff: (whether A still holds the request's blocks, A's table of it, B's
    table of it, B's running table of it, B's refcounts)."""
    seen, complete = [], cluster.handoff._complete
    tables = {}
    start = cluster.handoff._copy

    def copy(h, src, dst, now):
        rid = h.record.request_id
        tables[rid] = (src.replica.state.outgoing[rid], dst.replica.state.incoming[rid])
        start(h, src, dst, now)

    def done(h, now):
        complete(h, now)
        a, b = (m.replica.state for m in cluster.members)
        rid = h.record.request_id
        r = b.running.row_index(rid)
        seen.append((rid in a.outgoing, *tables[rid], b.running.block_tables[r], dict(b.kv.device.refcounts.items())))

    cluster.handoff._copy, cluster.handoff._complete = copy, done
    return seen


def test_prefill_on_one_engine_and_decode_on_another_gives_the_single_engine_tokens(executors, reference):
    cluster = pools_of(executors)
    decode = cluster.members[1].replica  # B's first 5 blocks are taken: the copies land on other ids than A's
    decode.replace_state(moves.reserve_incoming(decode.scheduler, decode.state, "filler", 5))
    seen = spy_handoffs(cluster)
    log = cluster.run(list(REQUESTS.values())).freeze()
    assert cluster.outputs == reference
    records = cluster.handoff.records
    assert [r.outcome for r in records] == ["done", "done"]
    assert all(r.num_bytes > 0 and r.copy_s > 0 and r.end_s >= r.ready_s + r.copy_s for r in records)
    assert len(seen) == 2
    for still_on_a, src_table, dst_table, table_now, refs in seen:
        assert not still_on_a, "A kept the blocks after the handoff"
        assert table_now[: len(dst_table)] == dst_table  # B decodes on the blocks the KV was written to
        assert all(refs[b] == 1 for b in table_now)
        assert src_table != dst_table
    assert set(log.step_prefill_tokens[log.step_replica == 1].tolist()) == {0}  # B never computed a prompt
    assert [m.replica.state.kv.device.num_used for m in cluster.members] == [0, 5]  # B: the filler only


def test_a_handoff_into_a_full_decode_engine_waits_and_stays_correct(executors, reference):
    cluster = pools_of(executors, decode_seqs=1)  # B decodes one request at a time: the second waits
    log = cluster.run(list(REQUESTS.values())).freeze()
    assert cluster.outputs == reference
    first, second = sorted(cluster.handoff.records, key=lambda r: r.start_s)
    finished = dict(zip([i.request_id for i in log.requests], log.finish_s.tolist()))
    assert second.start_s > second.ready_s and second.start_s >= finished[first.request_id] - 1e-12
    assert [m.replica.state.kv.device.num_used for m in cluster.members] == [0, 0]


def test_a_handoff_the_decode_engine_can_never_hold_fails_cleanly(executors, reference):
    tiny = KVConfig(num_blocks=2, block_size=RUNNER_KV.block_size)  # the requests' prompts need 3 blocks
    cluster = pools_of(executors, decode_kv=tiny)
    log = cluster.run(list(REQUESTS.values())).freeze()
    assert all(r.startswith("failed: no decode or mixed replica can hold it (prompt + max_new_tokens") for r in log.finish_reason)
    assert not cluster.outputs
    assert [m.replica.state.kv.device.num_used for m in cluster.members] == [0, 0]
    assert not any(log.step_replica == 1)


# -- engine clusters from a config (the CLI's path) ---------------------------------------------------
def test_a_config_with_cluster_keys_and_backend_engine_runs_real_engines(llama, tmp_path):
    """``backend="engine"`` with ``cluster.*`` builds one real engine per replica (here a prefill and
    a decode engine, the KV handed over between them), serves a length-only workload with random
    prompt ids, and reports the cluster's metrics; the CLI's ``jaxserve.experiment`` takes this path."""
    import importlib.util
    import pathlib

    from jaxserve.cluster.config import build_cluster_sim, is_cluster, run_cluster_sim
    from jaxserve.config import ConfigError, override

    root = pathlib.Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("jaxserve_engine_cluster_defaults", root / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = override(module.get_config(), {
        "backend": "engine", "model.path": llama[0], "engine.compile_cache": "", "kv.block_size": 4, "kv.num_blocks": 48,
        "workload.kind": "poisson", "workload.qps": 50.0, "workload.num_requests": 6, "workload.lengths.kind": "uniform",
        "workload.lengths.low": 3, "workload.lengths.high": 12, "cluster.num_replicas": 2, "cluster.pools.prefill": 1,
        "cluster.pools.decode": 1, "cluster.pools.decode_overrides": "kv.num_blocks=40",
    })  # fmt: skip
    assert is_cluster(config)
    run = build_cluster_sim(config)
    assert run.is_engine and [s.role for s in run.specs] == ["prefill", "decode"]
    assert [s.kv.num_blocks for s in run.specs] == [48, 40] and all(r.has_real_tokens for r in run.requests)
    results = run_cluster_sim(run)
    m = results.metrics
    assert m["num_finished"] == 6 and m["num_failed"] == 0
    one_token = sum(r.sampling.max_new_tokens == 1 for r in run.requests)
    assert m["num_kv_transfers"] == 6 - one_token > 0 and m["kv_copy_s"]["p50"] > 0
    assert m["per_replica"]["1"]["role"] == "decode" and m["per_replica"]["1"]["num_steps"] > 0
    assert m["energy_j"] is None and "power" in m["unavailable"]["energy_j"]
    with pytest.raises(ConfigError, match="engine.async_scheduling: engine clusters step their replicas synchronously"):
        build_cluster_sim(override(config, {"engine.async_scheduling": True}))
