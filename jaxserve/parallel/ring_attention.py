"""Causal ring attention for the prefill of long sequences sharded over the ``"sp"`` mesh axis.

Queries stay put; K/V blocks travel round the ring (``lax.ppermute`` to the next device, issued
before the step's compute so a backend can overlap the two), and each device folds the blocks it
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

# Keys folded at once per step: a [B, Hq, c, 512] float32 score tile stays in the tens of MiB for
# c in the thousands, while blocks this long keep the matmuls efficient.
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
    kb = min(c, kv_block)
    sm_scale = D**-0.5 if sm_scale is None else sm_scale
    lengths = lengths.astype(jnp.int32)
    qg = group_queries(q, Hkv)
    q_half = (qg[..., :c, :], qg[..., c:, :])
    kv = jnp.stack([k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)])  # [2, B, Hkv, 2c, D]
    chunks = jnp.asarray(zigzag.chunk_ids(n), jnp.int32)
    kinds = jnp.asarray(zigzag.step_kinds(n), jnp.int32)
    fold_keys = functools.partial(_fold_keys, lengths=lengths, kv_block=kb, sm_scale=sm_scale, sliding_window=sliding_window)

    def positions(device, half):
        return chunks[device, half] * c + jnp.arange(c, dtype=jnp.int32)

    def run(kind, src):
        def branch(state, kv):
            state = list(state)
            for qh, kh in zigzag.STEP_PAIRS[kind]:
                keys = kv[:, :, :, kh * c : (kh + 1) * c]
                state[qh] = fold_keys(state[qh], q_half[qh], positions(d, qh), keys, positions(src, kh))
            return tuple(state)

        return branch

    def step(s, state, kv):
        src = (d - s) % n
        return lax.switch(kinds[s, d], [run(kind, src) for kind in zigzag.STEP_KINDS], state, kv)

    # pcast: the carry's initial value is the same on every device, its updates are not.
    state = tuple(
        jax.tree.map(lambda x: lax.pcast(x, (axis_name,), to="varying"), init_state((B, Hkv, Hq // Hkv, c), D))
        for _ in range(2)
    )
    if n == 1:
        state = step(0, state, kv)
    else:
        ring = [(j, (j + 1) % n) for j in range(n)]

        def body(s, carry):
            state, kv = carry
            incoming = lax.ppermute(kv, axis_name, ring)  # next step's block, in flight during this fold
            return step(s, state, kv), incoming

        state, kv = lax.fori_loop(0, n - 1, body, (state, kv))
        state = step(n - 1, state, kv)  # the last block goes nowhere
    out = jnp.concatenate([normalize(st.l, st.acc) for st in state], axis=3)
    return ungroup_queries(out).astype(q.dtype)


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
    B, T = q.shape[:2]
    if k.shape[:2] != (B, T) or v.shape != k.shape:
        raise ValueError(f"k and v must be [B={B}, T={T}, Hkv, D] alike, got {k.shape} and {v.shape}")
    n = mesh.shape[SP_AXIS]
    pad = 2 * n * zigzag.chunk_size(T, n, kv_block) - T
    lengths = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)

    def layout(x):
        return zigzag.to_zigzag(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))), n)

    out = ring_attention_zigzag(
        layout(q), layout(k), layout(v), lengths, mesh, sm_scale=sm_scale, sliding_window=sliding_window, kv_block=kv_block
    )
    return zigzag.from_zigzag(out, n)[:, :T]
