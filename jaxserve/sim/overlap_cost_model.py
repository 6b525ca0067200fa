"""Overlap-aware cost model: NanoFlow's nano-batched steps (shared/PAPERS.md §9) on the roofline.

A step's work is split by operation class (``RooflineCostModel.parts``), one device, all layers:

* **compute** (dense GEMMs: KQV, O, up/gate/down, LM head): FLOP time ``C_g``; with ``n``
  nano-batches every nano-GEMM reads the weights again, so alone it takes
  ``T_g = max(C_g, n·W + A)`` (W weights, A activations: the cost of splitting).
* **memory** (attention over the KV): ``max(C_a / r_m, K / P_m(r_m))`` on a share ``r_m`` of the SMs,
  its FLOPs scaling with the share and its KV streaming by the GEMV curve ``P_m``.
* **network** (the tensor-parallel collectives): ``(N + n·N_0) / P_n(r_n)`` on a share ``r_n``
  (``N_0``: a collective's fixed latency, paid by every nano-batch's collectives).

The curves are NanoFlow's R -> P profile (``jaxserve.sim.interference``); GEMMs run at P = R. The
``n`` nano-batches flow through the ``L`` layers' chain compute -> memory -> compute -> network, the
kinds running at once on their shares, GEMMs taking every SM the others leave (work-conserving).
The busy time is the pipeline's critical path, the largest of its bounds:

* SM time: ``T_g + r_m·t_m + r_n·t_n`` (a GEMM needs all of its SM time; the others only ``r·t``);
* each overlapped kind's own time ``t_m``, ``t_n``;
* HBM: ``n·W + A + K`` (the kinds share the memory bandwidth);
* the dependency chain: each nano-batch passes every layer's ops in order, GEMMs then on
  ``r_c = 1 - r_m - r_n`` of the SMs: ``(T_g / r_c + t_m + t_n) / n``;

plus the pipeline's fill, one nano-batch's chain through one layer. Host time and KV swaps (copy
engines) stay as in the roofline: host in series or hidden by async scheduling, swaps in series.

``n = 1`` is the unsplit step, ``RooflineCostModel.step`` exactly (its fused roofline: compute and
HBM traffic overlapped, collectives in series). A nano-batched schedule costs each step at the
smaller of the two, since an engine keeps the unsplit path for steps (a few decodes) the pipeline
would slow down. Every bound is a numpy expression, so the offline search (``nano_search``)
evaluates whole grids of schedules at once, with the same code as ``step``.

Not modelled: per-nano-operation shares that change within a layer (NanoFlow's Stage II varies R
per nano-op; ours are one share per kind), unequal nano-batch sizes, kernel launch overheads.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxserve.plan import BatchPlan
from jaxserve.sim.cost_model import RooflineCostModel, StepCost, StepParts
from jaxserve.sim.interference import NANOFLOW_A100, Interference


@dataclasses.dataclass(frozen=True)
class NanoSchedule:
    """A nano-batched step: ``num_nano`` equal nano-batches; the shares of the SMs the memory-bound
    (attention) and network-bound (collective) kinds run on while they overlap the GEMMs, which get
    the rest. ``num_nano = 1`` (shares 0) is the unsplit step."""

    num_nano: int = 1
    memory_share: float = 0.0
    network_share: float = 0.0

    def __post_init__(self):
        if not isinstance(self.num_nano, int) or isinstance(self.num_nano, bool) or self.num_nano < 1:
            raise ValueError(f"NanoSchedule.num_nano must be an int >= 1, got {self.num_nano!r}")
        for name in ("memory_share", "network_share"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"NanoSchedule.{name} must be in [0, 1), got {value!r}")
        if self.num_nano > 1 and not self.memory_share + self.network_share < 1.0:
            raise ValueError(f"NanoSchedule: memory_share + network_share must leave the GEMMs a share, got "
                             f"{self.memory_share} + {self.network_share}")

    def describe(self) -> str:
        if self.num_nano == 1:
            return "unsplit"
        return f"{self.num_nano} nano-batches, shares attention {self.memory_share:.1f} / collectives {self.network_share:.1f}"


def _time(work, rate):
    """``work / rate`` elementwise, 0 where there is no work (even at rate 0), inf where work has no rate."""
    work, rate = np.asarray(work, np.float64), np.asarray(rate, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(work > 0.0, work / rate, 0.0)


def overlapped_busy(p: StepParts, num_nano, memory_share, network_share, num_layers: int,
                    curves: Interference = NANOFLOW_A100):
    """Busy seconds of the nano-batched step (module docstring): the pipeline's critical path plus
    its fill. ``p``'s fields and the schedule's (``num_nano``, shares) broadcast as numpy arrays
    (the search passes a grid); shares of 0 give an infinite time to a kind that has work."""
    n = np.asarray(num_nano, np.float64)
    r_m, r_n = np.asarray(memory_share, np.float64), np.asarray(network_share, np.float64)
    gemm = np.maximum(p.gemm_compute_s, n * p.weights_s + p.act_s)
    kv = p.kv_s + p.copy_s
    attention = np.maximum(_time(p.attn_compute_s, r_m), _time(kv, curves.memory(r_m)))
    network = _time(p.comm_s + n * p.comm_fixed_s, curves.network(r_n))
    with np.errstate(invalid="ignore"):  # a share of 0 holds no SMs, even where its kind's time is inf
        sm_time = gemm + np.where(r_m > 0.0, r_m * attention, 0.0) + np.where(r_n > 0.0, r_n * network, 0.0)
    hbm = n * p.weights_s + p.act_s + kv
    chain = (_time(gemm, 1.0 - r_m - r_n) + attention + network) / n
    return functools.reduce(np.maximum, (sm_time, hbm, attention, network, chain)) + chain / num_layers


def nano_duration(base: RooflineCostModel, p: StepParts, num_nano, memory_share, network_share,
                  interference: Interference = NANOFLOW_A100) -> tuple:
    """``(duration, busy)`` of the nano-batched step on ``base``'s device: the overlapped busy time
    plus KV swaps, then the host's time in series, or hidden under it with ``base.async_scheduling``.
    Broadcasts like ``overlapped_busy``."""
    busy = overlapped_busy(p, num_nano, memory_share, network_share, base.model.num_layers, interference) + p.swap_s
    return (np.maximum(p.host_s, busy) if base.async_scheduling else p.host_s + busy), busy


class OverlapCostModel(RooflineCostModel):
    """The roofline of ``model`` on ``tp`` devices of ``hardware`` with steps nano-batched by
    ``schedule`` (module docstring); every other argument as ``RooflineCostModel``'s. Pipeline
    parallelism and power caps are not modelled here (pp = 1, no cap)."""

    def __init__(self, model, hardware, *, schedule: NanoSchedule = NanoSchedule(),
                 interference: Interference = NANOFLOW_A100, **roofline):
        super().__init__(model, hardware, **roofline)
        if not isinstance(schedule, NanoSchedule):
            raise ValueError(f"schedule must be a NanoSchedule, got {schedule!r}")
        if self.pp != 1:
            raise ValueError(f"the overlap cost model pipelines one device's layers; pp must be 1, got {self.pp}")
        if self.power_cap_w is not None:
            raise ValueError("the overlap cost model runs at a fixed clock; unset power_cap_w")
        if schedule.num_nano > 1 and self.tp > 1 and schedule.network_share <= 0.0:
            raise ValueError(f"tp={self.tp} has collectives to overlap: schedule.network_share must be > 0")
        self.schedule, self.interference = schedule, interference

    @classmethod
    def like(cls, roofline: RooflineCostModel, schedule: NanoSchedule, *, async_scheduling: bool | None = None,
             interference: Interference = NANOFLOW_A100) -> "OverlapCostModel":
        """The device, model and efficiencies of ``roofline`` with steps nano-batched by ``schedule``
        (and its host scheduling unless ``async_scheduling`` is given)."""
        r = roofline
        return cls(r.model, r.hardware, schedule=schedule, interference=interference, tp=r.tp, pp=r.pp, dtype=r.dtype,
                   mfu=r.mfu, mbu=r.mbu, step_overhead_s=r.step_overhead_s, per_seq_overhead_s=r.per_seq_overhead_s,
                   kv_dtype=r.kv_dtype, link_efficiency=r.link_efficiency, collective_latency_s=r.collective_latency_s,
                   host_bandwidth=r.host_bandwidth, frequency_mhz=r.frequency_mhz, power_cap_w=r.power_cap_w,
                   async_scheduling=r.async_scheduling if async_scheduling is None else async_scheduling)  # fmt: skip

    def __repr__(self) -> str:
        return f"OverlapCostModel({super().__repr__().partition('(')[2][:-1]}, schedule={self.schedule})"

    def step(self, plan: BatchPlan) -> StepCost:
        if self.schedule.num_nano == 1 or not len(plan.num_new_tokens):
            return super().step(plan)
        duration, energy, compute, memory, comm = self.costs(self.parts(plan))
        return StepCost(float(duration), float(energy), float(compute), float(memory), float(comm))

    def decode_run(self, num_rows: int, context_tokens: int, max_context: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As ``RooflineCostModel.decode_run``: element j equals ``step`` of the run's step j bit for bit."""
        if self.schedule.num_nano == 1:
            return super().decode_run(num_rows, context_tokens, max_context, k)
        computed = (context_tokens + num_rows * np.arange(k, dtype=np.int64)).astype(np.float64)
        duration, energy, *_ = self.costs(self.decode_parts(num_rows, computed))
        return duration, energy

    def costs(self, p: StepParts) -> tuple:
        """``(duration, energy, compute, memory, comm)`` of the step with terms ``p`` (floats or
        arrays): the nano-batched step, or the unsplit one where that is faster."""
        s = self.schedule
        duration, busy = nano_duration(self, p, s.num_nano, s.memory_share, s.network_share, self.interference)
        compute = p.gemm_compute_s + p.attn_compute_s
        memory = s.num_nano * p.weights_s + p.act_s + p.kv_s + p.copy_s
        comm = p.comm_s + s.num_nano * p.comm_fixed_s + p.swap_s
        _, scale = self._power.clocked(compute, memory)  # uncapped: the set clock's scale
        energy = self._power.energy(duration, busy, compute, memory, scale)
        unsplit = self.combine(p, np.maximum)
        faster = duration < unsplit[0]
        return tuple(np.where(faster, ours, theirs) for ours, theirs in zip((duration, energy, compute, memory, comm), unsplit))


def sequential_ops_s(cost_model: RooflineCostModel, plan: BatchPlan) -> float:
    """Seconds of ``plan`` run operation by operation with nothing overlapped, as engines without
    fusion run their kernels: GEMMs, then attention, each at its own roofline, then the collectives
    and the host. A reference point for how much the fused roofline already overlaps."""
    p = cost_model.parts(plan)
    gemm = max(p.gemm_compute_s, p.weights_s + p.act_s)
    attention = max(p.attn_compute_s, p.kv_s + p.copy_s)
    return p.host_s + gemm + attention + p.comm_s + p.comm_fixed_s + p.swap_s

