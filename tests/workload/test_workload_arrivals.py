"""Arrival processes: mean rate and CV within statistical tolerance, determinism, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxserve.workload.arrivals import ArrivalProcess, fixed_interval, gamma, poisson

N = 200_000  # gaps; the relative standard error of the mean gap is cv / sqrt(N) (<1 % for cv 4)


def rate_and_cv(times: np.ndarray) -> tuple[float, float]:
    gaps = np.diff(times)
    return (len(times) - 1) / times[-1], gaps.std() / gaps.mean()


@pytest.mark.parametrize("rate", [0.5, 5.0, 120.0])
def test_poisson_rate_and_cv(rate):
    times = poisson(rate, N, np.random.default_rng(0))
    got_rate, got_cv = rate_and_cv(times)
    assert got_rate == pytest.approx(rate, rel=0.02)
    assert got_cv == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("cv", [0.25, 0.5, 2.0, 4.0])
def test_gamma_rate_and_cv(cv):
    times = gamma(3.0, cv, N, np.random.default_rng(1))
    got_rate, got_cv = rate_and_cv(times)
    assert got_rate == pytest.approx(3.0, rel=0.05)
    assert got_cv == pytest.approx(cv, rel=0.05)


def test_gamma_with_cv_one_is_poisson():
    a = gamma(2.0, 1.0, 1000, np.random.default_rng(7))
    b = poisson(2.0, 1000, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_fixed_interval_is_exact():
    np.testing.assert_array_equal(fixed_interval(4.0, 5), [0.0, 0.25, 0.5, 0.75, 1.0])


def test_same_seed_same_times_and_different_seed_different():
    for sample in (lambda rng: poisson(3.0, 100, rng), lambda rng: gamma(3.0, 2.5, 100, rng)):
        np.testing.assert_array_equal(sample(np.random.default_rng(5)), sample(np.random.default_rng(5)))
        assert not np.array_equal(sample(np.random.default_rng(5)), sample(np.random.default_rng(6)))


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_counts(n):
    rng = np.random.default_rng(0)
    for times in (poisson(1.0, n, rng), gamma(1.0, 3.0, n, rng), fixed_interval(1.0, n)):
        assert times.dtype == np.float64 and times.shape == (n,)
        assert n == 0 or times[0] == 0.0


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: poisson(0.0, 3, np.random.default_rng()), "rate"),
        (lambda: poisson(float("inf"), 3, np.random.default_rng()), "rate"),
        (lambda: poisson(1.0, -1, np.random.default_rng()), "n"),
        (lambda: poisson(1.0, 2.5, np.random.default_rng()), "n"),
        (lambda: gamma(1.0, 0.0, 3, np.random.default_rng()), "cv"),
        (lambda: gamma(-2.0, 1.0, 3, np.random.default_rng()), "rate"),
        (lambda: fixed_interval(1.0, True), "n"),
        (lambda: ArrivalProcess("weibull", 1.0), "kind"),
        (lambda: ArrivalProcess("gamma", 1.0, cv=-1.0), "cv"),
    ],
)
def test_invalid_parameters_name_the_parameter(call, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        call()


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["poisson", "gamma", "fixed"]),
    rate=st.floats(0.01, 1e4),
    cv=st.floats(0.05, 10.0),
    n=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_process_is_sorted_from_zero(kind, rate, cv, n, seed):
    process = ArrivalProcess(kind, rate, cv)
    times = process.sample(n, np.random.default_rng(seed))
    assert times.dtype == np.float64 and times.shape == (n,)
    assert np.isfinite(times).all() and (np.diff(times) >= 0).all()
    assert n == 0 or times[0] == 0.0
    np.testing.assert_array_equal(times, process.sample(n, np.random.default_rng(seed)))
