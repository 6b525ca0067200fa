"""Cluster simulation speed: does a 16-replica cluster cost more per request than one replica?

    python benchmarks/cluster_speed.py [--replicas 16] [--router shortest_queue] [--scheduler vllm] [--duration_s 0] [--general]

The Azure 2023 conversation trace, the whole hour (Llama-2-7B on simulated A100-80GBs) replayed
twice in one process: at its recorded rate on one replica, and 16 times faster (``workload.time_scale
= 1/16``) on 16 replicas behind ``--router``, so each replica sees about the load of the single one.
For each: simulated requests and steps per wall second and wall microseconds per step (simulation
only: no outputs written); ``ratio`` is the cluster's requests per wall second over the single
replica's (>= 1.0: a replica in a cluster costs no more than one alone); ``ratio_per_step`` the
same per simulated step (the two runs batch differently, so their steps per request differ).
``loop`` says which loop each ran: "fast" (FastReplica, FastCluster) or why the general one did;
``--general`` runs both on the general loop (``sim.fast_loop=False``). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import default  # noqa: E402
from jaxserve.cluster.config import build_cluster_sim, run_cluster_sim  # noqa: E402
from jaxserve.config import override  # noqa: E402
from jaxserve.sim.simulate import build_sim, run_sim  # noqa: E402


TRACE = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"  # under $JAXSERVE_TRACES or ../shared/traces


def bench(config, cluster: bool) -> dict:
    start = time.perf_counter()
    run = build_cluster_sim(config) if cluster else build_sim(config)
    results = run_cluster_sim(run) if cluster else run_sim(run)
    wall = time.perf_counter() - start
    m = results.metrics
    return {
        "loop": "fast" if run.why_not_fast is None else f"general ({run.why_not_fast})",
        "num_requests": m["num_requests"], "num_finished": m["num_finished"], "num_steps": m["num_steps"],
        "simulated_s": round(m["makespan_s"], 1) if m["makespan_s"] is not None else None,
        "ttft_p50_s": m["ttft_s"]["p50"], "wall_s": round(wall, 2),
        "requests_per_wall_s": round(m["num_requests"] / wall, 1),
        "us_per_step": round(1e6 * wall / max(m["num_steps"], 1), 1),
    }  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--router", default="shortest_queue")
    parser.add_argument("--scheduler", default="vllm")
    parser.add_argument("--duration_s", type=float, default=0.0, help="seconds of trace (0: all of it)")
    parser.add_argument("--general", action="store_true", help="the general loop for both (sim.fast_loop=False)")
    args = parser.parse_args(argv)
    base = override(default.get_config(), {
        "scheduler.name": args.scheduler, "workload.duration_s": args.duration_s if args.duration_s > 0 else 1e9,
        "workload.trace_path": TRACE, "model.name": "llama-2-7b",
        "model.max_context": 16384,  # replay every request
        "sim.fast_loop": not args.general,
    })  # fmt: skip
    if args.scheduler in ("vllm", "orca", "static"):
        base = override(base, {"scheduler.max_num_batched_tokens": 16384})  # prompts up to 14k tokens
    one = bench(base, cluster=False)
    many = bench(override(base, {"cluster.num_replicas": args.replicas, "cluster.router": args.router,
                                 "workload.time_scale": 1.0 / args.replicas}), cluster=True)  # fmt: skip
    print(json.dumps({
        "benchmark": "cluster_speed", "machine": f"{platform.machine()} {platform.python_implementation()} "
        f"{platform.python_version()}", "scheduler": args.scheduler, "router": args.router,
        "one_replica": one, f"{args.replicas}_replicas": many,
        "ratio": round(many["requests_per_wall_s"] / one["requests_per_wall_s"], 3),
        # The same per step: the cluster's replicas, each overloaded for 1/16 of the time, batch
        # less than the lone replica does over the hour, so they take more steps per request.
        "ratio_per_step": round(one["us_per_step"] / many["us_per_step"], 3),
        "steps_per_request": {"one": round(one["num_steps"] / one["num_requests"], 2),
                              "cluster": round(many["num_steps"] / many["num_requests"], 2)},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
