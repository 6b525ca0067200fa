"""Distributed decode attention on 8 forced host CPU devices against the single-device reference:
rows whose KV is spread over different numbers of devices, empty shards, a row with no KV at all,
garbage in unused slots, GQA, bfloat16; and the same partials merged on one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sp_testing import NUM_DEVICES, assert_close, mesh, normal

from jaxserve.parallel import reference
from jaxserve.parallel.decode_attention import decode_partial, distributed_decode_attention
from jaxserve.parallel.online_softmax import merge, normalize

SLOTS = 6
# [device, row]: tokens of each row held by each device (contiguous ranges, in device order).
SHARD_LENS = np.zeros((NUM_DEVICES, 6), np.int32)
SHARD_LENS[0, 0] = 5  # row 0: all on device 0
SHARD_LENS[:, 1] = [6, 1, 3, 6, 2, 5, 4, 6]  # row 1: all 8 devices, different lengths
SHARD_LENS[[2, 5], 2] = [4, 1]  # row 2: devices 2 and 5, the ones between empty
# row 3: no KV anywhere (outputs 0)
SHARD_LENS[7, 4] = 1  # row 4: one token, on the last device
SHARD_LENS[3:6, 5] = SLOTS  # row 5: three full shards


def shards(seed, Hq, Hkv, D, dtype):
    """``q [B, Hq, D]``, per-device ``k, v [n, B, SLOTS, Hkv, D]`` (unused slots hold 1e4), and the
    same tokens concatenated per row, ``k, v [B, L, Hkv, D]``, for the reference."""
    rng = np.random.default_rng(seed)
    n, B = SHARD_LENS.shape
    q = normal(rng, (B, Hq, D), dtype)
    k = np.array(normal(rng, (n, B, SLOTS, Hkv, D), dtype), np.float32)
    v = np.array(normal(rng, (n, B, SLOTS, Hkv, D), dtype), np.float32)
    unused = np.arange(SLOTS)[None, None, :] >= SHARD_LENS[:, :, None]
    k[unused], v[unused] = 1e4, 1e4
    totals = SHARD_LENS.sum(axis=0)
    k_full = np.zeros((B, max(totals.max(), 1), Hkv, D), np.float32)
    v_full = np.zeros_like(k_full)
    for b in range(B):
        k_full[b, : totals[b]] = np.concatenate([k[d, b, : SHARD_LENS[d, b]] for d in range(n)])
        v_full[b, : totals[b]] = np.concatenate([v[d, b, : SHARD_LENS[d, b]] for d in range(n)])
    cast = functools.partial(jnp.asarray, dtype=dtype)
    return q, cast(k), cast(v), cast(k_full), cast(v_full), jnp.asarray(totals)


@functools.partial(jax.jit, static_argnames="mesh")
def decode(q, k, v, shard_lens, *, mesh):
    return distributed_decode_attention(q, k, v, shard_lens, mesh)


@pytest.mark.parametrize(("dtype", "Hq", "Hkv"), [(jnp.float32, 8, 2), (jnp.bfloat16, 4, 4)])
def test_rows_spread_over_different_numbers_of_devices(dtype, Hq, Hkv):
    q, k, v, k_full, v_full, totals = shards(0, Hq, Hkv, 16, dtype)
    out = decode(q, k, v, SHARD_LENS, mesh=mesh())
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, reference.decode_attention(q, k_full, v_full, totals), dtype)
    assert not np.asarray(out[3]).any()  # no KV anywhere


def test_partials_merged_on_one_device_match():
    """The partials and their log-sum-exp merge without a mesh: what a caller holding the shards'
    partials some other way (e.g. from paged attention) combines."""
    q, k, v, k_full, v_full, totals = shards(1, 8, 2, 16, jnp.float32)

    @jax.jit
    def merged(q, k, v, shard_lens):
        parts = jax.vmap(decode_partial, in_axes=(None, 0, 0, 0))(q, k, v, shard_lens)
        state = functools.reduce(merge, [jax.tree.map(lambda x: x[d], parts) for d in range(NUM_DEVICES)])
        return normalize(state.l, state.acc).reshape(q.shape)

    out = merged(q, k, v, SHARD_LENS)
    assert_close(out, reference.decode_attention(q, k_full, v_full, totals))


def test_shapes_that_do_not_fit_the_mesh_are_refused():
    q, k, v, *_ = shards(0, 8, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"k_shards, v_shards \[n=8"):
        distributed_decode_attention(q, k[:4], v[:4], SHARD_LENS[:4], mesh())
    with pytest.raises(ValueError, match="num_q_heads 8 is not a multiple of num_kv_heads 3"):
        decode_partial(q, k[0, :, :, :1].repeat(3, axis=2), v[0, :, :, :1].repeat(3, axis=2), SHARD_LENS[0])
