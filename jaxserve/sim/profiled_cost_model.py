"""ProfiledCostModel: simulator step durations fitted to measurements of the real engine.

A profile (``python -m jaxserve.profile``, format in ``jaxserve/profile.py``) holds the engine's
measured step time over a grid of batch shapes, and the runner's ``StepGeometry`` (its bucket
grids and attention path). The step time is modelled as linear in the work the engine does for a
step as it *runs* it, padded (``StepGeometry.work``; seconds per unit)::

    duration_s = c_const + Σ_j c_rows_j · token_rows_j + c_slots · sample_slots
               + c_dk · decode_attention_keys + c_dr · decode_kv_read
               + c_pk · prefill_attention_keys + c_pr · prefill_kv_read + c_seqs · num_seqs

where ``token_rows_j`` are the padded rows falling in segment j of ``ROW_KNOTS`` (a piecewise-linear
cost of the step's row count: per row, a few rows cost far more than hundreds).

Counting the plan's real tokens instead would miss what dominates a small step on the CPU engine:
its matmuls run over the bucket's padded rows, and the grouped attention visits every row's
longest-context chunks (a batch of one long and many short decodes computes the long one for
all, while each row reads only its own KV: compute and memory traffic are separate terms).

Every coefficient is a cost, so the fit is non-negative least squares. It minimizes the *relative*
squared error Σ ((pred − t) / t)² over the points' median times: step times span orders of
magnitude (a 1-row decode vs a 2048-token prefill), and an absolute fit would spend itself on the
largest points while the simulator mostly runs small decode steps. The problem is small (20
unknowns, ~100 points) and solved exactly by an active-set NNLS; no gradient optimizer is needed.

What a profile does not measure comes from a ``RooflineCostModel`` of the profiled model on the
configured hardware: KV capacity (device memory minus weights), energy (see ``ProfiledCostModel``),
price, and KV swaps over the host link (added to the step, as the roofline models them). The
engine runs on one device, so the roofline is built with tp = pp = 1.

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
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from jaxserve.engine.buckets import WORK_TERMS, StepGeometry
from jaxserve.plan import BatchPlan
from jaxserve.sim.cost_model import PROFILE_NUM_SEQS, PROFILE_NUM_TOKENS, RooflineCostModel, StepCost
from jaxserve.sim.hardware import HardwareSpec
from jaxserve.sim.models import ModelSpec

if TYPE_CHECKING:  # not at run time: `python -m jaxserve.profile` must not find itself imported by jaxserve.sim
    from jaxserve.profile import Profile, ProfilePoint

# Token rows enter piecewise linearly, one slope per segment between these knots (the last one
# open-ended): a step's matmuls cost more per row at a few rows (matrix-vector kernels, fixed
# dispatch) than at hundreds, and more again once the activations outgrow the caches. The first row
# is in ``const`` (every step has one).
ROW_KNOTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
ROW_SEGMENTS = tuple(f"token_rows[{a}:{b}]" for a, b in zip(ROW_KNOTS, ROW_KNOTS[1:])) + (f"token_rows[{ROW_KNOTS[-1]}:]",)
_SEGMENT_BOUNDS = tuple(zip(ROW_KNOTS, ROW_KNOTS[1:] + (math.inf,)))
FEATURES = ("const",) + ROW_SEGMENTS + WORK_TERMS[1:]
UNITS = ("s/step",) + ("s/row",) * len(ROW_SEGMENTS) + ("s/slot", "s/key", "s/key", "s/pair", "s/key", "s/row")
# The profile's jnp dtype names -> the roofline's.
ROOFLINE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


# -- features ----------------------------------------------------------------------------------------


def _row_segments(token_rows: float) -> list[float]:
    """Rows of ``token_rows`` (a scalar) falling in each segment of ``ROW_SEGMENTS``."""
    return [min(max(token_rows - a, 0.0), b - a) for a, b in _SEGMENT_BOUNDS]


def work_features(work: Sequence[float]) -> np.ndarray:
    """float64 [len(FEATURES)] of ``StepGeometry.work`` terms."""
    return np.array([1.0] + _row_segments(work[0]) + [float(v) for v in work[1:]])


def point_features(point: ProfilePoint, geometry: StepGeometry) -> np.ndarray:
    """float64 [len(FEATURES)] of a profile point run under ``geometry``."""
    return work_features(geometry.work(point.prefill_chunk_lens, point.prefill_context, point.decode_context))


def plan_work(plan: BatchPlan, geometry: StepGeometry) -> tuple[float, ...]:
    """``StepGeometry.work`` of a non-empty plan. Rows with one new token are decodes, as the engine
    packs them."""
    n, c = plan.num_new_tokens, plan.num_computed_tokens
    if plan.num_tokens == len(n):  # all decodes: the simulator's common case, no masking
        return geometry.work(n[:0], c[:0], c)
    dec = n == 1
    pre = ~dec
    return geometry.work(n[pre], c[pre], c[dec])


# -- the fit -----------------------------------------------------------------------------------------


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x − b||₂ subject to x ≥ 0 (Lawson–Hanson active set, exact at convergence).
    Columns are scaled to unit max first (the features span 1 to ~10^9); all-zero columns get 0."""
    from scipy.optimize import nnls as lawson_hanson

    a = np.asarray(a, np.float64)
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    x, _ = lawson_hanson(a / scale, np.asarray(b, np.float64), maxiter=50 * a.shape[1])
    return x / scale


@dataclasses.dataclass(frozen=True)
class StepTimeModel:
    """Fitted coefficients, one per ``FEATURES`` entry (units ``UNITS``), each finite and >= 0."""

    coefficients: tuple[float, ...]

    def __post_init__(self):
        if len(self.coefficients) != len(FEATURES):
            raise ValueError(f"StepTimeModel needs {len(FEATURES)} coefficients {FEATURES}, got {len(self.coefficients)}")
        for name, value in zip(FEATURES, self.coefficients):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"StepTimeModel coefficient {name} must be a finite number >= 0, got {value!r}")
        # Python floats, so step() does scalar float arithmetic (not numpy scalar promotion).
        object.__setattr__(self, "coefficients", tuple(float(v) for v in self.coefficients))

    def duration(self, token_rows, sample_slots, decode_keys, decode_read, prefill_keys, prefill_read, num_seqs):
        """Seconds from the ``StepGeometry.work`` terms (``token_rows`` a scalar, the others scalars or
        float64 arrays). The one expression both ``step`` and ``decode_run`` evaluate (same
        operations in the same order: bitwise-equal results)."""
        c = self.coefficients
        total = c[0]
        for coef, rows in zip(c[1:], _row_segments(token_rows)):
            total += coef * rows
        c_slots, c_dk, c_dr, c_pk, c_pr, c_seqs = c[1 + len(ROW_SEGMENTS):]
        return (total + c_slots * sample_slots + c_dk * decode_keys + c_dr * decode_read + c_pk * prefill_keys
                + c_pr * prefill_read + c_seqs * num_seqs)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Seconds per row of ``features`` float64 [n, len(FEATURES)]."""
        return np.asarray(features, np.float64) @ np.array(self.coefficients)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(FEATURES, self.coefficients))


@dataclasses.dataclass(frozen=True)
class FitReport:
    """How well a fit explains the profile. Errors are fractions (0.05 = 5%): MAPE is the mean of
    |predicted − measured| / measured over the points' medians, ``*_max_ape`` the largest such
    error; the held-out ones are NaN when no point was held out. ``unidentified`` lists features no
    training point exercises (their coefficient is 0: the profile says nothing about them), except
    token-row segments past the profile's largest step: those are ``extrapolated`` (they take the
    slope of the last segment it reaches)."""

    coefficients: dict
    num_train: int
    num_holdout: int
    train_mape: float
    train_max_ape: float
    holdout_mape: float
    holdout_max_ape: float
    unidentified: tuple[str, ...]
    extrapolated: tuple[str, ...] = ()

    def summary(self) -> str:
        def pct(x):
            return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"

        lines = [
            f"fit on {self.num_train} points ({self.num_holdout} held out): train MAPE {pct(self.train_mape)} "
            f"(max {pct(self.train_max_ape)}), held-out MAPE {pct(self.holdout_mape)} (max {pct(self.holdout_max_ape)})"
        ]
        lines += [f"  {name} = {value:.4g} {unit}" for (name, value), unit in zip(self.coefficients.items(), UNITS)]
        if self.unidentified:
            lines.append(f"  not exercised by the profile (coefficient 0): {', '.join(self.unidentified)}")
        if self.extrapolated:
            lines.append(f"  beyond the profile's largest step (slope extrapolated): {', '.join(self.extrapolated)}")
        return "\n".join(lines)


def _ape(model: StepTimeModel, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(model.predict(x) - y) / y


def fit(
    points: Sequence[ProfilePoint], geometry: StepGeometry, holdout_fraction: float = 0.2, seed: int = 0
) -> tuple[StepTimeModel, FitReport]:
    """Fits the step-time model to ``points`` (their median times, measured under ``geometry``), holding a random
    ``holdout_fraction`` of them out (at least one point is kept for training) to report the error
    on shapes the fit has not seen. ``ValueError`` on no points or a fraction outside [0, 1)."""
    if not points:
        raise ValueError("fit needs at least one profile point")
    if not isinstance(holdout_fraction, (int, float)) or not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
    x = np.stack([point_features(p, geometry) for p in points])
    y = np.array([p.median_s for p in points])
    n = len(points)
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = min(n - 1, int(round(holdout_fraction * n)))
    hold, train = perm[:n_hold], perm[n_hold:]
    xt, yt = x[train], y[train]
    coef = nnls(xt / yt[:, None], np.ones(len(train)))
    # Segments are reached in order (a step of T rows fills every segment below T): the ones no
    # training step reaches continue the last reached slope instead of pricing those rows at 0.
    reached = [j for j in range(1, 1 + len(ROW_SEGMENTS)) if np.any(xt[:, j])]
    beyond = range(reached[-1] + 1, 1 + len(ROW_SEGMENTS)) if reached else range(0)
    for j in beyond:
        coef[j] = coef[reached[-1]]
    model = StepTimeModel(tuple(float(v) for v in coef))
    train_err = _ape(model, xt, yt)
    hold_err = _ape(model, x[hold], y[hold]) if n_hold else np.array([math.nan])
    report = FitReport(
        coefficients=model.as_dict(),
        num_train=len(train),
        num_holdout=int(n_hold),
        train_mape=float(train_err.mean()),
        train_max_ape=float(train_err.max()),
        holdout_mape=float(hold_err.mean()),
        holdout_max_ape=float(hold_err.max()),
        unidentified=tuple(name for j, name in enumerate(FEATURES) if not np.any(xt[:, j]) and j not in beyond),
        extrapolated=tuple(FEATURES[j] for j in beyond),
    )
    return model, report


# -- jitter ------------------------------------------------------------------------------------------

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer over uint64 arrays (wrapping arithmetic): a well-mixed hash."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


@dataclasses.dataclass(frozen=True)
class StepJitter:
    """Measured step-time scatter: ``factors`` float64 [n], sorted, each a profile sample's time
    divided by its point's median (so their median is about 1 and their mean is the machine's
    mean/median step-time ratio). ``factor`` picks one per step from a hash of the step's shape."""

    factors: np.ndarray
    seed: int = 0

    def __post_init__(self):
        f = np.sort(np.asarray(self.factors, np.float64))
        if f.ndim != 1 or not len(f) or not np.isfinite(f).all() or (f <= 0).any():
            raise ValueError("StepJitter needs a non-empty 1-d array of finite factors > 0")
        f.setflags(write=False)
        object.__setattr__(self, "factors", f)

    @classmethod
    def from_points(cls, points: Sequence[ProfilePoint], seed: int = 0) -> StepJitter:
        """From every sample of points with at least 2 samples (a single sample is its own median)."""
        ratios = [np.asarray(p.times_s) / p.median_s for p in points if len(p.times_s) >= 2]
        if not ratios:
            raise ValueError("step jitter needs profile points with at least 2 samples each (--repeats >= 2)")
        return cls(np.concatenate(ratios), seed)

    def factor(self, num_seqs, num_tokens, context_tokens, max_context) -> np.ndarray:
        """float64 factors, one per element of the (broadcast) integer arguments: the same step
        shape always gets the same factor."""
        keys = np.broadcast_arrays(*(np.asarray(v, np.int64).astype(np.uint64) for v in
                                     (num_seqs, num_tokens, context_tokens, max_context)))  # fmt: skip
        h = np.full(keys[0].shape, np.uint64(self.seed) & _MASK64, np.uint64)
        with np.errstate(over="ignore"):
            for k in keys:
                h = _splitmix64(h ^ k)
        return self.factors[(h % np.uint64(len(self.factors))).astype(np.int64)]

    @property
    def mean(self) -> float:
        return float(self.factors.mean())


# -- the cost model ----------------------------------------------------------------------------------


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
    """Step costs from a fitted ``StepTimeModel``; the rest from ``roofline`` (same model, one device).

    ``step(plan)`` and ``decode_run`` have RooflineCostModel's signatures and contracts. Duration:
    the fitted expression, plus the roofline's host-link time when the plan swaps KV blocks (the
    profile measures no swaps; copy-on-write copies are not modelled either). Energy is modelled,
    not measured: the devices draw idle power for the whole measured duration, plus dynamic power
    for the roofline's busy time of the same work, at most for the whole duration (utilization
    capped at 1) — 0 on hardware without a power model. ``StepCost.compute_s``/``memory_s`` are 0:
    a measured time is not split into compute and memory; ``comm_s`` is the swap time. With
    ``jitter`` the fitted time is multiplied by the step's jitter factor (module docstring).
    """

    def __init__(self, step_time: StepTimeModel, geometry: StepGeometry, roofline: RooflineCostModel,
                 fit_report: FitReport | None = None, jitter: StepJitter | None = None):
        if roofline.num_devices != 1:
            raise ValueError(f"a profile measures one device; the roofline has tp={roofline.tp}, pp={roofline.pp}")
        self.step_time = step_time
        self.geometry = geometry
        self.roofline = roofline
        self.fit_report = fit_report
        self.jitter = jitter
        self._models_energy = roofline.models_energy
        hw = roofline.hardware
        self._idle_w = roofline.idle_power_w()
        self._dyn_w = (hw.power_max_w - hw.power_idle_w) * roofline.num_devices if self._models_energy else 0.0

    @classmethod
    def from_profile(cls, profile: Profile, hardware: HardwareSpec, *, jitter: bool = False,
                     jitter_seed: int = 0) -> ProfiledCostModel:
        """Fitted on every point of ``profile`` (the simulator uses all measurements; ``fit`` with a
        holdout is for judging the model); KV, energy and price from ``hardware``; with ``jitter``,
        step times scatter as the profile's repeats did (``StepJitter``, hashed with ``jitter_seed``)."""
        dtype = ROOFLINE_DTYPES[profile.dtype]
        if dtype not in hardware.peak_flops_by_dtype and not hardware.has_power_model:
            # The roofline's compute peak only feeds its busy time, i.e. energy, which this hardware
            # does not model; weights and KV keep the profile's dtype. (E.g. a bf16 model on "cpu".)
            peaks = dict(hardware.peak_flops_by_dtype)
            hardware = dataclasses.replace(hardware, peak_flops_by_dtype={**peaks, dtype: max(peaks.values())})
        roofline = RooflineCostModel(model_spec(profile), hardware, dtype=dtype)
        step_time, report = fit(profile.points, profile.engine, holdout_fraction=0.0)
        scatter = StepJitter.from_points(profile.points, jitter_seed) if jitter else None
        return cls(step_time, profile.engine, roofline, report, scatter)

    # -- queries (delegated) -----------------------------------------------------------------------
    @property
    def model(self) -> ModelSpec:
        return self.roofline.model

    @property
    def hardware(self) -> HardwareSpec:
        return self.roofline.hardware

    @property
    def num_devices(self) -> int:
        return self.roofline.num_devices

    @property
    def models_energy(self) -> bool:
        return self._models_energy

    def idle_power_w(self) -> float:
        return self.roofline.idle_power_w()

    def cost_usd_per_hour(self) -> float:
        return self.roofline.cost_usd_per_hour()

    def activation_reserve_bytes(self, num_tokens: int = PROFILE_NUM_TOKENS, num_seqs: int = PROFILE_NUM_SEQS) -> int:
        return self.roofline.activation_reserve_bytes(num_tokens, num_seqs)

    def kv_capacity_blocks(self, block_size: int, gpu_memory_utilization: float = 0.9,
                           activation_reserve_bytes: int | None = None) -> int:
        """KV blocks that fit the hardware's memory after the profiled model's weights (roofline)."""
        return self.roofline.kv_capacity_blocks(block_size, gpu_memory_utilization, activation_reserve_bytes)

    def __repr__(self) -> str:
        coef = ", ".join(f"{k}={v:.3g}" for k, v in self.step_time.as_dict().items())
        return f"ProfiledCostModel({self.model.name}, {self.hardware.name}, {coef})"

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
        roof = self.roofline.step(plan) if (swaps or self._models_energy) else None
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
