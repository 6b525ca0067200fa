"""Causal ring attention for the prefill of long sequences sharded over the ``"sp"`` mesh axis.

Queries stay put; K/V blocks travel round the ring (``lax.ppermute`` to the next device, issued
before the step's folds so a backend can overlap the two), and each device folds the blocks it
receives into a float32 online softmax (:mod:`~jaxserve.parallel.online_softmax`). The sequence is in
the zig-zag layout (:mod:`~jaxserve.parallel.zigzag`), and each step folds exactly the chunk pairs
its plan names, so every device does the same work at every step.

Padding: a batch of sequences is padded (at the end, with anything finite) to one length ``2 n c``
(``zigzag.chunk_size``); ``lengths[b]`` masks it: keys at positions ``>= lengths[b]`` are never
seen and query rows there output 0. Within a step keys are folded ``kv_block`` at a time, which
bounds the float32 score tile to ``[B, Hq, c, kv_block]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxserve.parallel import zigzag
from jaxserve.parallel.mesh import SP_AXIS
from jaxserve.parallel.online_softmax import fold, group_queries, init_state, normalize, ungroup_queries

# Keys folded at once per step. The float32 score tile is [B, Hq, c, kv_block]: 256 MiB at B = 1,
# Hq = 32, c = 4096 (a 64k-token prefill over 8 devices); smaller blocks trade it for more loop steps.
DEFAULT_KV_BLOCK = 512


def visible(q_pos, k_pos, lengths, sliding_window=None):
    """bool ``[B, 1, 1, Tq, Tk]``: query position ``q_pos [Tq]`` may see key position ``k_pos
    [Tk]`` in sequence ``b`` (causal, both below ``lengths[b]``, within the window if any)."""
    mask = (k_pos[None, :] <= q_pos[:, None])[None]
    mask &= (k_pos[None, None, :] < lengths[:, None, None]) & (q_pos[None, :, None] < lengths[:, None, None])
    if sliding_window is not None:
        mask &= (k_pos[None, :] > q_pos[:, None] - sliding_window)[None]
    return mask[:, None, None]


def _fold_keys(state, q, q_pos, kv, k_pos, lengths, *, kv_block, sm_scale, sliding_window):
    """Folds keys ``kv [2, B, Hkv, Tk, D]`` at positions ``k_pos [Tk]`` into the state of rows
    ``q [B, Hkv, G, Tq, D]`` at ``q_pos [Tq]``, ``kv_block`` keys at a time."""
    num_blocks = kv.shape[3] // kv_block

    def block(j, state):
        kvj = lax.dynamic_slice_in_dim(kv, j * kv_block, kv_block, axis=3)
        pos = lax.dynamic_slice_in_dim(k_pos, j * kv_block, kv_block)
        mask = visible(q_pos, pos, lengths, sliding_window)
        return fold(state, q, kvj[0], kvj[1], mask, sm_scale=sm_scale)

    return block(0, state) if num_blocks == 1 else lax.fori_loop(0, num_blocks, block, state)


def ring_attention_shard(
    q, k, v, lengths, *, axis_name=SP_AXIS, sm_scale=None, sliding_window=None, kv_block=DEFAULT_KV_BLOCK
):
    """One device's part, to be called inside ``shard_map`` over ``axis_name`` (size ``n``).

    ``q [B, 2c, Hq, D]``, ``k, v [B, 2c, Hkv, D]``: this device's zig-zag slice (chunks ``d`` and
    ``2n-1-d`` of ``c`` tokens; ``c`` a multiple of ``kv_block`` or at most it); ``lengths`` int
    ``[B]``, the same on every device. Returns ``[B, 2c, Hq, D]`` in q's dtype.
    """
    n = lax.axis_size(axis_name)
    d = lax.axis_index(axis_name)
    B, T2, Hq, D = q.shape
    Hkv = k.shape[2]
    c = T2 // 2
    if T2 % 2 or (c > kv_block and c % kv_block):
        raise ValueError(f"local sequence length {T2} must be 2c with c <= kv_block={kv_block} or a multiple of it")
    sm_scale = D**-0.5 if sm_scale is None else sm_scale
    fold_keys = functools.partial(
        _fold_keys, lengths=lengths.astype(jnp.int32), kv_block=min(c, kv_block), sm_scale=sm_scale, sliding_window=sliding_window
    )
    # Both halves side by side on a leading axis, so a step can pick its same-half pair by index.
    qh = group_queries(q, Hkv).reshape(B, Hkv, Hq // Hkv, 2, c, D).transpose(3, 0, 1, 2, 4, 5)
    kv = jnp.stack([k, v]).reshape(2, B, 2, c, Hkv, D).transpose(0, 1, 4, 2, 3, 5)  # [2, B, Hkv, 2 halves, c, D]
    chunks = jnp.asarray(zigzag.chunk_ids(n), jnp.int32)
    kinds = jnp.asarray(zigzag.step_kinds(n), jnp.int32)
    same_half = jnp.asarray([zigzag.SAME_HALF[kind] for kind in sorted(zigzag.SAME_HALF)], jnp.int32)

    def fold_pair(state, pair, kv, src):
        """Folds key half ``pair[1]`` of ``src``'s K/V into the state of query half ``pair[0]``."""
        qhalf, khalf = pair
        rows = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, qhalf, keepdims=False), state)
        q_pos = chunks[d, qhalf] * c + jnp.arange(c, dtype=jnp.int32)
        k_pos = chunks[src, khalf] * c + jnp.arange(c, dtype=jnp.int32)
        q = lax.dynamic_index_in_dim(qh, qhalf, keepdims=False)
        rows = fold_keys(rows, q, q_pos, lax.dynamic_index_in_dim(kv, khalf, axis=3, keepdims=False), k_pos)
        return jax.tree.map(lambda x, r: lax.dynamic_update_index_in_dim(x, r, qhalf, 0), state, rows)

    def step(s, carry):
        """Ring step ``s``: fold the block held now while the next one is in flight."""
        state, kv = carry
        # n sends where n - 1 would do: the last goes unused (it overlaps the last step's folds), so
        # the step body is traced and compiled once rather than again for a peeled last step.
        incoming = lax.ppermute(kv, axis_name, [(j, (j + 1) % n) for j in range(n)]) if n > 1 else kv
        src = (d - s) % n
        h = same_half[kinds[s, d]]
        state = fold_pair(state, zigzag.CROSS_PAIR, kv, src)
        return fold_pair(state, (h, h), kv, src), incoming

    # pcast: the carry's initial value is the same on every device, its updates are not.
    state = init_state((2, B, Hkv, Hq // Hkv, c), D)
    state = jax.tree.map(lambda x: lax.pcast(x, (axis_name,), to="varying"), state)
    state = fold_pair(state, zigzag.LOCAL_EXTRA_PAIR, kv, d)
    state, _ = lax.fori_loop(0, n, step, (state, kv))
    out = normalize(state.l, state.acc)  # [2 halves, B, Hkv, G, c, D]
    return ungroup_queries(out.transpose(1, 2, 3, 0, 4, 5).reshape(B, Hkv, Hq // Hkv, 2 * c, D)).astype(q.dtype)


def ring_attention_zigzag(
    q, k, v, lengths, mesh: Mesh, *, sm_scale=None, sliding_window=None, kv_block=DEFAULT_KV_BLOCK
):
    """Ring attention of global arrays already in the zig-zag layout (``zigzag.to_zigzag``):
    ``q [B, 2nc, Hq, D]``, ``k, v [B, 2nc, Hkv, D]`` with the sequence axis split over ``mesh``'s
    ``"sp"`` axis (``n`` devices), ``lengths`` int ``[B]``. Returns ``[B, 2nc, Hq, D]`` in the same
    layout and sharding."""
    seq = P(None, SP_AXIS)
    body = functools.partial(ring_attention_shard, sm_scale=sm_scale, sliding_window=sliding_window, kv_block=kv_block)
    return jax.shard_map(body, mesh=mesh, in_specs=(seq, seq, seq, P()), out_specs=seq)(q, k, v, lengths)


def ring_attention(q, k, v, lengths=None, *, mesh: Mesh, sm_scale=None, sliding_window=None, kv_block=DEFAULT_KV_BLOCK):
    """Causal attention of sequences in natural token order, computed as ring attention over
    ``mesh``'s ``"sp"`` axis: pads to ``2 n c`` tokens, permutes into the zig-zag layout and back.

    ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` (float32 or bfloat16), ``lengths`` int ``[B]``
    (default ``T``); the contract of ``reference.causal_attention``. Returns ``[B, T, Hq, D]``.
    """
    B, T, Hq, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"k and v must be [B={B}, T={T}, Hkv, D={D}] alike, got {k.shape} and {v.shape}")
    if Hq % k.shape[2]:
        raise ValueError(f"num_q_heads {Hq} is not a multiple of num_kv_heads {k.shape[2]}")
    n = mesh.shape[SP_AXIS]
    pad = 2 * n * zigzag.chunk_size(T, n, kv_block) - T
    lengths = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)

    def layout(x):
        return zigzag.to_zigzag(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))), n)

    out = ring_attention_zigzag(
        layout(q), layout(k), layout(v), lengths, mesh, sm_scale=sm_scale, sliding_window=sliding_window, kv_block=kv_block
    )
    return zigzag.from_zigzag(out, n)[:, :T]
