"""The kernels lower for the backends they target, checked on CPU by cross-platform lowering.

``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` runs the Pallas -> Triton lowering of
the ``loop`` variant, and ``("tpu",)`` the Pallas -> Mosaic lowering of the ``grid`` variant, without
a device. That catches unsupported primitives, block shapes and Triton's power-of-two rules; it does
not run the backend compilers (PTX / Mosaic layout passes) or the kernels themselves -- those need a
GPU/TPU (``benchmarks/attention_kernels.py`` checks results against the references there).
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.paged_attention import kernel as paged_kernel
from pallas_kernels.ragged_paged_attention import kernel as ragged_kernel

TARGETS = [("cuda", "loop"), ("tpu", "grid")]


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _lower(platform, variant, which, *, heads, head_dim, page_size, dtype, ppb=8, **extra):
    num_q_heads, num_kv_heads = heads
    seqs, pages_per_seq, total_pages, tokens = 4, 16, 100, 64
    pages = _sds((num_kv_heads, total_pages, page_size, head_dim), dtype)
    lens, table = _sds((seqs,), jnp.int32), _sds((seqs, pages_per_seq), jnp.int32)
    kw = dict(variant=variant, pages_per_compute_block=ppb, **extra)
    if which == "paged":
        q = _sds((seqs, num_q_heads, head_dim), dtype)
        if paged_kernel.supports(q.shape, pages.shape, pages_per_compute_block=ppb, variant=variant):
            return False
        fn, args = (lambda *a: paged_kernel.paged_attention(*a, **kw)), (q, pages, pages, lens, table)
    else:
        q = _sds((tokens, num_q_heads, head_dim), dtype)
        if ragged_kernel.supports(q.shape, pages.shape, pages_per_compute_block=ppb, variant=variant):
            return False
        cu, n = _sds((seqs + 1,), jnp.int32), _sds((1,), jnp.int32)
        fn, args = (lambda *a: ragged_kernel.ragged_paged_attention(*a, **kw)), (q, pages, pages, lens, table, cu, n)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    marker = "triton" if platform == "cuda" else "tpu_custom_call"
    assert marker in text
    return True


@pytest.mark.parametrize("platform,variant", TARGETS)
def test_lowers_for_target(platform, variant):
    common = dict(heads=(32, 8), head_dim=128, page_size=16, dtype=jnp.bfloat16)
    assert _lower(platform, variant, "paged", **common)
    assert _lower(platform, variant, "ragged", sliding_window=1024, **common)
    if variant == "loop":
        assert _lower(platform, variant, "paged", num_kv_splits=4, **common)


@pytest.mark.slow
@pytest.mark.parametrize("platform,variant", TARGETS)
def test_lowering_sweep(platform, variant):
    lowered = 0
    for heads, head_dim, page_size, dtype, ppb in itertools.product(
        [(8, 8), (32, 8), (12, 4), (16, 1)], [64, 128], [8, 16, 32], [jnp.bfloat16, jnp.float32], [1, 4]
    ):
        for which in ("paged", "ragged"):
            lowered += _lower(
                platform, variant, which, heads=heads, head_dim=head_dim, page_size=page_size, dtype=dtype, ppb=ppb
            )
    assert lowered >= 150  # the shapes `supports` rejects (page_size * ppb < 16 on Triton) are skipped
