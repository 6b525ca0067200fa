"""``jaxserve.model.sampling.sample``: greedy, seeded reproducibility, top-k, top-p, temperature.

All calls go through one jitted ``sample`` and a few array shapes, so the file compiles only a
handful of times. Statistical checks use many rows (one draw each, distinct ``index``) at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model.sampling import argmax_tokens, sample

sample_jit = jax.jit(sample)

S, V = 8, 16  # the small batch shape
N = 8192  # rows for statistical checks (one shape: [N, V])


def _params(n, temperature=1.0, top_k=0, top_p=1.0, seed=0, index=None):
    full = lambda v, dt: jnp.broadcast_to(jnp.asarray(v, dt), (n,))  # noqa: E731
    index = jnp.arange(n, dtype=jnp.int32) if index is None else full(index, jnp.int32)
    return (
        full(temperature, jnp.float32),
        full(top_k, jnp.int32),
        full(top_p, jnp.float32),
        full(seed, jnp.uint32),
        index,
    )


def _draw(logits, *params):
    return np.asarray(sample_jit(jnp.asarray(logits, jnp.float32), *params))


@pytest.fixture(scope="module")
def small_logits():
    return np.random.default_rng(0).normal(size=(S, V)).astype(np.float32) * 2.0


@pytest.fixture(scope="module")
def row_logits():
    """One row of logits (a peaked, non-uniform distribution over V tokens), repeated N times."""
    row = np.random.default_rng(1).normal(size=V).astype(np.float32) * 1.5
    return row, np.broadcast_to(row, (N, V)).copy()


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_greedy_is_argmax(small_logits):
    params = _params(S, temperature=0.0, seed=3)
    out = _draw(small_logits, *params)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, np.argmax(small_logits, -1))
    # also when other rows of the batch sample with filtering (the filtered branch runs)
    temperature = np.array([0.0, 1.0] * (S // 2), np.float32)
    top_k = np.array([0, 3] * (S // 2), np.int32)
    out = _draw(small_logits, jnp.asarray(temperature), jnp.asarray(top_k), *params[2:])
    greedy = temperature == 0
    np.testing.assert_array_equal(out[greedy], np.argmax(small_logits, -1)[greedy])


def test_argmax_tokens_is_jnp_argmax_with_ties_infinities_and_nans():
    rng = np.random.default_rng(5)
    logits = rng.integers(-2, 3, size=(64, V)).astype(np.float32)  # many ties: the first maximum wins
    logits[1, 5] = np.inf
    logits[2, [3, 9]] = np.nan  # a NaN counts as the maximum (the first NaN), as in jnp.argmax
    logits[3] = -np.inf
    logits[4, :] = np.nan
    logits[5, V - 1] = 100.0  # the last index
    got = np.asarray(jax.jit(argmax_tokens)(jnp.asarray(logits)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), -1)))
    assert got[1] == 5 and got[2] == 3 and got[3] == 0 and got[4] == 0 and got[5] == V - 1


def test_seeded_draw_is_reproducible_and_independent_of_the_batch():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(N, V)).astype(np.float32) * 2.0
    seeds = rng.integers(0, 2**32, size=N, dtype=np.uint32)
    index = rng.integers(0, 1000, size=N).astype(np.int32)
    temperature, top_k, top_p = (np.asarray(a) for a in _params(N, temperature=1.0)[:3])

    def draw(lg=logits, t=temperature, k=top_k, p=top_p, s=seeds, i=index):
        return _draw(lg, *(jnp.asarray(a) for a in (t, k, p, s, i)))

    base = draw()
    np.testing.assert_array_equal(base, draw())  # same (logits, seed, index): same draw
    assert len(np.unique(base)) == V
    # The other rows change (logits, seeds, indices, greedy, and top-k / top-p, which sends the
    # whole batch down the sorting path); the first half of the batch keeps its rows and draws.
    half = N // 2
    lg, s, i = logits.copy(), seeds.copy(), index.copy()
    lg[half:] = rng.normal(size=(N - half, V))
    s[half:] += 1
    i[half:] += 1
    for t2, k2, p2 in (
        (temperature, top_k, top_p),
        (np.where(np.arange(N) < half, 1.0, 0.0).astype(np.float32), top_k, top_p),  # greedy neighbours
        (temperature, np.where(np.arange(N) == N - 1, 4, 0).astype(np.int32), top_p),  # one neighbour top-k
        (temperature, top_k, np.where(np.arange(N) == N - 1, 0.5, 1.0).astype(np.float32)),  # one top-p
    ):
        out = draw(lg, t2, k2, p2, s, i)
        np.testing.assert_array_equal(out[:half], base[:half])
    # Independent of the row's slot too: the batch reversed.
    rev = np.arange(N)[::-1]
    np.testing.assert_array_equal(draw(logits[rev], s=seeds[rev], i=index[rev]), base[rev])
    # A filtered row is reproducible as well.
    k4 = np.full(N, 4, np.int32)
    np.testing.assert_array_equal(draw(k=k4), draw(k=k4))


def test_unfiltered_row_is_the_same_with_or_without_the_filtering_path(row_logits):
    """top_k = V and top_p = 1 keep every token, so the draws equal the unfiltered draws."""
    row, logits = row_logits
    plain = _draw(logits, *_params(N, temperature=0.9, seed=11))
    kept_all = _draw(logits, *_params(N, temperature=0.9, top_k=V, seed=11))
    np.testing.assert_array_equal(plain, kept_all)


def test_index_and_seed_change_the_draw(row_logits):
    row, logits = row_logits
    by_index = _draw(logits, *_params(N, temperature=1.0, seed=4))  # index = row number
    # Draws over indices are spread out like the distribution, not one repeated token.
    assert len(np.unique(by_index)) >= 8
    other_seed = _draw(logits, *_params(N, temperature=1.0, seed=5))
    # Two independent draws from p agree with probability sum(p^2); allow a wide margin.
    p = _softmax(row.astype(np.float64))
    agree = np.mean(by_index == other_seed)
    assert abs(agree - np.sum(p**2)) < 0.05, (agree, np.sum(p**2))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_matches_softmax(row_logits, temperature):
    row, logits = row_logits
    draws = _draw(logits, *_params(N, temperature=temperature, seed=21))
    counts = np.bincount(draws, minlength=V).astype(np.float64)
    p = _softmax(row.astype(np.float64) / temperature)
    expected = N * p
    chi2 = np.sum((counts - expected) ** 2 / np.maximum(expected, 1e-9))
    # df = V - 1 = 15: the 1e-6 tail is ~50; a wrong temperature gives chi2 in the hundreds+.
    assert chi2 < 60, (chi2, counts, expected)
    # The wrong temperatures would not pass the same bound (the check has power).
    for wrong in (temperature * 1.5, temperature / 1.5):
        q = _softmax(row.astype(np.float64) / wrong)
        assert np.sum((counts - N * q) ** 2 / (N * q)) > 60


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_never_leaves_the_top_k(k):
    rng = np.random.default_rng(k)
    logits = rng.normal(size=(N, V)).astype(np.float32) * 2.0  # a different distribution per row
    draws = _draw(logits, *_params(N, temperature=1.0, top_k=k, seed=k))
    rank = np.argsort(np.argsort(-logits, axis=-1, kind="stable"), axis=-1, kind="stable")
    drawn_rank = rank[np.arange(N), draws]
    assert drawn_rank.max() < k
    if k > 1:  # and the draws are not just the argmax: every rank below k occurs
        assert set(np.unique(drawn_rank)) == set(range(k))
    # Within the top k the draws follow the renormalised softmax.
    if k == 3:
        top = np.sort(logits, axis=-1)[:, ::-1][:, :k]
        expected = _softmax(top.astype(np.float64)).sum(0)
        counts = np.bincount(drawn_rank, minlength=k)
        assert np.sum((counts - expected) ** 2 / expected) < 30


def _nucleus(logits_row, p):
    """Token ids of the smallest prefix (by descending probability) with mass >= p."""
    order = np.argsort(-logits_row, kind="stable")
    probs = _softmax(logits_row.astype(np.float64))[order]
    n = int(np.searchsorted(np.cumsum(probs), p - 1e-9) + 1)
    return set(order[:n].tolist())


@pytest.mark.parametrize("top_p", [0.3, 0.75, 0.95])
def test_top_p_never_leaves_the_nucleus(top_p):
    rng = np.random.default_rng(int(top_p * 100))
    logits = rng.normal(size=(N, V)).astype(np.float32) * 2.0
    draws = _draw(logits, *_params(N, temperature=1.0, top_p=top_p, seed=3))
    nuclei = [_nucleus(logits[i], top_p) for i in range(N)]
    outside = [i for i in range(N) if draws[i] not in nuclei[i]]
    assert not outside, f"{len(outside)} draws outside the nucleus, e.g. row {outside[0]}"
    # The nucleus is not trivially the argmax: tokens beyond rank 0 are drawn where the nucleus has them.
    multi = [i for i in range(N) if len(nuclei[i]) > 1]
    assert multi and np.mean([draws[i] != np.argmax(logits[i]) for i in multi]) > 0.1


def test_top_p_on_one_distribution_matches_the_truncated_softmax(row_logits):
    row, logits = row_logits
    top_p = 0.8
    draws = _draw(logits, *_params(N, temperature=1.0, top_p=top_p, seed=8))
    nucleus = sorted(_nucleus(row, top_p))
    counts = np.bincount(draws, minlength=V)
    assert set(np.flatnonzero(counts)) <= set(nucleus)
    p = _softmax(row.astype(np.float64))[nucleus]
    expected = N * p / p.sum()
    chi2 = np.sum((counts[nucleus] - expected) ** 2 / expected)
    assert chi2 < 50, (chi2, counts[nucleus], expected)


def test_top_k_and_top_p_combine():
    """Top-p acts on the top-k renormalised distribution: with top_k = 2 and top_p = 0.5 only the
    argmax survives when it has >= half of the top-2 mass (always, by definition)."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(N, V)).astype(np.float32)
    draws = _draw(logits, *_params(N, temperature=1.0, top_k=2, top_p=0.5, seed=1))
    np.testing.assert_array_equal(draws, np.argmax(logits, -1))
