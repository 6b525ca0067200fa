"""Token-length distributions.

Scalar distributions (``Fixed``, ``Uniform``, ``Zipf``) sample ``n`` lengths as an int64 array of
shape ``(n,)``. Pair distributions (``Pair`` of two scalars, ``Empirical`` rows of a trace) sample
``(prompt_len, output_len)`` rows as an int64 array of shape ``(n, 2)``; the workload builder takes
a pair distribution. Every sampled length is >= 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Protocol

import numpy as np

from jaxserve.workload import traces
from jaxserve.workload.arrivals import check_count


class LengthDistribution(Protocol):
    @property
    def mean(self) -> float:
        """Expected length in tokens."""

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` lengths, int64, shape ``(n,)``, all >= 1."""


class PairDistribution(Protocol):
    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` (prompt_len, output_len) rows, int64, shape ``(n, 2)``, all >= 1."""


def _check_length(owner: str, name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ValueError(f"{owner}.{name} must be an int >= 1, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Fixed:
    """Always ``value`` tokens."""

    value: int

    def __post_init__(self):
        object.__setattr__(self, "value", _check_length("Fixed", "value", self.value))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(check_count("n", n), self.value, dtype=np.int64)

    @property
    def mean(self) -> float:
        return float(self.value)


@dataclasses.dataclass(frozen=True)
class Uniform:
    """Uniform over the integers ``low..high`` inclusive."""

    low: int
    high: int

    def __post_init__(self):
        object.__setattr__(self, "low", _check_length("Uniform", "low", self.low))
        object.__setattr__(self, "high", _check_length("Uniform", "high", self.high))
        if self.high < self.low:
            raise ValueError(f"Uniform.high must be >= low={self.low}, got {self.high}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.low, self.high, size=check_count("n", n), endpoint=True, dtype=np.int64)

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2.0


@dataclasses.dataclass(frozen=True)
class Zipf:
    """Bounded Zipf on ``low..high``: ``P(low + r) ∝ (r + 1) ** -a`` for rank ``r = 0..high-low``.

    The rank form is Vidur's ``ZipfGenerator`` (without scrambling): mass piles up at ``low`` and
    ``a = 0`` is uniform. Sampling is an inverse-CDF lookup over the ``high - low + 1`` support.
    """

    a: float
    low: int
    high: int

    def __post_init__(self):
        ok = isinstance(self.a, numbers.Real) and not isinstance(self.a, bool) and math.isfinite(self.a)
        if not ok or self.a < 0:
            raise ValueError(f"Zipf.a must be a finite number >= 0, got {self.a!r}")
        object.__setattr__(self, "a", float(self.a))
        object.__setattr__(self, "low", _check_length("Zipf", "low", self.low))
        object.__setattr__(self, "high", _check_length("Zipf", "high", self.high))
        if self.high < self.low:
            raise ValueError(f"Zipf.high must be >= low={self.low}, got {self.high}")

    @functools.cached_property
    def _pmf(self) -> np.ndarray:
        weights = np.arange(1, self.high - self.low + 2, dtype=np.float64) ** -self.a
        return weights / weights.sum()

    @functools.cached_property
    def _cdf(self) -> np.ndarray:
        cdf = np.cumsum(self._pmf)
        cdf[-1] = 1.0  # rounding must not leave a sliver above the last bin
        return cdf

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(check_count("n", n))
        return self.low + np.searchsorted(self._cdf, u, side="right").astype(np.int64)

    @property
    def mean(self) -> float:
        return float(self.low + np.dot(np.arange(len(self._pmf)), self._pmf))


@dataclasses.dataclass(frozen=True)
class Pair:
    """Prompt and output lengths drawn independently from two scalar distributions."""

    prompt: LengthDistribution
    output: LengthDistribution

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        n = check_count("n", n)
        return np.stack([self.prompt.sample(n, rng), self.output.sample(n, rng)], axis=1)

    @property
    def mean(self) -> tuple[float, float]:
        """Mean (prompt, output) length."""
        return self.prompt.mean, self.output.mean


@dataclasses.dataclass(frozen=True, eq=False)
class Empirical:
    """(prompt, output) rows drawn jointly, with replacement, from observed pairs.

    Sampling whole rows keeps the correlation between prompt and output length that independent
    marginals would lose. Arrays are int64, equal length, non-empty, all >= 1 (read-only copies).
    """

    prompt_lens: np.ndarray
    output_lens: np.ndarray

    def __post_init__(self):
        prompt = np.array(self.prompt_lens, dtype=np.int64, copy=True)
        output = np.array(self.output_lens, dtype=np.int64, copy=True)
        if prompt.ndim != 1 or output.shape != prompt.shape or not len(prompt):
            raise ValueError(
                "Empirical.prompt_lens and output_lens must be non-empty 1-D arrays of equal length, "
                f"got shapes {prompt.shape} and {output.shape}"
            )
        for name, col in (("prompt_lens", prompt), ("output_lens", output)):
            if col.min() < 1:
                raise ValueError(f"Empirical.{name} must all be >= 1, got {col.min()}")
            col.setflags(write=False)
        object.__setattr__(self, "prompt_lens", prompt)
        object.__setattr__(self, "output_lens", output)

    @classmethod
    def from_trace(cls, trace: traces.Trace) -> "Empirical":
        return cls(trace.prompt_len, trace.output_len)

    @classmethod
    def from_csv(cls, path: traces.PathLike, format: str = "auto") -> "Empirical":
        """Pairs from any trace file ``read_trace`` knows (typically a Vidur/Sarathi length CSV)."""
        return cls.from_trace(traces.read_trace(path, format))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        rows = rng.integers(0, len(self.prompt_lens), size=check_count("n", n))
        return np.stack([self.prompt_lens[rows], self.output_lens[rows]], axis=1)

    @property
    def mean(self) -> tuple[float, float]:
        """Mean (prompt, output) length of the observed pairs."""
        return float(self.prompt_lens.mean()), float(self.output_lens.mean())
