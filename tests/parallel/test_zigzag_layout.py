"""The zig-zag layout and the ring's work plan (pure numpy, no device work).

The load-balance property: at every ring step each device folds exactly the causally visible chunk
pairs of the K/V it holds, and the same number of them as every other device; the contiguous layout
fails the same count, which shows the count can tell.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.parallel import zigzag


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_each_device_holds_chunk_d_and_2n_minus_1_minus_d(n):
    c = 3
    tokens = jnp.arange(2 * n * c)[None, :, None]  # [B, T, 1]: each slot's natural position
    laid = np.asarray(zigzag.to_zigzag(tokens, n))[0, :, 0]
    for d in range(n):
        held = laid[d * 2 * c : (d + 1) * 2 * c]
        np.testing.assert_array_equal(held[:c], d * c + np.arange(c))
        np.testing.assert_array_equal(held[c:], (2 * n - 1 - d) * c + np.arange(c))
    np.testing.assert_array_equal(np.asarray(zigzag.from_zigzag(zigzag.to_zigzag(tokens, n), n)), np.asarray(tokens))


def test_layout_needs_a_multiple_of_2n_tokens():
    with pytest.raises(ValueError, match="not a multiple of 2n = 16"):
        zigzag.to_zigzag(jnp.zeros((1, 20, 2)), 8)


@pytest.mark.parametrize(
    ("length", "n", "kv_block", "chunk"),
    [(37, 8, 512, 3), (16, 8, 512, 1), (1, 8, 512, 1), (0, 8, 512, 1), (100, 8, 4, 8), (5000, 4, 512, 1024)],
)
def test_chunk_size_pads_to_whole_key_blocks(length, n, kv_block, chunk):
    c = zigzag.chunk_size(length, n, kv_block)
    assert c == chunk
    assert 2 * n * c >= length and (c <= kv_block or c % kv_block == 0)


@pytest.mark.parametrize("n", range(1, 9))
def test_each_step_folds_exactly_the_causally_visible_chunk_pairs(n):
    ids = zigzag.chunk_ids(n)
    for s in range(n):
        for d in range(n):
            done = zigzag.computed_pairs(n, s, d)
            assert len(done) == len(set(done)), (s, d, done)
            assert set(done) == zigzag.causal_pairs(ids[d], ids[(d - s) % n]), (s, d)


def _pairs_per_step(holdings: np.ndarray) -> np.ndarray:
    """``[n steps, n devices]``: causally visible chunk pairs device d meets at ring step s when
    device d holds the chunks ``holdings[d]``."""
    n = len(holdings)
    return np.array([[len(zigzag.causal_pairs(holdings[d], holdings[(d - s) % n])) for d in range(n)] for s in range(n)])


@pytest.mark.parametrize("n", range(1, 9))
def test_zigzag_work_per_step_is_equal_across_devices(n):
    per_step = _pairs_per_step(zigzag.chunk_ids(n))
    assert (per_step.max(axis=1) - per_step.min(axis=1) <= 1).all(), per_step
    # ... and nothing is skipped: together the devices cover the causal triangle of 2n chunks.
    assert per_step.sum() == 2 * n * (2 * n + 1) // 2
    planned = np.array([[len(zigzag.computed_pairs(n, s, d)) for d in range(n)] for s in range(n)])
    np.testing.assert_array_equal(planned, per_step)


def test_a_contiguous_layout_is_not_balanced():
    n = 8
    contiguous = np.arange(2 * n).reshape(n, 2)  # device d holds chunks 2d and 2d + 1
    per_step = _pairs_per_step(contiguous)
    assert (per_step.max(axis=1) - per_step.min(axis=1)).max() == 4  # device n-1 works, device 0 idles
    assert per_step[1:, 0].sum() == 0 and per_step[1:, n - 1].min() == 4


def test_step_kinds():
    kinds = zigzag.step_kinds(4)
    assert (kinds[0] == zigzag.LOCAL).all()
    # step 1: device 0 receives from device 3 (later), the others from an earlier device
    np.testing.assert_array_equal(kinds[1], [zigzag.Q_SECOND_HALF, zigzag.KV_FIRST_HALF, zigzag.KV_FIRST_HALF, zigzag.KV_FIRST_HALF])
