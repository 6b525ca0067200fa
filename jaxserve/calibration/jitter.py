"""StepJitter: the machine's measured step-time scatter, drawn per step by a hash of its shape.

The fitted model predicts a step's median; a real machine's step times scatter around it, and
tail latencies follow the scatter. The factors are the profile's own repeats (each sample /
its point's median); a step's factor is a pure function of its shape and a seed, so a cost
model using it stays deterministic and its closed-form decode runs stay bitwise step-by-step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxserve.calibration.profile_format import ProfilePoint

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
