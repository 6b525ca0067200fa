"""Energy-performance profiles for the DynamoLLM controller, measured in the simulator.

DynamoLLM profiles each (TP degree, GPU clock) offline: an instance serving one pool's requests at
increasing loads, its p99 TTFT, p99 TBT and power. Here each point is a simulated run of one replica
(``hardware.tp``, ``hardware.frequency_mhz`` over the base config) serving ``num_requests`` Poisson
arrivals at the load, all of the pool's representative (prompt, output) lengths; power is the run's
``avg_power_w`` (steps plus idle gaps, over the makespan). A load past the instance's capacity shows
as a queue that grows through the run, i.e. a p99 TTFT far above any SLO, so the controller rejects
it by its SLOs; loads above the highest profiled one are not offered to the instance at all.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxserve.cluster.energy_controller import LoadPoint, ProfileEntry
from jaxserve.config import override
from jaxserve.sim.simulate import build_cost_model, build_sim, run_sim


def profile_entry(config, tp: int, frequency_mhz: int, loads: Sequence[float], prompt_len: int, output_len: int,
                  num_requests: int) -> ProfileEntry:
    """One (tp, clock) of ``config`` (its model, hardware, scheduler) at each of ``loads`` (req/s,
    increasing). ``output_len`` must be >= 2 (a TBT needs two tokens)."""
    if output_len < 2:
        raise ValueError(f"output_len must be >= 2 for a TBT to profile, got {output_len}")
    base = override(config, {
        "hardware.tp": tp, "hardware.frequency_mhz": frequency_mhz, "workload.kind": "poisson",
        "workload.num_requests": num_requests, "workload.lengths.kind": "fixed",
        "workload.lengths.prompt_len": prompt_len, "workload.lengths.output_len": output_len,
    })  # fmt: skip
    points = []
    for load in loads:
        m = run_sim(build_sim(override(base, {"workload.qps": float(load)}))).metrics
        points.append(LoadPoint(float(load), m["ttft_s"]["p99"], m["tbt_s"]["p99"], m["avg_power_w"]))
    return ProfileEntry(tp, frequency_mhz, build_cost_model(base).idle_power_w(), tuple(points))


def pool_profile(config, tps: Sequence[int], frequencies: Sequence[int], loads: Sequence[float], prompt_len: int,
                 output_len: int, num_requests: int) -> tuple[ProfileEntry, ...]:
    """``profile_entry`` for every (tp, clock)."""
    return tuple(profile_entry(config, tp, f, loads, prompt_len, output_len, num_requests) for tp in tps for f in frequencies)
