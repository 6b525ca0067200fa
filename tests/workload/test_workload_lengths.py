"""Length distributions: bounds, means, joint sampling of pairs, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxserve.workload.lengths import Empirical, Fixed, Pair, Uniform, Zipf
from jaxserve.workload.traces import resolve_trace_path, traces_dir

N = 100_000


def test_fixed():
    out = Fixed(7).sample(5, np.random.default_rng(0))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [7] * 5)


def test_uniform_is_inclusive_with_the_right_mean():
    out = Uniform(3, 9).sample(N, np.random.default_rng(0))
    assert out.dtype == np.int64
    assert out.min() == 3 and out.max() == 9
    assert out.mean() == pytest.approx(Uniform(3, 9).mean, rel=0.01)


def test_zipf_bounds_shape_and_mean():
    dist = Zipf(1.2, 16, 4096)
    out = dist.sample(N, np.random.default_rng(0))
    assert out.dtype == np.int64
    assert out.min() >= 16 and out.max() <= 4096
    ranks = np.arange(1, 4096 - 16 + 2, dtype=np.float64)
    exact_mean = 16 + np.dot(ranks - 1, ranks**-1.2) / np.sum(ranks**-1.2)
    assert dist.mean == pytest.approx(exact_mean)
    assert out.mean() == pytest.approx(exact_mean, rel=0.03)
    counts = np.bincount(out - 16, minlength=4)[:4]
    assert counts[0] > counts[1] > counts[2] > counts[3]  # mass piles up at `low`


def test_zipf_with_a_zero_is_uniform_and_degenerate_range_is_fixed():
    out = Zipf(0.0, 1, 4).sample(N, np.random.default_rng(0))
    assert np.bincount(out)[1:] / N == pytest.approx([0.25] * 4, abs=0.01)
    np.testing.assert_array_equal(Zipf(2.0, 5, 5).sample(10, np.random.default_rng(0)), [5] * 10)


def test_pair_samples_independent_sides():
    out = Pair(Fixed(100), Uniform(1, 4)).sample(1000, np.random.default_rng(0))
    assert out.shape == (1000, 2) and out.dtype == np.int64
    assert (out[:, 0] == 100).all() and set(out[:, 1]) == {1, 2, 3, 4}
    assert Pair(Fixed(100), Uniform(1, 4)).mean == (100.0, 2.5)


def test_empirical_keeps_pairs_together():
    # Perfectly correlated source: output = 2 * prompt. Independent marginals would break this.
    prompt = np.arange(1, 501)
    dist = Empirical(prompt, 2 * prompt)
    out = dist.sample(5000, np.random.default_rng(0))
    assert out.shape == (5000, 2) and out.dtype == np.int64
    np.testing.assert_array_equal(out[:, 1], 2 * out[:, 0])
    assert out[:, 0].mean() == pytest.approx(250.5, rel=0.03)


def test_empirical_is_immutable():
    dist = Empirical([1, 2], [3, 4])
    with pytest.raises(ValueError):
        dist.prompt_lens[0] = 5


@pytest.mark.skipif(not traces_dir().is_dir(), reason="shared traces folder not present")
def test_empirical_from_length_only_csv():
    dist = Empirical.from_csv(resolve_trace_path("vidur_processed/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"))
    assert len(dist.prompt_lens) == 30_731
    assert dist.mean[0] == pytest.approx(2340.0, abs=0.1)
    assert dist.mean[1] == pytest.approx(438.7, abs=0.1)
    out = dist.sample(20_000, np.random.default_rng(0))
    assert out[:, 0].mean() == pytest.approx(2340.0, rel=0.03)
    pairs = set(zip(dist.prompt_lens.tolist(), dist.output_lens.tolist()))
    assert all(tuple(row) in pairs for row in out[:500].tolist())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Fixed(0), "Fixed.value"),
        (lambda: Fixed(2.5), "Fixed.value"),
        (lambda: Uniform(0, 5), "Uniform.low"),
        (lambda: Uniform(5, 4), "Uniform.high"),
        (lambda: Zipf(-1.0, 1, 5), "Zipf.a"),
        (lambda: Zipf(1.0, 9, 5), "Zipf.high"),
        (lambda: Empirical([], []), "Empirical.prompt_lens"),
        (lambda: Empirical([1, 2], [3]), "Empirical.prompt_lens"),
        (lambda: Empirical([1, 0], [3, 4]), "Empirical.prompt_lens"),
        (lambda: Fixed(3).sample(-1, np.random.default_rng()), "n must"),
    ],
)
def test_invalid_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@settings(max_examples=80, deadline=None)
@given(
    low=st.integers(1, 5000),
    width=st.integers(0, 5000),
    a=st.floats(0.0, 3.0),
    n=st.integers(0, 200),
    seed=st.integers(0, 2**32 - 1),
)
def test_bounded_distributions_stay_in_bounds_and_are_deterministic(low, width, a, n, seed):
    high = low + width
    for dist in (Uniform(low, high), Zipf(a, low, high)):
        out = dist.sample(n, np.random.default_rng(seed))
        assert out.dtype == np.int64 and out.shape == (n,)
        assert n == 0 or (out.min() >= low and out.max() <= high)
        np.testing.assert_array_equal(out, dist.sample(n, np.random.default_rng(seed)))
