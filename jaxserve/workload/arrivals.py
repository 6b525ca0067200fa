"""Synthetic arrival processes: sorted float64 arrival times in seconds, the first at 0.

Every process draws ``n - 1`` inter-arrival gaps and puts the first request at time 0, the same
convention as replayed traces (rebased to their first request), so the mean rate of ``n`` arrivals
is ``(n - 1) / times[-1]`` for every source.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

ARRIVAL_KINDS = ("poisson", "gamma", "fixed")


def check_positive(name: str, value) -> float:
    """Returns ``value`` as a float, or raises ValueError naming ``name`` unless finite and > 0."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_count(name: str, value) -> int:
    """Returns ``value`` as an int, or raises ValueError naming ``name`` unless an int >= 0."""
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _from_gaps(gaps: np.ndarray) -> np.ndarray:
    times = np.zeros(len(gaps) + 1, dtype=np.float64)
    np.cumsum(gaps, out=times[1:])
    return times


def poisson(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival times (s) of a Poisson process with ``rate`` requests/s: exponential gaps."""
    rate = check_positive("rate", rate)
    n = check_count("n", n)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    return _from_gaps(rng.exponential(1.0 / rate, n - 1))


def gamma(rate: float, cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival times (s) with Gamma gaps of mean ``1 / rate`` and coefficient of variation ``cv``.

    ``cv > 1`` is burstier than Poisson, ``cv < 1`` smoother; ``cv == 1`` is exactly ``poisson``
    (same draws for the same generator state).
    """
    rate = check_positive("rate", rate)
    cv = check_positive("cv", cv)
    n = check_count("n", n)
    if cv == 1.0:
        return poisson(rate, n, rng)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    # Gamma(k, theta) has mean k*theta and CV 1/sqrt(k).
    shape = 1.0 / (cv * cv)
    return _from_gaps(rng.gamma(shape, 1.0 / (rate * shape), n - 1))


def fixed_interval(rate: float, n: int) -> np.ndarray:
    """``n`` arrival times (s) exactly ``1 / rate`` apart (deterministic, no generator needed)."""
    rate = check_positive("rate", rate)
    n = check_count("n", n)
    return np.arange(n, dtype=np.float64) / rate


@dataclasses.dataclass(frozen=True)
class ArrivalProcess:
    """A named arrival process: ``kind`` in ``ARRIVAL_KINDS``, ``rate`` in requests/s, ``cv`` for gamma."""

    kind: str
    rate: float
    cv: float = 1.0

    def __post_init__(self):
        if self.kind not in ARRIVAL_KINDS:
            raise ValueError(f"kind must be one of {ARRIVAL_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "rate", check_positive("rate", self.rate))
        object.__setattr__(self, "cv", check_positive("cv", self.cv))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` sorted arrival times in seconds, the first at 0."""
        if self.kind == "poisson":
            return poisson(self.rate, n, rng)
        if self.kind == "gamma":
            return gamma(self.rate, self.cv, n, rng)
        return fixed_interval(self.rate, n)
