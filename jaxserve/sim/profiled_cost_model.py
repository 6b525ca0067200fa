"""ProfiledCostModel: simulator step durations fitted to measurements of the real engine.

A profile (``python -m jaxserve.profile``, format in ``jaxserve/calibration/profile_format.py``) holds the engine's
measured step time over a grid of batch shapes, and the runner's ``StepGeometry`` (its bucket
grids and attention path). The step time is linear in the padded work the engine does for a step as it runs it
(``StepGeometry.work``), with non-negative coefficients fitted by ``jaxserve.calibration.fit``
(whose docstring gives the model and why it counts padded work).

What a profile does not measure comes from a ``RooflineCostModel`` of the profiled model on the
profiled machine (the profile's ``device``, looked up by ``hardware_for_device``): KV capacity (device memory minus weights), energy (see ``ProfiledCostModel``),
price, and KV swaps over the host link (added to the step, as the roofline models them). The
engine runs on one device, so the roofline is built with tp = pp = 1. A machine the table does not
list has no roofline: its KV pool size must be given, and its energy and price are unknown.

Optionally (``jitter=True``; ``sim.profile_jitter``) every step's fitted time is multiplied by a
*jitter factor* drawn from the profile's own repeats (each sample's time / its point's median,
``StepJitter``): the fitted expression predicts a step's median, while a real machine's step times
scatter around it (on the validation CPU by ~9 % on average, with a right tail), and that scatter is
what sets tail latencies such as P99 TBT and part of the mean busy time. A step's factor is a pure
function of its shape (a hash of rows, tokens, total and longest context, and a seed), so runs stay
deterministic and the fast path still matches step-by-step bit for bit.

``decode_run`` evaluates the same expression as ``step`` in the same order, so the simulator's fast
path gives step-by-step durations and energies bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.calibration.fit import FitReport, StepTimeModel, fit, plan_work
from jaxserve.calibration.jitter import StepJitter
from jaxserve.calibration.profile_format import Profile
from jaxserve.plan import BatchPlan
from jaxserve.runtime.step_geometry import StepGeometry
from jaxserve.sim.cost_model import PROFILE_NUM_SEQS, PROFILE_NUM_TOKENS, RooflineCostModel, StepCost
from jaxserve.sim.hardware import HardwareSpec, hardware_for_device
from jaxserve.sim.models import ModelSpec

# The profile's jnp dtype names -> the roofline's.
ROOFLINE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def model_spec(profile: Profile) -> ModelSpec:
    """The profiled model's shape for the roofline parts (KV bytes, weights). An output-projection
    bias (``o_bias``) is left out: ``hidden_size`` parameters per layer, nothing a KV budget sees."""
    cfg = profile.model_config()
    return ModelSpec(
        name=profile.model_name or f"profiled-{cfg.model_type}",
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        mlp="swiglu",
        tie_word_embeddings=cfg.tie_word_embeddings,
        qkv_bias=cfg.qkv_bias,
        rope_theta=cfg.rope_theta,
    )


class ProfiledCostModel:
    """Step costs from a fitted ``StepTimeModel``; the rest from ``roofline`` (same model, one device
    of the profiled machine), or unknown when ``roofline`` is None (a machine jaxserve.sim.hardware
    does not list: KV capacity must then be given, and energy and price are not modelled).

    ``step(plan)`` and ``decode_run`` have RooflineCostModel's signatures and contracts. Duration:
    the fitted expression, plus the roofline's host-link time when the plan swaps KV blocks (the
    profile measures no swaps; copy-on-write copies are not modelled either). Energy is modelled,
    not measured: the devices draw idle power for the whole measured duration, plus dynamic power
    for the roofline's busy time of the same work, at most for the whole duration (utilization
    capped at 1) — 0 on hardware without a power model. ``StepCost.compute_s``/``memory_s`` are 0:
    a measured time is not split into compute and memory; ``comm_s`` is the swap time. With
    ``jitter`` the fitted time is multiplied by the step's jitter factor (module docstring).
    """

    def __init__(self, step_time: StepTimeModel, geometry: StepGeometry, model: ModelSpec, machine: str,
                 roofline: RooflineCostModel | None, fit_report: FitReport | None = None,
                 jitter: StepJitter | None = None):
        if roofline is not None and roofline.num_devices != 1:
            raise ValueError(f"a profile measures one device; the roofline has tp={roofline.tp}, pp={roofline.pp}")
        self.step_time = step_time
        self.geometry = geometry
        self.model = model
        self.machine = machine
        self.roofline = roofline
        self.fit_report = fit_report
        self.jitter = jitter
        self._models_energy = roofline is not None and roofline.models_energy
        self._idle_w = roofline.idle_power_w() if roofline is not None else 0.0
        hw = self.hardware
        self._dyn_w = hw.power_max_w - hw.power_idle_w if self._models_energy else 0.0

    @classmethod
    def from_profile(cls, profile: Profile, hardware: HardwareSpec | None = None, *,
                     jitter: bool = False, jitter_seed: int = 0) -> ProfiledCostModel:
        """Fitted on every point of ``profile`` (the simulator uses all measurements; ``fit`` with a
        holdout is for judging the model); KV, energy and price from ``hardware``, by default the
        profile's own machine (``hardware_for_device``; unknown when it is not in the table); with
        ``jitter``, step times scatter as the profile's repeats did (``StepJitter``, hashed with ``jitter_seed``)."""
        if hardware is None:
            hardware = hardware_for_device(profile.device["backend"], profile.device["kind"])
        model = model_spec(profile)
        roofline = None
        if hardware is not None:
            dtype = ROOFLINE_DTYPES[profile.dtype]
            if dtype not in hardware.peak_flops_by_dtype and not hardware.has_power_model:
                # The roofline's compute peak only feeds its busy time, i.e. energy, which this hardware
                # does not model; weights and KV keep the profile's dtype. (E.g. a bf16 model on "cpu".)
                peaks = dict(hardware.peak_flops_by_dtype)
                hardware = dataclasses.replace(hardware, peak_flops_by_dtype={**peaks, dtype: max(peaks.values())})
            roofline = RooflineCostModel(model, hardware, dtype=dtype)
        machine = hardware.name if hardware is not None else profile.device["kind"] or profile.device["backend"]
        step_time, report = fit(profile.points, profile.engine, holdout_fraction=0.0)
        scatter = StepJitter.from_points(profile.points, jitter_seed) if jitter else None
        return cls(step_time, profile.engine, model, machine, roofline, report, scatter)

    # -- queries (delegated) -----------------------------------------------------------------------
    @property
    def hardware(self) -> HardwareSpec | None:
        """The profiled machine's spec; None when jaxserve.sim.hardware does not list it."""
        return None if self.roofline is None else self.roofline.hardware

    @property
    def num_devices(self) -> int:
        return 1

    @property
    def models_energy(self) -> bool:
        return self._models_energy

    def idle_power_w(self) -> float:
        return self._idle_w

    def cost_usd_per_hour(self) -> float | None:
        """The machine's on-demand price; None when the machine is unknown."""
        return None if self.roofline is None else self.roofline.cost_usd_per_hour()

    def _known(self, what: str) -> RooflineCostModel:
        if self.roofline is None:
            raise ValueError(f"the profiled machine {self.machine!r} is not in jaxserve.sim.hardware, so {what} "
                             "is unknown")
        return self.roofline

    def activation_reserve_bytes(self, num_tokens: int = PROFILE_NUM_TOKENS, num_seqs: int = PROFILE_NUM_SEQS) -> int:
        return self._known("its memory").activation_reserve_bytes(num_tokens, num_seqs)

    def kv_capacity_blocks(self, block_size: int, gpu_memory_utilization: float = 0.9,
                           activation_reserve_bytes: int | None = None) -> int:
        """KV blocks that fit the machine's memory after the profiled model's weights (roofline);
        ``ValueError`` when the machine's memory is unknown (give the pool size instead)."""
        roofline = self._known("its memory (set kv.num_blocks)")
        return roofline.kv_capacity_blocks(block_size, gpu_memory_utilization, activation_reserve_bytes)

    def __repr__(self) -> str:
        coef = ", ".join(f"{k}={v:.3g}" for k, v in self.step_time.as_dict().items())
        return f"ProfiledCostModel({self.model.name}, {self.machine}, {coef})"

    # -- the step ----------------------------------------------------------------------------------
    def _energy(self, duration, roof_duration, roof_energy):
        """Idle power over ``duration`` plus the roofline's dynamic energy (its energy minus its idle
        part), capped at full dynamic power over ``duration``; scalars or arrays alike."""
        dynamic = np.minimum(np.maximum(roof_energy - self._idle_w * roof_duration, 0.0), self._dyn_w * duration)
        return self._idle_w * duration + dynamic

    def step(self, plan: BatchPlan) -> StepCost:
        """Cost of ``plan``; an empty plan costs nothing (as the roofline's)."""
        if not plan.num_seqs:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0)
        duration = self.step_time.duration(*plan_work(plan, self.geometry))
        if self.jitter is not None:
            c = plan.num_computed_tokens
            duration = duration * float(self.jitter.factor(plan.num_seqs, plan.num_tokens, c.sum(), c.max())[()])
        swaps = bool(plan.swap_out_blocks or plan.swap_in_blocks)
        roof = self._known("its host link (KV swaps)").step(plan) if (swaps or self._models_energy) else None
        comm = 0.0
        if swaps:  # only then, so a plain step stays the exact expression decode_run evaluates
            comm = roof.comm_s
            duration += comm
        energy = float(self._energy(duration, roof.duration_s, roof.energy_j)) if self._models_energy else 0.0
        return StepCost(float(duration), energy, 0.0, 0.0, comm)

    def decode_run(self, num_rows: int, context_tokens: int, max_context: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Durations and energies of ``k`` consecutive decode steps of the same ``num_rows`` rows whose
        contexts sum to ``context_tokens`` (the longest ``max_context``) at the first step (each step
        adds one token per row); element j equals ``step(plan_j)`` bit for bit."""
        durations = self.step_time.duration(*self.geometry.decode_work(num_rows, context_tokens, max_context, k))
        if self.jitter is not None:
            j = np.arange(k, dtype=np.int64)
            durations = durations * self.jitter.factor(num_rows, num_rows, context_tokens + num_rows * j, max_context + j)
        if not self._models_energy:
            return durations, np.zeros(k)
        roof_durations, roof_energies = self.roofline.decode_run(num_rows, context_tokens, max_context, k)
        return durations, self._energy(durations, roof_durations, roof_energies)
