"""The float32 online-softmax state that ring and distributed decode attention fold keys into.

Queries are grouped by KV head (GQA): ``q [B, Hkv, G, Tq, D]`` where q head ``h`` is KV head
``h // G``'s member ``h % G`` (the engine's head order, ``jaxserve.model.attention``). A state over
a set of keys is ``(m, l, acc)``: running max and softmax denominator ``[B, Hkv, G, Tq]`` and the
unnormalised output ``[B, Hkv, G, Tq, D]``, all float32. States over disjoint key sets merge
exactly (:func:`merge`), which is what lets devices hold different keys.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# A large finite negative logit for masked keys: MASK_VALUE - MASK_VALUE stays finite, so a row that
# has seen nothing yet rescales by exp(0) instead of exp(nan) (inf - inf).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


class SoftmaxState(NamedTuple):
    """Running max ``m`` and denominator ``l`` ``[..., Tq]`` and accumulator ``acc [..., Tq, D]``
    (float32). A row that has seen no key has ``m == MASK_VALUE``, ``l == 0`` and ``acc == 0``."""

    m: jax.Array
    l: jax.Array
    acc: jax.Array


def init_state(rows_shape: tuple[int, ...], head_dim: int) -> SoftmaxState:
    """The state of rows ``rows_shape`` (e.g. ``(B, Hkv, G, Tq)``) over no keys."""
    return SoftmaxState(
        jnp.full(rows_shape, MASK_VALUE, jnp.float32),
        jnp.zeros(rows_shape, jnp.float32),
        jnp.zeros((*rows_shape, head_dim), jnp.float32),
    )


def group_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """``q [B, T, Hq, D]`` -> ``[B, Hkv, G, T, D]`` with ``G = Hq // Hkv`` (see the module docstring)."""
    B, T, Hq, D = q.shape
    if Hq % num_kv_heads:
        raise ValueError(f"num_q_heads {Hq} is not a multiple of num_kv_heads {num_kv_heads}")
    return q.reshape(B, T, num_kv_heads, Hq // num_kv_heads, D).transpose(0, 2, 3, 1, 4)


def ungroup_queries(x: jax.Array) -> jax.Array:
    """The inverse of :func:`group_queries`: ``[B, Hkv, G, T, D]`` -> ``[B, T, Hkv * G, D]``."""
    B, Hkv, G, T, D = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * G, D)


def fold(state: SoftmaxState, q, k, v, mask, *, sm_scale: float) -> SoftmaxState:
    """Folds one block of keys into ``state``.

    ``q [B, Hkv, G, Tq, D]``; ``k, v [B, Hkv, Tk, D]`` (q's dtype; products accumulate in float32);
    ``mask`` bool, broadcastable to ``[B, Hkv, G, Tq, Tk]``, True where the row may see the key.
    Masked keys contribute exactly zero.
    """
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q, k, preferred_element_type=jnp.float32) * sm_scale
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(state.m, s.max(axis=-1))
    alpha = jnp.exp(state.m - m_new)
    # where(): a row whose keys are all masked so far has m_new == MASK_VALUE and exp(0) == 1.
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return SoftmaxState(m_new, alpha * state.l + p.sum(axis=-1), alpha[..., None] * state.acc + pv)


def rescaled(state: SoftmaxState, m_all: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(l, acc)`` of ``state`` rescaled to a common running max ``m_all >= state.m``; summing the
    rescaled parts of states over disjoint keys gives the state over their union."""
    w = jnp.exp(state.m - m_all)
    return w * state.l, w[..., None] * state.acc


def merge(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """The state over the union of the (disjoint) keys of ``a`` and ``b`` (log-sum-exp merge)."""
    m = jnp.maximum(a.m, b.m)
    (la, acc_a), (lb, acc_b) = rescaled(a, m), rescaled(b, m)
    return SoftmaxState(m, la + lb, acc_a + acc_b)


def normalize(l: jax.Array, acc: jax.Array) -> jax.Array:
    """``acc / l`` (float32), 0 for rows that saw no key (``l == 0``) instead of nan."""
    return acc / jnp.where(l == 0.0, 1.0, l)[..., None]
