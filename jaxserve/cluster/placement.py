"""DistServe placement search (OSDI'24 §4): for a GPU budget, the per-phase parallel configs
(prefill TP, PP, instance count; decode TP, PP, instance count) with the best goodput per GPU.

1. ``screen_placements`` enumerates every placement that fits the budget (TP in powers of two up to
   the node size, PP in powers of two, instance counts; weights + KV must fit each instance), builds
   each parallel config's step-time tables from the simulator's cost model, and estimates every
   placement's goodput at once with the analytic phase model (``jaxserve.cluster.phase_model``, one
   vmapped call per phase): a placement serves the lower of its prefill pool's and decode pool's
   highest rates that meet the TTFT and TPOT targets.
2. ``search_placement`` confirms the most promising placements by estimated goodput per GPU with a
   user-supplied ``simulate(placement, rate) -> slo_attainment``, bisecting the rate
   (``metrics.search_max_rate``) for the highest one at which >= ``attainment`` of requests meet both
   SLOs, until a wall-time budget is spent, and picks the best simulated goodput per GPU.

The analytic estimate scales linearly with instance counts, so placements that are multiples of one
another (2 prefill + 2 decode vs 1 + 1, same configs) tie per GPU; the search confirms only the
largest of each such family (the deployment the budget buys) instead of spending the budget on all.
``colocated_candidates`` lists the colocated baseline (one pool of mixed replicas with a given TP),
for experiments comparing disaggregated and colocated goodput per GPU.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np

from jaxserve.cluster import phase_model as pm
from jaxserve.config import override
from jaxserve.metrics import search_max_rate

CostModelFor = Callable[[int, int], object]  # (tp, pp) -> a cost model (RooflineCostModel or ProfiledCostModel)

# DESIGN.md scheduler defaults (vLLM's): rows per batch; vLLM's gpu_memory_utilization for weights + KV.
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MEMORY_FRACTION = 0.9
# An NVIDIA HGX/DGX A100 or H100 server holds 8 GPUs joined by NVLink (DGX A100 / DGX H100 user guides);
# DistServe keeps tensor parallelism within a node.
DEFAULT_NODE_SIZE = 8


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _positive(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    """``count`` instances of one phase, each on ``tp · pp`` GPUs."""

    tp: int
    pp: int = 1
    count: int = 1

    def __post_init__(self):
        for name in ("tp", "pp", "count"):
            _positive_int(f"PhaseConfig.{name}", getattr(self, name))

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.count


@dataclasses.dataclass(frozen=True)
class Placement:
    """A disaggregated deployment: a prefill pool and a decode pool."""

    prefill: PhaseConfig
    decode: PhaseConfig

    @property
    def num_gpus(self) -> int:
        return self.prefill.num_gpus + self.decode.num_gpus

    def family(self) -> tuple[int, ...]:
        """Placements equal up to a common multiple of both counts share a family."""
        g = math.gcd(self.prefill.count, self.decode.count)
        p, d = self.prefill, self.decode
        return (p.tp, p.pp, d.tp, d.pp, p.count // g, d.count // g)


def cost_models_from_config(config) -> CostModelFor:
    """``(tp, pp) -> cost model`` built exactly as the simulator builds it for ``config``
    (``jaxserve.sim.simulate.build_cost_model``) with ``hardware.tp`` / ``hardware.pp`` replaced."""
    from jaxserve.sim.simulate import build_cost_model

    return lambda tp, pp: build_cost_model(override(config, {"hardware.tp": tp, "hardware.pp": pp}))


def parallel_degrees(num_gpus: int, node_size: int = DEFAULT_NODE_SIZE, max_pp: Optional[int] = None) -> tuple[tuple[int, int], ...]:
    """(tp, pp) pairs to consider: tp a power of two up to ``node_size``, pp a power of two up to
    ``max_pp`` (default: no limit but the budget), tp · pp <= ``num_gpus``."""
    _positive_int("num_gpus", num_gpus)
    _positive_int("node_size", node_size)
    max_pp = num_gpus if max_pp is None else _positive_int("max_pp", max_pp)
    powers = [2**i for i in range(num_gpus.bit_length())]
    return tuple((tp, pp) for tp in powers if tp <= node_size for pp in powers if pp <= max_pp and tp * pp <= num_gpus)


@dataclasses.dataclass(frozen=True)
class _Instance:
    """One parallel config's cost model and the KV tokens one instance holds."""

    tp: int
    pp: int
    cost_model: object
    kv_tokens: int


def _instances(degrees, cost_model_for: CostModelFor, block_size: int, memory_fraction: float):
    """Builds each (tp, pp)'s cost model and KV capacity; returns (instances, skipped) where skipped
    holds (tp, pp, why) for configs the model cannot shard that way or whose weights do not fit."""
    out, skipped = [], []
    for tp, pp in degrees:
        try:
            cm = cost_model_for(tp, pp)
            kv = cm.kv_capacity_blocks(block_size, gpu_memory_utilization=memory_fraction) * block_size
        except ValueError as e:  # ConfigError is a ValueError too
            skipped.append((tp, pp, str(e)))
            continue
        out.append(_Instance(tp, pp, cm, int(kv)))
    return out, skipped


def colocated_candidates(
    num_gpus: int, tp: int, cost_model_for: CostModelFor, workload: pm.PhaseWorkload, *,
    pps: Sequence[int] = (1,), block_size: int = 16, memory_fraction: float = DEFAULT_MEMORY_FRACTION,
) -> tuple[PhaseConfig, ...]:  # fmt: skip
    """The colocated baseline: one pool of mixed replicas with tensor parallelism ``tp``, every
    pipeline degree of ``pps`` and instance count that fits ``num_gpus`` and holds the longest
    request in KV; ordered by pp then count."""
    _positive_int("num_gpus", num_gpus)
    _positive_int("tp", tp)
    instances, _ = _instances([(tp, pp) for pp in pps], cost_model_for, block_size, memory_fraction)
    return tuple(
        PhaseConfig(tp, i.pp, count)
        for i in instances if i.kv_tokens >= workload.max_total
        for count in range(1, num_gpus // (tp * i.pp) + 1)
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Screen:
    """Every placement of the budget with its analytic estimates (index-aligned arrays, req/s).
    ``goodput`` is the lower of the two pools' rates; ``skipped`` lists (tp, pp, why) for configs the
    cost model rejects (the model cannot be sharded so, or its weights do not fit); ``tables_s`` and ``model_s`` are the wall seconds spent evaluating cost models
    and in the vmapped phase model."""

    candidates: tuple[Placement, ...]
    prefill_rate: np.ndarray
    decode_rate: np.ndarray
    goodput: np.ndarray
    goodput_per_gpu: np.ndarray
    ttft_s: float
    tpot_s: float
    skipped: tuple[tuple[int, int, str], ...]
    tables_s: float
    model_s: float

    def ranked(self) -> np.ndarray:
        """Candidate indices, best estimated goodput per GPU first; ties: more GPUs first, then more
        headroom (the two pools' rates summed per GPU)."""
        gpus = np.array([c.num_gpus for c in self.candidates])
        headroom = (self.prefill_rate + self.decode_rate) / gpus
        return np.lexsort((-headroom, -gpus, -self.goodput_per_gpu))


def screen_placements(
    cost_model_for: CostModelFor, num_gpus: int, workload: pm.PhaseWorkload, ttft_s: float, tpot_s: float, *,
    node_size: int = DEFAULT_NODE_SIZE, max_pp: Optional[int] = None, block_size: int = 16,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    pipeline_overlap: bool = True, grid_points: int = 40,
) -> Screen:  # fmt: skip
    """Enumerates and estimates every placement of at most ``num_gpus`` GPUs (see the module
    docstring). ``pipeline_overlap``: pp micro-batches in flight overlap (DistServe's model); False
    matches a simulator that runs one micro-batch through the stages at a time. A config joins the
    prefill pool when its KV holds the longest prompt, the decode pool when it holds the longest
    prompt + output and at least one row per micro-batch at the workload's mean context."""
    _positive_int("num_gpus", num_gpus)
    ttft_s, tpot_s = _positive("slo ttft_s", ttft_s), _positive("slo tpot_s", tpot_s)
    _positive_int("max_num_seqs", max_num_seqs)
    start = time.perf_counter()
    instances, skipped = _instances(parallel_degrees(num_gpus, node_size, max_pp), cost_model_for, block_size, memory_fraction)
    moments = pm.prompt_moments(workload.prompt_lens, pm.length_grid(workload.max_prompt, grid_points))
    batch_grid = pm.length_grid(max_num_seqs, grid_points)
    prefill, decode = [], []  # (instance, step table, in_flight[, max_batch])
    for i in instances:
        in_flight = i.pp if pipeline_overlap else 1
        if i.kv_tokens >= workload.max_prompt:
            prefill.append((i, pm.prefill_step_times(i.cost_model, moments.grid, block_size), in_flight))
        max_batch = min(max_num_seqs, i.kv_tokens / (workload.context_per_row * in_flight))
        if i.kv_tokens >= workload.max_total and max_batch >= 1:
            steps = pm.decode_step_times(i.cost_model, batch_grid, workload.context_per_row, workload.max_total)
            decode.append((i, steps, in_flight, max_batch))
    if not prefill or not decode:
        raise ValueError(
            f"num_gpus={num_gpus}: no parallel config fits the {'prefill' if not prefill else 'decode'} phase "
            f"(skipped: {'; '.join(f'tp={t} pp={p}: {why}' for t, p, why in skipped) or 'none'})"
        )
    tables_s = time.perf_counter() - start

    rows = [(a, b, cp, cd) for a, (pi, *_) in enumerate(prefill) for b, (di, *_) in enumerate(decode)
            for cp in range(1, num_gpus // (pi.tp * pi.pp) + 1)
            for cd in range(1, (num_gpus - cp * pi.tp * pi.pp) // (di.tp * di.pp) + 1)]  # fmt: skip
    if not rows:
        raise ValueError(f"num_gpus={num_gpus}: no placement fits (one prefill and one decode instance need more GPUs)")
    a, b, cp, cd = (np.array(col) for col in zip(*rows))
    candidates = tuple(
        Placement(PhaseConfig(prefill[x][0].tp, prefill[x][0].pp, int(p)), PhaseConfig(decode[y][0].tp, decode[y][0].pp, int(d)))
        for x, y, p, d in rows
    )  # fmt: skip

    start = time.perf_counter()
    pre_steps = np.array([s for _, s, _ in prefill], np.float32)
    pre_in_flight = np.array([f for *_, f in prefill], np.float32)
    pre = pm.prefill_max_rate(pm.PrefillTable(pre_steps[a], pre_in_flight[a], cp.astype(np.float32)), moments, ttft_s)
    dec_steps = np.array([s for _, s, _, _ in decode], np.float32)
    dec_in_flight = np.array([f for _, _, f, _ in decode], np.float32)
    dec_cap = np.array([m for *_, m in decode], np.float32)
    table = pm.DecodeTable(batch_grid.astype(np.float32), dec_steps[b], dec_cap[b], dec_in_flight[b], cd.astype(np.float32))
    dec = pm.decode_max_rate(table, workload.decode_steps, tpot_s)
    pre, dec = np.asarray(pre, np.float64), np.asarray(dec, np.float64)  # (blocks until computed)
    model_s = time.perf_counter() - start

    goodput = np.minimum(pre, dec)
    gpus = np.array([c.num_gpus for c in candidates], np.float64)
    for arr in (pre, dec, goodput):
        arr.flags.writeable = False
    per_gpu = goodput / gpus
    per_gpu.flags.writeable = False
    return Screen(candidates, pre, dec, goodput, per_gpu, ttft_s, tpot_s, tuple(skipped), tables_s, model_s)


# -- confirmation by simulation ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Confirmed:
    """A placement's simulated goodput: the highest rate tried at which >= attainment of requests met
    both SLOs (0 when none did); ``complete`` is False when the wall-time budget cut its bisection
    (the goodput is then a lower bound)."""

    placement: Placement
    estimate: float
    goodput: float
    complete: bool
    tried: tuple[tuple[float, bool], ...]

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput / self.placement.num_gpus


@dataclasses.dataclass(frozen=True)
class PlacementResult:
    """The chosen placement (best simulated goodput per GPU among those confirmed), every confirmed
    placement in the order simulated, the screen (every candidate with its estimate), how many
    placements and ``simulate`` calls ran, whether the wall-time budget ran out (cutting the search
    short), and the search's wall seconds (screen excluded: ``screen.tables_s + screen.model_s``)."""

    chosen: Placement
    goodput: float
    goodput_per_gpu: float
    confirmed: tuple[Confirmed, ...]
    screen: Screen
    num_simulated: int
    num_simulations: int
    budget_spent: bool
    wall_s: float


class _BudgetSpent(Exception):
    pass


def promising(screen: Screen, top_k: int) -> tuple[int, ...]:
    """Indices of the ``top_k`` best candidates by estimated goodput per GPU with a positive
    estimate, one per family (the largest; see the module docstring)."""
    _positive_int("top_k", top_k)
    largest = {}  # family -> its member with the most GPUs
    for i, c in enumerate(screen.candidates):
        j = largest.setdefault(c.family(), i)
        if c.num_gpus > screen.candidates[j].num_gpus:
            largest[c.family()] = i
    out, seen = [], set()
    for i in screen.ranked():
        if screen.goodput[i] <= 0 or len(out) == top_k:
            break
        family = screen.candidates[i].family()
        if family not in seen:
            seen.add(family)
            out.append(largest[family])
    return tuple(out)


def search_placement(
    screen: Screen, simulate: Callable[[Placement, float], float], *, time_budget_s: float, top_k: int = 4,
    attainment: float = 0.9, rate_bounds: tuple[float, float] = (0.25, 2.0), rel_tol: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
) -> PlacementResult:  # fmt: skip
    """Confirms ``promising(screen, top_k)`` in order with ``simulate(placement, rate)`` (the SLO
    attainment, in [0, 1], of a run at ``rate`` req/s), bisecting each between ``rate_bounds`` times
    its estimate. A ``simulate`` call starts only while less than ``time_budget_s`` has passed by
    ``clock`` since the search began, except the first (so there is always an answer)."""
    budget = _positive("time_budget_s", time_budget_s)
    if not 0 < attainment <= 1:
        raise ValueError(f"attainment must be in (0, 1], got {attainment!r}")
    low_x, high_x = rate_bounds
    if not 0 < low_x < high_x:
        raise ValueError(f"rate_bounds must be 0 < low < high (multiples of the estimate), got {rate_bounds!r}")
    if not screen.candidates:
        raise ValueError("screen: no candidates to search")
    order = promising(screen, top_k)
    if not order:
        raise ValueError(
            f"no placement has a positive estimated goodput at ttft_s={screen.ttft_s}, tpot_s={screen.tpot_s}: "
            "even one request at a time misses an SLO; loosen the SLOs or allow more GPUs per instance"
        )
    start = clock()
    calls = 0
    confirmed, spent = [], False
    for i in order:
        placement, estimate = screen.candidates[i], float(screen.goodput[i])
        tried = []

        def passes(rate, placement=placement, tried=tried):
            nonlocal calls
            if calls and clock() - start >= budget:
                raise _BudgetSpent
            calls += 1
            value = simulate(placement, rate)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
                raise ValueError(f"simulate must return an SLO attainment in [0, 1], got {value!r} for {placement} at {rate}")
            tried.append((float(rate), bool(value >= attainment)))
            return tried[-1][1]

        try:
            search_max_rate(passes, estimate * low_x, estimate * high_x, rel_tol=rel_tol)
            complete = True
        except _BudgetSpent:
            complete, spent = False, True
        if tried:
            good = max((r for r, ok in tried if ok), default=0.0)
            confirmed.append(Confirmed(placement, estimate, good, complete, tuple(tried)))
        if spent:
            break
    best = max(confirmed, key=lambda c: c.goodput_per_gpu)  # first of equals: the better estimate
    return PlacementResult(best.placement, best.goodput, best.goodput_per_gpu, tuple(confirmed), screen,
                           len(confirmed), calls, spent, clock() - start)  # fmt: skip
