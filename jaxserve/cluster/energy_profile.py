"""Energy-performance profiles for the DynamoLLM controller, measured in the simulator.

DynamoLLM profiles each (TP degree, GPU clock) offline: an instance serving one pool's requests at
increasing loads, its p99 TTFT, p99 TBT and power. Here each point is a simulated run of one replica
(``hardware.tp``, ``hardware.frequency_mhz`` over the base config) serving ``num_requests`` Poisson
arrivals at the load, with the pool's lengths (``lengths``: ``workload.lengths.*`` overrides, e.g.
``fixed_lengths(512, 32)`` or a length CSV of the pool's requests). Power is what the instance
draws serving that load in steady state (``window_energy_j``): the steps' energy plus idle power for
the rest of the arrival window (``num_requests / load`` seconds), over the window, or over the busy
time when that is longer (an overloaded instance is busy throughout). Work that drains after the
window counts in full, as in steady state it overlaps the next window; the makespan would instead
dilute it with the drain's idle tail. A load past the instance's capacity shows
as a queue that grows through the run, i.e. a p99 TTFT far above any SLO, so the controller rejects
it by its SLOs; loads above the highest profiled one are not offered to the instance at all.

``profile_until`` spends simulations where they matter: loads grow geometrically until one misses
the SLOs, which is kept as the entry's last point (so the controller's interpolation sees latency
leave the SLO there) and ends the entry, or until the most the pool will ever offer one instance.
Its points are runs of a set duration, not a set count: a fixed count of requests arriving fast
ends before the batch fills (a long-output pool's requests last tens of seconds), and such a
point would report the warm-up instead of the load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from jaxserve.cluster.energy_controller import LoadPoint, ProfileEntry, Slo
from jaxserve.config import get, override
from jaxserve.sim.simulate import build_cost_model, build_sim, run_sim


def fixed_lengths(prompt_len: int, output_len: int) -> dict:
    """``workload.lengths`` overrides of one (prompt, output) pair; ``output_len`` must be >= 2 (a
    TBT needs two tokens)."""
    if output_len < 2:
        raise ValueError(f"output_len must be >= 2 for a TBT to profile, got {output_len}")
    return {"workload.lengths.kind": "fixed", "workload.lengths.prompt_len": prompt_len,
            "workload.lengths.output_len": output_len}  # fmt: skip


def _base(config, tp: int, frequency_mhz: int, num_requests: int, lengths: Mapping[str, Any]):
    return override(config, {"hardware.tp": tp, "hardware.frequency_mhz": frequency_mhz, "workload.kind": "poisson",
                             "workload.num_requests": num_requests, "workload.duration_s": None, **lengths})  # fmt: skip


def window_energy_j(steps_energy_j: float, busy_s: Sequence[float], window_s: float, idle_w: float) -> float:
    """Joules of instances serving one window's arrivals in steady state: their steps' energy (all of
    it, the drain after the window included) plus ``idle_w`` (watts per instance) for each instance's
    idle part of the window (``busy_s``: each one's total step time)."""
    return steps_energy_j + idle_w * sum(max(window_s - b, 0.0) for b in busy_s)


def _point(base, load: float, idle_w: float) -> LoadPoint:
    res = run_sim(build_sim(override(base, {"workload.qps": float(load)})))
    m, busy = res.metrics, float(res.log.step_duration_s.sum())
    window = get(base, "workload.num_requests", int) / load
    power = window_energy_j(m["energy_j"], [busy], window, idle_w) / max(window, busy)
    return LoadPoint(float(load), m["ttft_s"]["p99"], m["tbt_s"]["p99"], power)


def profile_entry(config, tp: int, frequency_mhz: int, loads: Sequence[float], *, num_requests: int,
                  lengths: Mapping[str, Any]) -> ProfileEntry:
    """One (tp, clock) of ``config`` (its model, hardware, scheduler) at each of ``loads`` (req/s,
    increasing), ``num_requests`` requests each with ``lengths`` (``workload.lengths.*`` overrides)."""
    base = _base(config, tp, frequency_mhz, num_requests, lengths)
    idle_w = build_cost_model(base).idle_power_w()
    return ProfileEntry(tp, frequency_mhz, idle_w, tuple(_point(base, load, idle_w) for load in loads))


def profile_until(config, tp: int, frequency_mhz: int, *, slo: Slo, start_rps: float, factor: float,
                  max_points: int, duration_s: float, min_requests: int, lengths: Mapping[str, Any],
                  max_rps: float = math.inf) -> ProfileEntry:
    """One (tp, clock) at ``start_rps``, ``start_rps * factor``, ... (at most ``max_points`` loads),
    each point ``duration_s`` seconds of Poisson arrivals (at least ``min_requests``), so a point near
    capacity shows the queue a run that long builds. Ends with the first load whose p99 TTFT or TBT
    misses ``slo`` (kept as the last point), or the first at or above ``max_rps`` (the most the
    instance will be offered)."""
    if not start_rps > 0 or not factor > 1 or max_points < 1 or not duration_s > 0 or min_requests < 1:
        raise ValueError("need start_rps > 0, factor > 1, max_points >= 1, duration_s > 0, min_requests >= 1; got "
                         f"{start_rps}, {factor}, {max_points}, {duration_s}, {min_requests}")
    base = _base(config, tp, frequency_mhz, min_requests, lengths)
    idle_w = build_cost_model(base).idle_power_w()
    points = []
    for k in range(max_points):
        load = start_rps * factor**k
        n = max(min_requests, math.ceil(load * duration_s))
        points.append(_point(override(base, {"workload.num_requests": n}), load, idle_w))
        if points[-1].ttft_s > slo.ttft_s or points[-1].tbt_s > slo.tbt_s or load >= max_rps:
            break
    return ProfileEntry(tp, frequency_mhz, idle_w, tuple(points))


def pool_profile(config, tps: Sequence[int], frequencies: Sequence[int], loads: Sequence[float], *,
                 num_requests: int, lengths: Mapping[str, Any]) -> tuple[ProfileEntry, ...]:
    """``profile_entry`` for every (tp, clock)."""
    return tuple(profile_entry(config, tp, f, loads, num_requests=num_requests, lengths=lengths)
                 for tp in tps for f in frequencies)  # fmt: skip
