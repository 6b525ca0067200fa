"""The jnp references against float64 numpy attention computed token by token (tiny shapes).

The references are the ground truth for the kernels, so they are checked first and on their own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged_kv_testing import assert_close, decode_batch, ragged_batch, rng_for

from pallas_kernels.paged_attention.reference import paged_attention
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention, token_layout

DTYPES = [jnp.float32, jnp.bfloat16]
HEADS = [(1, 1), (4, 2), (6, 2), (8, 1)]  # (num_q_heads, num_kv_heads): GQA 1, 2, 3, 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("page_size", [1, 4])
def test_paged_reference_matches_numpy(dtype, heads, page_size):
    rng = rng_for(dtype, heads, page_size)
    # length 1, exactly full pages, a partial last page, and an idle (kv_len 0) row
    kv_lens = [1, 3 * page_size, 2 * page_size + 1, 0]
    args, naive = decode_batch(
        rng,
        kv_lens,
        num_q_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=16,
        page_size=page_size,
        dtype=dtype,
        pages_per_seq=4,
    )
    out = jax.jit(paged_attention)(*args)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert_close(out, naive, dtype, what="paged reference")
    assert np.all(np.asarray(out[3], np.float32) == 0.0)


def test_paged_reference_sm_scale_and_jit():
    rng = np.random.default_rng(1)
    args, _ = decode_batch(rng, [5, 9], num_q_heads=4, num_kv_heads=2, head_dim=8, page_size=4, dtype=jnp.float32)
    q = args[0]
    # sm_scale = s is the same as scaling q by s * sqrt(head_dim) with the default scale
    scaled = paged_attention(q * (0.3 * 8**0.5), *args[1:])
    assert_close(jax.jit(lambda *a: paged_attention(*a, sm_scale=0.3))(*args), scaled, jnp.float32)


RAGGED_CASES = {
    # (q_len, kv_len) per sequence
    "mixed": [(5, 5), (1, 9), (3, 8), (1, 1)],  # prefill from 0, decode, chunk mid-sequence, length 1
    "full_pages": [(4, 8), (1, 4), (8, 8)],  # kv_len a multiple of page_size 4
    "empty_seq": [(2, 6), (0, 3), (3, 3)],  # a sequence with no query tokens this step
    "decodes": [(1, 7), (1, 1), (1, 12)],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("case", sorted(RAGGED_CASES))
def test_ragged_reference_matches_numpy(dtype, heads, case):
    rng = rng_for(dtype, heads, case)
    batch = ragged_batch(
        rng, RAGGED_CASES[case], num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=16, page_size=4, dtype=dtype
    )
    out = jax.jit(ragged_paged_attention)(*batch.args)
    assert out.dtype == dtype and out.shape == batch.args[0].shape
    assert_close(out, batch.naive(), dtype, what=case)


@pytest.mark.parametrize("window", [1, 3, 6])
def test_ragged_reference_sliding_window(window):
    rng = np.random.default_rng(window)
    batch = ragged_batch(
        rng, [(6, 10), (1, 9), (4, 4)], num_q_heads=4, num_kv_heads=2, head_dim=8, page_size=2, dtype=jnp.float32
    )
    out = jax.jit(ragged_paged_attention, static_argnames=("sliding_window", "sm_scale"))(
        *batch.args, sliding_window=window, sm_scale=0.5
    )
    assert_close(out, batch.naive(sliding_window=window, sm_scale=0.5), jnp.float32)


def test_ragged_reference_padding_tokens_are_zero():
    rng = np.random.default_rng(3)
    batch = ragged_batch(
        rng,
        [(3, 5), (1, 2)],
        num_q_heads=2,
        num_kv_heads=1,
        head_dim=8,
        page_size=4,
        dtype=jnp.float32,
        num_padding_tokens=5,
        num_padding_rows=3,
    )
    out = np.asarray(jax.jit(ragged_paged_attention)(*batch.args))
    assert np.all(out[4:] == 0.0) and np.all(np.isfinite(out))


def test_ragged_reference_of_decodes_is_paged_reference():
    rng = np.random.default_rng(4)
    batch = ragged_batch(
        rng,
        [(1, 7), (1, 3), (1, 8)],
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=8,
        page_size=4,
        dtype=jnp.float32,
        num_padding_tokens=0,
        num_padding_rows=0,
    )
    q, k, v, kv_lens, pages, _, _ = batch.args
    assert_close(ragged_paged_attention(*batch.args), paged_attention(q, k, v, kv_lens, pages), jnp.float32)


def test_token_layout():
    cu = jnp.array([0, 3, 3, 4, 99], jnp.int32)  # last row is padding (garbage)
    kv_lens = jnp.array([5, 2, 1, 77], jnp.int32)
    seq, pos, valid = token_layout(cu, kv_lens, jnp.array([3], jnp.int32), 6)
    assert np.asarray(seq)[:4].tolist() == [0, 0, 0, 2]
    assert np.asarray(pos)[:4].tolist() == [2, 3, 4, 0]
    assert np.asarray(valid).tolist() == [True] * 4 + [False] * 2
