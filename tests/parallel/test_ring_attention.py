"""Ring attention on 8 forced host CPU devices against the single-device reference.

Each distinct shape compiles once (a few seconds on the 2-core CI machine), so the default run keeps
to a handful of shapes that between them cover: lengths not divisible by the shard count and
shorter than it in one batch, GQA (1, 2, 4 query heads per KV head), keys folded in several blocks
per step, the sliding window, chunk boundaries, bfloat16. The sweep over mesh sizes is ``slow``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from sp_testing import assert_close, mesh, normal

from jaxserve.parallel import reference, zigzag
from jaxserve.parallel.ring_attention import ring_attention, ring_attention_zigzag


@functools.partial(jax.jit, static_argnames=("mesh", "kv_block", "sliding_window"))
def ring(q, k, v, lengths, *, mesh, kv_block=512, sliding_window=None):
    return ring_attention(q, k, v, lengths, mesh=mesh, kv_block=kv_block, sliding_window=sliding_window)


def inputs(seed, B, T, Hq, Hkv, D, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return normal(rng, (B, T, Hq, D), dtype), normal(rng, (B, T, Hkv, D), dtype), normal(rng, (B, T, Hkv, D), dtype)


@functools.partial(jax.jit, static_argnames="mesh")
def ring_zigzag(q, k, v, lengths, *, mesh):
    return ring_attention_zigzag(q, k, v, lengths, mesh)


def zigzag_ring(q, k, v, lengths):
    """Ring attention through the zig-zag entry point on 8 devices, padded by hand: ``T = 37`` is
    chunks of 3 padded to 48 (garbage in the padding, which ``lengths`` must mask)."""
    B, T = q.shape[:2]
    m = mesh()
    spec = jax.sharding.NamedSharding(m, P(None, "sp"))

    def layout(x):
        x = jnp.concatenate([x, jnp.full((B, 48 - T, *x.shape[2:]), 1e4, x.dtype)], axis=1)
        return jax.device_put(zigzag.to_zigzag(x, 8), spec)

    out = ring_zigzag(layout(q), layout(k), layout(v), lengths, mesh=m)
    assert out.sharding.is_equivalent_to(spec, out.ndim)  # stays sequence-sharded in the layout
    return np.asarray(zigzag.from_zigzag(out, 8))[:, :T]


def test_a_batch_of_mixed_lengths_matches_the_reference():
    # Lengths not divisible by 8 and shorter than 8 in one batch; 2 query heads per KV head.
    q, k, v = inputs(0, 4, 37, 4, 2, 8)
    lengths = jnp.array([37, 20, 3, 1], jnp.int32)
    out = zigzag_ring(q, k, v, lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, reference.causal_attention(q, k, v, lengths))
    for b, n in enumerate(lengths.tolist()):  # padding rows see nothing
        assert not out[b, n:].any()


def test_causal_at_chunk_boundaries():
    """Changing the key/value at the first position of a chunk (every multiple of c = 3) changes no
    output before it, bit for bit, and changes the output at it."""
    q, k, v = inputs(0, 4, 37, 4, 2, 8)  # the shapes of the test above: compiled once
    lengths = jnp.full((4,), 37, jnp.int32)
    base = zigzag_ring(q, k, v, lengths)
    assert_close(base, reference.causal_attention(q, k, v, lengths))
    for p in range(3, 37, 3):
        out = zigzag_ring(q, k.at[:, p].add(5.0), v.at[:, p].add(5.0), lengths)
        np.testing.assert_array_equal(out[:, :p], base[:, :p], err_msg=f"position {p} leaked backwards")
        assert (np.abs(out[:, p] - base[:, p]).max(axis=(1, 2)) > 1e-3).all(), p


def test_keys_folded_in_several_blocks_per_step():
    # MHA; T = 100 -> chunk 7 > kv_block 4, rounded up to 8 (two key blocks per chunk), padded to 128.
    q, k, v = inputs(2, 2, 100, 2, 2, 8)
    lengths = jnp.array([100, 57], jnp.int32)
    assert_close(ring(q, k, v, lengths, mesh=mesh(), kv_block=4), reference.causal_attention(q, k, v, lengths))


@pytest.mark.slow
def test_sliding_window():
    q, k, v = inputs(3, 2, 37, 4, 2, 8)
    lengths = jnp.array([37, 30], jnp.int32)
    out = ring(q, k, v, lengths, mesh=mesh(), sliding_window=5)
    assert_close(out, reference.causal_attention(q, k, v, lengths, sliding_window=5))


def test_bfloat16_with_four_query_heads_per_kv_head():
    q, k, v = inputs(4, 2, 45, 8, 2, 16, jnp.bfloat16)
    lengths = jnp.array([45, 17], jnp.int32)
    out = ring(q, k, v, lengths, mesh=mesh())
    assert out.dtype == jnp.bfloat16
    assert_close(out, reference.causal_attention(q, k, v, lengths), jnp.bfloat16)


def test_bad_shapes_are_refused():
    q, k, v = inputs(0, 1, 8, 4, 2, 8)
    with pytest.raises(ValueError, match="k and v must be"):
        ring_attention(q, k[:, :7], v, mesh=mesh())
    with pytest.raises(ValueError, match="num_q_heads 4 is not a multiple of num_kv_heads 3"):
        q3, k3, v3 = inputs(0, 1, 8, 4, 3, 8)
        ring_attention(q3, k3, v3, mesh=mesh())


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize(("T", "Hq", "Hkv"), [(1, 2, 2), (7, 8, 1), (16, 6, 2), (45, 4, 4)])
def test_mesh_sizes_lengths_and_gqa(n, T, Hq, Hkv):
    q, k, v = inputs(n * 100 + T, 3, T, Hq, Hkv, 8)
    lengths = jnp.array([T, max(1, T // 2), 1], jnp.int32)
    assert_close(ring(q, k, v, lengths, mesh=mesh(n), kv_block=4), reference.causal_attention(q, k, v, lengths))
