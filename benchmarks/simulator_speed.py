"""Simulator speed on the whole Azure 2023 conversation trace (19,366 requests, one hour).

    python benchmarks/simulator_speed.py [--schedulers vllm,sarathi] [--duration_s 0]

Llama-2-7B on one simulated A100-80GB, replaying the trace at its recorded rate. For each scheduler
it prints simulated requests per wall second and wall seconds, including writing metrics.json,
the per-request CSV and the plots, as one JSON line. Target (issue 4): under 20 s per scheduler
on one core, aiming for under 5 s. For scale: Vidur needs ~38 s warm for an 8,819-request hour.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import default  # noqa: E402
from jaxserve.experiment import write_outputs  # noqa: E402
from jaxserve.sim.simulate import simulate  # noqa: E402


TRACE = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"  # under $JAXSERVE_TRACES or ../shared/traces


def bench(name: str, duration_s: float) -> dict:
    config = default.get_config()
    config.workload.trace_path = TRACE  # the whole hour (the default is the packaged 10-minute sample)
    config.model.name = "llama-2-7b"
    config.scheduler.name = name
    config.workload.duration_s = duration_s if duration_s > 0 else 1e9
    if name in ("vllm", "orca", "static"):
        config.scheduler.max_num_batched_tokens = 16384  # the trace has prompts up to 14k tokens
    config.model.max_context = 16384  # replay every request (Llama-2's 4k context would reject ~7 %)
    start = time.perf_counter()
    results = simulate(config)
    sim_done = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        write_outputs(results, out, name)
    wall = time.perf_counter() - start
    m = results.metrics
    return {
        "num_requests": m["num_requests"],
        "num_finished": m["num_finished"],
        "num_steps": m["num_steps"],
        "simulated_s": round(m["makespan_s"], 1),
        "wall_s": round(wall, 2),
        "simulate_wall_s": round(sim_done - start, 2),
        "requests_per_wall_s": round(m["num_requests"] / wall, 1),
        "steps_per_wall_s": round(m["num_steps"] / wall, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedulers", default="vllm,sarathi")
    parser.add_argument("--duration_s", type=float, default=0.0, help="seconds of trace (0: all)")
    args = parser.parse_args()
    result = {
        "benchmark": "simulator_speed",
        "trace": TRACE,
        "model": "llama-2-7b",
        "hardware": "a100-80gb",
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
        "target_wall_s": 20,
        "schedulers": {name: bench(name, args.duration_s) for name in args.schedulers.split(",")},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
