"""The zig-zag sequence layout for causal ring attention, and the work each ring step does.

A sequence padded to ``2 n c`` tokens is cut into ``2n`` chunks of ``c``; device ``d`` of ``n`` holds
chunk ``d`` (its *half 0*) and chunk ``2n-1-d`` (its *half 1*), so every device holds one early and
one late chunk. K/V go round the ring: at step ``s`` device ``d`` holds the K/V of device
``src = (d - s) mod n``. Causally (a query chunk sees key chunks ``<=`` itself):

* query half 1 always sees key half 0 (chunk ``2n-1-d`` is later than every first-half chunk);
* step 0 (``LOCAL``, own K/V) adds the same-half pairs (0, 0) and (1, 1) -> 3 chunk pairs;
* ``src < d`` (``KV_FIRST_HALF``) adds (0, 0): the source's early chunk precedes ours -> 2 pairs;
* ``src > d`` (``Q_SECOND_HALF``) adds (1, 1): the source's late chunk precedes ours -> 2 pairs.

So every device computes the same number of chunk pairs at every step (the load balance a
contiguous layout lacks: there device ``n-1`` works at every step while device 0 idles after the
first). :data:`STEP_PAIRS` is the plan ``ring_attention`` executes (:data:`CROSS_PAIR` and the
:data:`SAME_HALF` pair of each step's kind, plus :data:`LOCAL_EXTRA_PAIR`); its tests check it
against :func:`causal_pairs`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LOCAL, KV_FIRST_HALF, Q_SECOND_HALF = 0, 1, 2
CROSS_PAIR = (1, 0)  # (query half, key half) every step folds
SAME_HALF = {LOCAL: 0, KV_FIRST_HALF: 0, Q_SECOND_HALF: 1}  # h: the (h, h) pair each kind adds to it
LOCAL_EXTRA_PAIR = (1, 1)  # and step 0 alone also folds its late chunk against itself
STEP_PAIRS = {
    kind: (CROSS_PAIR, (h, h), *((LOCAL_EXTRA_PAIR,) if kind == LOCAL else ())) for kind, h in SAME_HALF.items()
}


def chunk_ids(n: int) -> np.ndarray:
    """``[n, 2]``: the chunks device ``d`` holds, ``(d, 2n-1-d)``."""
    d = np.arange(n)
    return np.stack([d, 2 * n - 1 - d], axis=1)


def chunk_size(length: int, n: int, kv_block: int) -> int:
    """Tokens per chunk for sequences of up to ``length`` tokens over ``n`` devices: ``ceil(length /
    2n)`` (at least 1), rounded up to a multiple of ``kv_block`` when larger than it, so a ring step
    folds whole key blocks. The padding is at most ``2n * kv_block`` tokens."""
    if n < 1 or kv_block < 1:
        raise ValueError(f"need n >= 1 and kv_block >= 1, got n={n}, kv_block={kv_block}")
    c = max(1, -(-length // (2 * n)))
    return c if c <= kv_block else -(-c // kv_block) * kv_block


def zigzag_order(n: int) -> np.ndarray:
    """``[2n]``: chunk ids in layout order (device 0's two chunks, then device 1's, ...)."""
    return chunk_ids(n).reshape(-1)


def _permute_chunks(x: jax.Array, order: np.ndarray, axis: int) -> jax.Array:
    axis = axis % x.ndim
    length, parts = x.shape[axis], len(order)
    if length % parts:
        raise ValueError(f"sequence axis {axis} has {length} tokens, not a multiple of 2n = {parts} chunks")
    shape = x.shape
    x = x.reshape(*shape[:axis], parts, length // parts, *shape[axis + 1 :])
    return jnp.take(x, jnp.asarray(order), axis=axis).reshape(shape)


def to_zigzag(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """Natural token order -> zig-zag layout along ``axis`` (its length a multiple of ``2n``)."""
    return _permute_chunks(x, zigzag_order(n), axis)


def from_zigzag(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """The inverse of :func:`to_zigzag`."""
    return _permute_chunks(x, np.argsort(zigzag_order(n)), axis)


def step_kinds(n: int) -> np.ndarray:
    """``[n, n]`` int: the kind of ring step ``s`` on device ``d`` (see the module docstring)."""
    s, d = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    src = (d - s) % n
    return np.where(s == 0, LOCAL, np.where(src < d, KV_FIRST_HALF, Q_SECOND_HALF))


def computed_pairs(n: int, step: int, device: int) -> list[tuple[int, int]]:
    """The (query chunk, key chunk) pairs device ``device`` folds at ring step ``step``."""
    ids = chunk_ids(n)
    src = (device - step) % n
    kind = step_kinds(n)[step, device]
    return [(int(ids[device, qh]), int(ids[src, kh])) for qh, kh in STEP_PAIRS[kind]]


def causal_pairs(q_chunks, k_chunks) -> set[tuple[int, int]]:
    """The (query chunk, key chunk) pairs with at least one causally visible entry (key chunk <=
    query chunk), for full-length sequences."""
    return {(int(qc), int(kc)) for qc in q_chunks for kc in k_chunks if kc <= qc}
