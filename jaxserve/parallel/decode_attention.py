"""Decode attention over a request's KV split across the devices of the ``"sp"`` mesh axis.

Device ``d`` holds a contiguous range of each row's tokens (any length, possibly none) in a
buffer of ``S`` slots, the first ``shard_lens[d, b]`` of them valid. Order does not matter for a
decode query (it sees every token before it), so each device folds its own valid keys into a
float32 softmax partial ``(m, l, acc)`` and the partials are combined exactly by log-sum-exp: a
``pmax`` of the running maxima, then one ``psum`` of the rescaled denominators and accumulators.
An empty shard's partial is ``(MASK_VALUE, 0, 0)`` and adds nothing; a row with no tokens anywhere
outputs 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxserve.parallel.mesh import SP_AXIS
from jaxserve.parallel.online_softmax import SoftmaxState, fold, init_state, normalize, rescaled


def decode_partial(q, k, v, kv_lens, *, sm_scale=None) -> SoftmaxState:
    """The softmax partial of decode queries ``q [B, Hq, D]`` over one shard's keys ``k, v [B, S,
    Hkv, D]``, of which the first ``kv_lens[b]`` are valid: a state over rows ``[B, Hkv, G, 1]``."""
    B, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"num_q_heads {Hq} is not a multiple of num_kv_heads {Hkv}")
    sm_scale = D**-0.5 if sm_scale is None else sm_scale
    qg = q.reshape(B, Hkv, Hq // Hkv, 1, D)
    mask = jnp.arange(k.shape[1])[None, :] < jnp.asarray(kv_lens)[:, None]  # [B, S]
    state = init_state((B, Hkv, Hq // Hkv, 1), D)
    return fold(state, qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask[:, None, None, None], sm_scale=sm_scale)


def combine_partials(state: SoftmaxState, axis_name=SP_AXIS) -> jax.Array:
    """Inside ``shard_map``: the attention output over every device's keys, float32 ``[B, Hq, D]``,
    the same on every device (a ``pmax`` and one ``psum`` over ``axis_name``)."""
    m_all = lax.pmax(state.m, axis_name)
    l, acc = lax.psum(rescaled(state, m_all), axis_name)
    B, Hkv, G, _, D = acc.shape
    return normalize(l, acc).reshape(B, Hkv * G, D)


def decode_attention_shard(q, k, v, shard_lens, *, axis_name=SP_AXIS, sm_scale=None):
    """One device's part inside ``shard_map``: ``q [B, Hq, D]`` (replicated), this device's
    ``k, v [1, B, S, Hkv, D]`` and ``shard_lens [1, B]``. Returns ``[B, Hq, D]`` in q's dtype."""
    state = decode_partial(q, k[0], v[0], shard_lens[0], sm_scale=sm_scale)
    return combine_partials(state, axis_name).astype(q.dtype)


def distributed_decode_attention(q, k_shards, v_shards, shard_lens, mesh: Mesh, *, sm_scale=None):
    """Decode attention of ``q [B, Hq, D]`` over KV spread across ``mesh``'s ``"sp"`` axis.

    ``k_shards, v_shards [n, B, S, Hkv, D]``: device ``d``'s buffer ``[d]`` holds a contiguous range
    of row ``b``'s tokens in its first ``shard_lens[d, b]`` slots (``shard_lens`` int ``[n, B]``, 0
    where the row has nothing on ``d``); the leading axis is split over ``"sp"``. Equals
    ``reference.decode_attention`` over each row's ranges concatenated. Returns ``[B, Hq, D]`` in
    q's dtype, replicated.
    """
    n = mesh.shape[SP_AXIS]
    if k_shards.shape[0] != n or v_shards.shape != k_shards.shape or shard_lens.shape != (n, q.shape[0]):
        raise ValueError(
            f"need k_shards, v_shards [n={n}, B, S, Hkv, D] alike and shard_lens [n, B={q.shape[0]}], "
            f"got {k_shards.shape}, {v_shards.shape}, {shard_lens.shape}"
        )
    shard = P(SP_AXIS)
    body = functools.partial(decode_attention_shard, sm_scale=sm_scale)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), shard, shard, shard), out_specs=P())
    return fn(q, k_shards, v_shards, jnp.asarray(shard_lens, jnp.int32))
