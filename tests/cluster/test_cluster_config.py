"""cluster.* keys: a simulated cluster from a config and the CLI, and one clear error per bad key."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from config_defaults import default_config as defaults
from jaxserve.cluster.config import build_cluster_sim, is_cluster, run_cluster_sim
from jaxserve.config import ConfigError, override

ROOT = pathlib.Path(__file__).resolve().parents[2]


def small(**values):
    base = {"workload.kind": "poisson", "workload.qps": 40.0, "workload.num_requests": 120,
            "workload.lengths.kind": "uniform", "workload.lengths.low": 16, "workload.lengths.high": 400,
            "model.name": "llama-2-7b", "cluster.num_replicas": 3}  # fmt: skip
    return override(defaults(), {**base, **values})


def test_a_cluster_config_builds_each_replica_with_its_overrides():
    config = small(**{"cluster.replicas": "1:hardware.name=h100-sxm,scheduler.name=sarathi;2:kv.num_blocks=300",
                      "cluster.router": "fair", "cluster.router_options": "max_waiting=3,w_q=1.5",
                      "cluster.events": "fail:1@1.5,add@2,drain:3@2.5"})  # fmt: skip
    assert is_cluster(config) and not is_cluster(defaults())
    run = build_cluster_sim(config)
    assert [s.executor.cost_model.hardware.name for s in run.specs] == ["a100-80gb", "h100-sxm", "a100-80gb"]
    assert [type(s.scheduler).__name__ for s in run.specs] == ["VLLMScheduler", "SarathiScheduler", "VLLMScheduler"]
    assert run.specs[2].kv.num_blocks == 300 and run.specs[0].kv.num_blocks > 1000
    assert run.router.max_waiting == 3 and run.router.w_q == 1.5
    assert [(e.kind, e.replica, e.time_s) for e in run.events] == [("fail", 1, 1.5), ("add", None, 2.0), ("drain", 3, 2.5)]
    results = run_cluster_sim(run)
    m = results.metrics
    assert m["num_replicas"] == 4 and m["num_finished"] == 120 and m["num_retried"] > 0
    assert m["per_replica"]["1"]["status"] == "failed" and m["per_replica"]["3"]["status"] == "draining"
    assert sum(r["num_placed"] for r in m["per_replica"].values()) == 120 + m["num_retried"]
    assert {row["replica"] for row in results.requests} == {0, 1, 2, 3}
    assert sum(row["retries"] for row in results.requests) == int(results.log.retries.sum())


@pytest.mark.parametrize("values, needle", [
    ({"cluster.router": "nope"}, "cluster.router: unknown router 'nope'; available: fair"),
    ({"cluster.num_replicas": 0}, "cluster.num_replicas must be >= 1, got 0"),
    ({"cluster.replicas": "5:kv.num_blocks=10"}, r"override for replica 5, but cluster.num_replicas is 3 \(replicas 0..2\)"),
    ({"cluster.replicas": "x:kv.num_blocks=10"}, "expected '<replica>:key=value"),
    ({"cluster.replicas": "1:workload.qps=3"}, r"cluster.replicas\[1\]: 'workload.qps' is not a replica key"),
    ({"cluster.replicas": "1:kv.num_blocks=many"}, r"cluster.replicas\[1\]: kv.num_blocks must be an int, got 'many'"),
    ({"cluster.replicas": "1:kv.nblocks=3"}, "unknown config key 'kv.nblocks'"),
    ({"cluster.replicas": "1:hardware.name=tpu-v9"}, "hardware.name"),
    ({"cluster.router_options": "max_waiting=3"}, "router 'round_robin' has no option 'max_waiting'"),
    ({"cluster.router": "fair", "cluster.router_options": "max_waiting=0"}, "max_waiting must be an int >= 1"),
    ({"cluster.router": "fair", "cluster.router_options": "max_waiting"}, "expected name=value, got 'max_waiting'"),
    ({"cluster.events": "explode:1@3"}, "cluster.events: expected"),
    ({"cluster.events": "fail:1@soon"}, "cluster.events: expected"),
    ({"cluster.events": "add:1@3"}, "cluster.events: expected"),
    ({"cluster.events": "fail:7@3"}, r"fail:7@3 names replica 7, but only replicas 0..2 exist by then"),
    ({"cluster.events": "add@1,fail:3@2"}, None),  # the added replica is 3: fine
    ({"backend": "engine"}, "model.path: backend=.engine. needs a local Hugging Face model directory"),
    ({"cluster.migration.mode": "teleport"}, "cluster.migration.mode must be one of off, live, recompute, got 'teleport'"),
    ({"cluster.migration.mode": "live", "cluster.migration.link": "carrier-pigeon"}, "cluster.migration.link: unknown link 'carrier-pigeon'; known: ethernet-100g"),
    ({"cluster.migration.mode": "live", "cluster.migration.interval_s": 0.0}, "cluster.migration.interval_s must be > 0"),
    ({"cluster.migration.mode": "live", "cluster.migration.max_stages": 0}, "cluster.migration.max_stages must be > 0"),
    ({"cluster.migration.mode": "live", "cluster.migration.destination_above": -1.0}, "destination_above .* must exceed source_below"),
    ({"cluster.pools.prefill": 2, "cluster.pools.decode": 2}, r"2 prefill \+ 2 decode replicas > cluster.num_replicas=3"),
    ({"cluster.pools.prefill": -1}, "cluster.pools.prefill must be >= 0, got -1"),
    ({"cluster.pools.prefill": 3}, "cluster.pools: prefill replicas alone cannot serve both phases"),
    ({"cluster.pools.decode": 3}, "cluster.pools: decode replicas alone cannot serve both phases"),
    ({"cluster.pools.prefill": 1, "cluster.pools.link_gb_s": 0.0}, "cluster.pools.link_gb_s must be > 0 GB/s, got 0.0"),
    ({"cluster.pools.prefill": 1, "cluster.pools.link": "nvlink9"}, "cluster.pools.link: unknown link 'nvlink9'"),
    ({"cluster.pools.prefill": 1, "cluster.pools.overlap": "chunk"}, "cluster.pools.overlap must be one of none, layer"),
    ({"cluster.pools.prefill": 1, "cluster.pools.link_scope": "rack"}, "cluster.pools.link_scope must be one of source"),
    ({"cluster.pools.prefill": 1, "cluster.pools.decode_pick": "random"}, "cluster.pools.decode_pick must be one of"),
    ({"cluster.pools.prefill": 1, "cluster.pools.prefill_overrides": "workload.qps=2"},
     r"cluster.pools.prefill_overrides: 'workload.qps' is not a replica key"),
    ({"cluster.pools.prefill": 1, "cluster.pools.decode_overrides": "hardware.tp=two"},
     r"cluster.pools.decode_overrides: hardware.tp must be an int, got 'two'"),
    ({"cluster.pools.prefill": 1, "cluster.migration.mode": "live"}, "migration between the replicas of phase pools is not supported"),
    ({"cluster.pools.prefill": 1, "slo.ttft_s": 0.0}, r"slo.ttft_s must be > 0 or unset \(None\), got 0.0"),
    ({"cluster.pools.prefill": 1, "slo.tpot_s": -0.1}, r"slo.tpot_s must be > 0 or unset \(None\), got -0.1"),
])  # fmt: skip
def test_bad_cluster_keys_name_the_key(values, needle):
    config = small(**values)
    if needle is None:
        assert [e.kind for e in build_cluster_sim(config).events] == ["add", "fail"]
        return
    with pytest.raises(ConfigError, match=needle):
        build_cluster_sim(config)


def test_the_cli_runs_a_cluster_and_exits_2_on_a_bad_cluster_key(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = [sys.executable, "-m", "jaxserve.experiment", "--config=configs/vllm.py", "--config.workload.kind=poisson",
            "--config.workload.qps=30", "--config.workload.num_requests=60", "--config.workload.lengths.kind=fixed", "--config.cluster.num_replicas=2",
            "--config.cluster.router=least_kv", f"--config.output_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 x a100-80gb, least_kv" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_replicas"] == 2 and metrics["num_finished"] == 60
    with open(tmp_path / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["replica"] for r in rows} == {"0", "1"}
    bad = subprocess.run([*args[:-2], "--config.cluster.router=fastest"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cluster.router: unknown router 'fastest'" in bad.stderr


def test_a_migrating_cluster_reports_its_migrations():
    config = small(**{"cluster.migration.mode": "live", "cluster.migration.destination_above": 2.0,
                      "cluster.router": "round_robin", "kv.num_blocks": 120, "workload.qps": 60.0})  # fmt: skip
    results = run_cluster_sim(build_cluster_sim(config))
    m = results.metrics
    assert m["migration_mode"] == "live" and m["num_migrations"] > 0, m
    assert set(m["migration_downtime_s"]) == {"mean", "p50", "p99"}
    assert m["migrated_bytes"] > 0 and m["num_finished"] == m["num_requests"]
    off = run_cluster_sim(build_cluster_sim(small(**{"kv.num_blocks": 120, "workload.qps": 60.0}))).metrics
    assert off["num_migrations"] == 0 and off["migration_downtime_s"] is None
    assert "off" in off["unavailable"]["migration_downtime_s"]


def test_phase_pools_from_the_config_hand_requests_over_and_report_transfers():
    config = small(**{"cluster.num_replicas": 4, "cluster.pools.prefill": 1, "cluster.pools.decode": 2,
                      "cluster.pools.prefill_overrides": "hardware.tp=2", "cluster.pools.decode_overrides": "kv.num_blocks=500,hardware.power_cap_w=300",
                      "cluster.replicas": "2:kv.num_blocks=600", "cluster.pools.overlap": "layer",
                      "cluster.pools.link_gb_s": 50.0})  # fmt: skip
    assert is_cluster(config)
    run = build_cluster_sim(config)
    assert [s.role for s in run.specs] == ["prefill", "decode", "decode", "mixed"]
    assert [s.executor.cost_model.tp for s in run.specs] == [2, 1, 1, 1]
    assert [s.kv.num_blocks for s in run.specs][1:3] == [500, 600]  # a replica's own override wins
    assert run.pools.link.bandwidth == 50e9 and run.pools.overlap == "layer"
    assert run.specs[0].num_layers == 32
    assert [c.hardware.power_cap_w for c in run.configs] == [None, 300.0, 300.0, None]  # an optional key, typed
    m = run_cluster_sim(run).metrics
    assert m["num_finished"] == 120
    placed_on_prefill = m["per_replica"]["0"]["num_placed"]
    assert 0 < m["num_kv_transfers"] <= placed_on_prefill and m["kv_transfer_bytes"] > 0
    assert m["kv_transfer_s"]["p50"] > 0 and m["per_replica"]["0"]["role"] == "prefill"
    assert m["avg_power_w"] > 0 and 0 < m["energy_idle_j"] < m["energy_total_j"]  # idle replicas draw power too
    assert m["per_replica"]["1"]["num_placed"] + m["per_replica"]["2"]["num_placed"] > 0  # decode took handoffs only
