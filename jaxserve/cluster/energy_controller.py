"""DynamoLLM's energy controller (Stojkovic et al., HPCA'25), pure: requests binned by (input,
output) length into pools; each epoch, per pool, the instance count, tensor-parallel degree and GPU
clock that minimise energy under TTFT/TBT SLOs at the forecast load, paying for reconfiguration.

* **Profiles** (``ProfileEntry``): for one (TP, clock), an instance's p99 TTFT, p99 TBT and average
  power at per-instance loads (req/s), increasing, the last being the most it sustains; linear
  between points, and from (0 req/s, idle power, the first point's latencies) below the first.
  They come from the cost model (simulation) or, in tests, by hand.
* **A pool's choice** (``choose``): load ``L`` split evenly over ``n`` instances; a config is
  feasible when ``L / n`` is within the profile and both latencies meet the SLOs; its epoch energy is
  ``n · power(L / n) · epoch_s``. The controller minimises epoch energy plus the cost of moving
  there from the current config, amortised over ``amortize_epochs``, so a change whose saving does
  not pay for it is not made (the current config costs nothing to keep; ties keep it).
* **Reconfiguration cost** (``ReconfigCosts``, ``transition_j``), in joules: an instance that is
  started draws its idle power for ``instance_start_s`` before it serves (weights loaded); changing
  the TP degree re-shards every instance that existing GPUs can form (DynamoLLM re-shards in place
  over NVLink), each out of service for ``reshard_s`` at idle power, and starts the rest; a clock
  change costs ``clock_change_s`` per instance; removing instances is free (they drain).
* **No feasible config** (load beyond what ``max_gpus`` can serve within the SLOs): the config
  with the smallest worst SLO ratio (overload counted as a ratio too), flagged ``slo_met=False``.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Optional


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


# -- pools -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LengthBins:
    """Pools by length: a request with ``prompt_len`` < ``input_edges[i]`` (the first edge it is
    below; past the last, the last bin) and likewise for its output is in pool ``(i, j)``.
    DynamoLLM uses short/medium/long on both axes (9 pools)."""

    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]

    def __post_init__(self):
        for name in ("input_edges", "output_edges"):
            edges = tuple(getattr(self, name))
            if any(not isinstance(e, int) or e < 1 for e in edges) or list(edges) != sorted(set(edges)):
                raise ValueError(f"LengthBins.{name} must be increasing ints >= 1, got {edges!r}")
            object.__setattr__(self, name, edges)

    @property
    def pools(self) -> tuple[tuple[int, int], ...]:
        return tuple((i, j) for i in range(len(self.input_edges) + 1) for j in range(len(self.output_edges) + 1))

    def pool(self, prompt_len: int, output_len: int) -> tuple[int, int]:
        return bisect.bisect_right(self.input_edges, prompt_len), bisect.bisect_right(self.output_edges, output_len)


def pool_loads(lengths: Iterable[tuple[int, int]], bins: LengthBins, duration_s: float) -> dict[tuple[int, int], float]:
    """Requests per second of each pool (every pool, 0.0 when empty) among ``lengths``, (prompt,
    output) pairs that arrived over ``duration_s`` seconds."""
    duration_s = _positive("duration_s", duration_s)
    counts = dict.fromkeys(bins.pools, 0)
    for prompt, output in lengths:
        counts[bins.pool(prompt, output)] += 1
    return {pool: count / duration_s for pool, count in counts.items()}


# -- profiles ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadPoint:
    """One instance at ``load_rps`` requests/s: p99 TTFT and TBT (seconds), average power (watts)."""

    load_rps: float
    ttft_s: float
    tbt_s: float
    power_w: float


@dataclasses.dataclass(frozen=True)
class ProfileEntry:
    """An instance of ``tp`` GPUs at ``frequency_mhz``: ``idle_power_w`` (all its GPUs, no load) and
    ``points`` at increasing load, the last the highest load it sustains."""

    tp: int
    frequency_mhz: int
    idle_power_w: float
    points: tuple[LoadPoint, ...]

    def __post_init__(self):
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"ProfileEntry.tp must be an int >= 1, got {self.tp!r}")
        _non_negative("ProfileEntry.idle_power_w", self.idle_power_w)
        points = tuple(self.points)
        if not points:
            raise ValueError(f"ProfileEntry(tp={self.tp}, {self.frequency_mhz} MHz): points is empty")
        loads = [p.load_rps for p in points]
        if loads[0] <= 0 or any(b <= a for a, b in zip(loads, loads[1:])):
            raise ValueError(f"ProfileEntry(tp={self.tp}, {self.frequency_mhz} MHz): loads must be > 0 and increasing, got {loads}")
        for p in points:
            for field in ("ttft_s", "tbt_s", "power_w"):
                _non_negative(f"LoadPoint.{field}", getattr(p, field))
        object.__setattr__(self, "points", points)

    @property
    def max_load_rps(self) -> float:
        return self.points[-1].load_rps

    def at(self, load_rps: float) -> LoadPoint:
        """The instance at ``load_rps`` (0 to ``max_load_rps``), linear between points."""
        if not 0.0 <= load_rps <= self.max_load_rps:
            raise ValueError(f"load {load_rps} req/s is outside this profile's 0-{self.max_load_rps} req/s")
        first = self.points[0]
        points = (LoadPoint(0.0, first.ttft_s, first.tbt_s, self.idle_power_w), *self.points)
        k = max(1, bisect.bisect_left([p.load_rps for p in points], load_rps))
        a, b = points[k - 1], points[k]
        w = (load_rps - a.load_rps) / (b.load_rps - a.load_rps)
        return LoadPoint(load_rps, *((1 - w) * getattr(a, f) + w * getattr(b, f) for f in ("ttft_s", "tbt_s", "power_w")))


# -- decisions -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, order=True)
class PoolConfig:
    instances: int
    tp: int
    frequency_mhz: int

    @property
    def gpus(self) -> int:
        return self.instances * self.tp


@dataclasses.dataclass(frozen=True)
class Slo:
    """p99 targets, seconds; each must be > 0."""

    ttft_s: float
    tbt_s: float

    def __post_init__(self):
        _positive("slo.ttft_s", self.ttft_s)
        _positive("slo.tbt_s", self.tbt_s)


@dataclasses.dataclass(frozen=True)
class ReconfigCosts:
    """Seconds an instance draws idle power without serving: a new instance until it serves
    (``instance_start_s``), a re-sharded one (``reshard_s``), a clock change (``clock_change_s``)."""

    instance_start_s: float
    reshard_s: float
    clock_change_s: float = 0.0

    def __post_init__(self):
        for name in ("instance_start_s", "reshard_s", "clock_change_s"):
            _non_negative(f"ReconfigCosts.{name}", getattr(self, name))


@dataclasses.dataclass(frozen=True)
class PoolDecision:
    """The config for the next epoch: its epoch energy at the forecast load (J), the one-time cost of
    moving there (J), whether it is the current config, whether it meets the SLOs; ``best_static``
    is what the choice would be with free reconfiguration (the same when costs did not matter)."""

    config: PoolConfig
    energy_j: float
    transition_j: float
    kept: bool
    slo_met: bool
    best_static: PoolConfig


def transition_j(current: Optional[PoolConfig], new: PoolConfig, idle_power_w: float, costs: ReconfigCosts) -> float:
    """Joules of moving from ``current`` (None: nothing deployed yet, free) to ``new``, whose instances
    draw ``idle_power_w`` each while not serving; see the module docstring."""
    if current is None or current == new:
        return 0.0
    if new.tp == current.tp:
        started, resharded = max(0, new.instances - current.instances), 0
    else:
        resharded = min(new.instances, current.gpus // new.tp)
        started = new.instances - resharded
    clock = new.instances if new.frequency_mhz != current.frequency_mhz else 0
    seconds = started * costs.instance_start_s + resharded * costs.reshard_s + clock * costs.clock_change_s
    return seconds * idle_power_w


def _profile_map(profile: Sequence[ProfileEntry], pool) -> dict[tuple[int, int], ProfileEntry]:
    entries = list(profile)
    if not entries:
        raise ValueError(f"profile of pool {pool!r} is empty")
    out = {}
    for e in entries:
        if (e.tp, e.frequency_mhz) in out:
            raise ValueError(f"profile of pool {pool!r} has two entries for tp={e.tp} at {e.frequency_mhz} MHz")
        out[(e.tp, e.frequency_mhz)] = e
    return out


def choose(
    load_rps: float,
    profile: Sequence[ProfileEntry],
    slo: Slo,
    *,
    epoch_s: float,
    max_gpus: int,
    costs: ReconfigCosts,
    current: Optional[PoolConfig] = None,
    min_instances: int = 1,
    amortize_epochs: int = 1,
    pool: Hashable = "pool",
) -> PoolDecision:
    """The config of one pool for the next epoch (module docstring). ``load_rps``: the forecast;
    ``max_gpus``: the pool's GPU budget; ``current``: the config now serving (None: none yet; it must
    be in ``profile``); ``min_instances`` instances at least (0 lets an idle pool switch off)."""
    entries = _profile_map(profile, pool)
    load_rps = _non_negative("load_rps", load_rps)
    epoch_s = _positive("epoch_s", epoch_s)
    if isinstance(max_gpus, bool) or not isinstance(max_gpus, int) or max_gpus < min(tp for tp, _ in entries):
        raise ValueError(f"max_gpus must be an int >= the smallest TP degree in the profile, got {max_gpus!r}")
    if not isinstance(min_instances, int) or min_instances < 0:
        raise ValueError(f"min_instances must be an int >= 0, got {min_instances!r}")
    if not isinstance(amortize_epochs, int) or amortize_epochs < 1:
        raise ValueError(f"amortize_epochs must be an int >= 1, got {amortize_epochs!r}")
    if current is not None and (current.tp, current.frequency_mhz) not in entries:
        raise ValueError(f"current config {current} of pool {pool!r} is not in its profile")

    scored = []  # (violation, objective, energy, transition, config)
    for (tp, freq), entry in sorted(entries.items()):
        for n in range(min_instances, max_gpus // tp + 1):
            config = PoolConfig(n, tp, freq)
            if n == 0:
                if load_rps > 0:
                    continue
                violation, energy = 0.0, 0.0
            else:
                per = load_rps / n
                point = entry.at(min(per, entry.max_load_rps))
                violation = max(point.ttft_s / slo.ttft_s, point.tbt_s / slo.tbt_s, per / entry.max_load_rps)
                energy = n * point.power_w * epoch_s
            move = transition_j(current, config, entry.idle_power_w, costs)
            scored.append((max(violation, 1.0), energy + move / amortize_epochs, energy, move, config))
    if not scored:
        raise ValueError(f"pool {pool!r}: no config fits max_gpus={max_gpus} with min_instances={min_instances}")
    feasible = [s for s in scored if s[0] <= 1.0]
    ranked = feasible or scored
    kept_first = lambda s: (s[0], s[1], s[4] != current, s[4])  # noqa: E731 - ties keep the current config
    best = min(ranked, key=kept_first)
    static = min(ranked, key=lambda s: (s[0], s[2], s[4] != current, s[4]))
    return PoolDecision(best[4], best[2], best[3], best[4] == current, bool(feasible), static[4])


def plan_epoch(
    loads: Mapping[Hashable, float],
    profiles: Mapping[Hashable, Sequence[ProfileEntry]],
    slos: Mapping[Hashable, Slo],
    *,
    epoch_s: float,
    max_gpus: Mapping[Hashable, int],
    costs: ReconfigCosts,
    current: Optional[Mapping[Hashable, PoolConfig]] = None,
    min_instances: int = 1,
    amortize_epochs: int = 1,
) -> dict[Hashable, PoolDecision]:
    """``choose`` for every pool of ``loads`` (each must have a profile, an SLO and a GPU budget)."""
    current = current or {}
    out = {}
    for pool, load in loads.items():
        for name, table in (("profiles", profiles), ("slos", slos), ("max_gpus", max_gpus)):
            if pool not in table:
                raise ValueError(f"{name} has no entry for pool {pool!r}")
        out[pool] = choose(load, profiles[pool], slos[pool], epoch_s=epoch_s, max_gpus=max_gpus[pool], costs=costs,
                           current=current.get(pool), min_instances=min_instances, amortize_epochs=amortize_epochs,
                           pool=pool)  # fmt: skip
    return out
