"""Paged decode attention: the Pallas kernel (interpret mode, both launch variants) vs the reference.

The default run covers each feature once on tiny shapes; ``-m slow`` sweeps GQA ratios, head dims,
page sizes, block sizes and dtypes exhaustively.
"""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from paged_kv_testing import assert_close, decode_batch, rng_for

from pallas_kernels.paged_attention import kernel, reference

VARIANTS = ["loop", "grid"]


def _check(variant, *, kv_lens, heads, head_dim, page_size, dtype, pages_per_seq=None, **kernel_args):
    rng = rng_for("paged", variant, tuple(kv_lens), heads, head_dim, page_size, str(dtype), sorted(kernel_args.items()))
    args, _ = decode_batch(
        rng,
        kv_lens,
        num_q_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        pages_per_seq=pages_per_seq,
    )
    sm_scale = kernel_args.pop("sm_scale", None)
    expected = reference.paged_attention(*args, sm_scale=sm_scale)
    out = kernel.paged_attention(*args, sm_scale=sm_scale, variant=variant, interpret=True, **kernel_args)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected, dtype, what=f"{variant} {heads} D={head_dim} ps={page_size} {kernel_args}")
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_gqa_partial_and_full_pages(variant):
    # length 1, exactly full pages, partial last page, an idle row (kv_len 0 -> zeros)
    out = _check(
        variant,
        kv_lens=[1, 8, 13, 0],
        heads=(4, 2),
        head_dim=32,
        page_size=4,
        dtype=jnp.float32,
        pages_per_compute_block=2,
    )
    assert np.all(np.asarray(out[3]) == 0.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_non_power_of_two_group(variant):
    _check(
        variant,
        kv_lens=[7, 16, 3],
        heads=(6, 2),
        head_dim=64,
        page_size=8,
        dtype=jnp.bfloat16,
        pages_per_compute_block=4,
        sm_scale=0.2,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_mha_page_size_one_unused_table_columns(variant):
    # pages_per_seq larger than any sequence needs, pages_per_compute_block not dividing it
    _check(
        variant,
        kv_lens=[5, 1],
        heads=(2, 2),
        head_dim=16,
        page_size=1,
        dtype=jnp.float32,
        pages_per_seq=11,
        pages_per_compute_block=4,
    )


def test_loop_kv_splits():
    # flash-decoding split of the KV pages over programs, merged after the call; a split may be empty
    _check(
        "loop",
        kv_lens=[3, 30, 17],
        heads=(8, 1),
        head_dim=32,
        page_size=2,
        dtype=jnp.float32,
        pages_per_seq=16,
        pages_per_compute_block=2,
        num_kv_splits=3,
    )


def test_supports():
    assert kernel.supports((4, 8, 128), (2, 100, 16, 128), variant="loop") == []
    assert kernel.supports((4, 8, 80), (2, 100, 16, 80), variant="loop")  # head_dim not a power of 2
    assert kernel.supports((4, 8, 80), (2, 100, 16, 80), variant="grid") == []


SWEEP = list(
    itertools.product(
        VARIANTS,
        [(1, 1), (2, 1), (4, 2), (6, 2), (8, 1), (16, 2)],  # GQA 1, 2, 2, 3, 8, 8
        [1, 4, 16],  # page_size
        [jnp.float32, jnp.bfloat16],
    )
)


@pytest.mark.slow
@pytest.mark.parametrize("variant,heads,page_size,dtype", SWEEP)
def test_sweep(variant, heads, page_size, dtype):
    rng = np.random.default_rng(page_size)
    kv_lens = [1, page_size, 3 * page_size, int(rng.integers(1, 4 * page_size)), 4 * page_size - 1]
    for head_dim, ppb in [(32, 1), (128, 4)]:
        _check(
            variant,
            kv_lens=kv_lens,
            heads=heads,
            head_dim=head_dim,
            page_size=page_size,
            dtype=dtype,
            pages_per_seq=4,
            pages_per_compute_block=ppb,
        )


@pytest.mark.slow
@pytest.mark.parametrize("splits,ppb", [(2, 1), (4, 2), (8, 1)])
def test_sweep_splits(splits, ppb):
    for dtype in (jnp.float32, jnp.bfloat16):
        _check(
            "loop",
            kv_lens=[1, 64, 37, 0, 16],
            heads=(4, 1),
            head_dim=64,
            page_size=4,
            dtype=dtype,
            pages_per_seq=16,
            pages_per_compute_block=ppb,
            num_kv_splits=splits,
        )


def test_float32_queries_on_bfloat16_cache():
    # q is cast to the cache dtype for the matmuls; the output keeps q's dtype
    rng = rng_for("mixed")
    args, _ = decode_batch(rng, [5, 12], num_q_heads=4, num_kv_heads=1, head_dim=32, page_size=4, dtype=jnp.bfloat16)
    q = args[0].astype(jnp.float32) + 1e-3 * jnp.asarray(rng.standard_normal(args[0].shape), jnp.float32)
    out = kernel.paged_attention(q, *args[1:], interpret=True)
    assert out.dtype == jnp.float32
    assert_close(out, reference.paged_attention(q, *args[1:]), jnp.bfloat16)
