"""The step-time model a profile is fitted to, and the fit.

The step time is modelled as linear in the work the engine does for a step as it *runs* it,
padded (``StepGeometry.work``; seconds per unit)::

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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jaxserve.calibration.profile_format import ProfilePoint
from jaxserve.plan import BatchPlan
from jaxserve.runtime.step_geometry import WORK_TERMS, StepGeometry

# Token rows enter piecewise linearly, one slope per segment between these knots (the last one
# open-ended): a step's matmuls cost more per row at a few rows (matrix-vector kernels, fixed
# dispatch) than at hundreds, and more again once the activations outgrow the caches. The first row
# is in ``const`` (every step has one).
ROW_KNOTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
ROW_SEGMENTS = tuple(f"token_rows[{a}:{b}]" for a, b in zip(ROW_KNOTS, ROW_KNOTS[1:])) + (f"token_rows[{ROW_KNOTS[-1]}:]",)
_SEGMENT_BOUNDS = tuple(zip(ROW_KNOTS, ROW_KNOTS[1:] + (math.inf,)))
FEATURES = ("const",) + ROW_SEGMENTS + WORK_TERMS[1:]
UNITS = ("s/step",) + ("s/row",) * len(ROW_SEGMENTS) + ("s/slot", "s/key", "s/key", "s/pair", "s/key", "s/row")


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
