"""On-device token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

Every row draws from its own key ``fold_in(key(seed), index)`` where ``index`` counts the request's
generated tokens, so a request's samples do not depend on what else is in the batch, on chunking or
on preemption. Top-k/top-p filtering sorts the vocabulary, so it runs (under ``lax.cond``) only
when some row asks for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _filtered_sample(logits, top_k, top_p, keys):
    """Samples from the top-k / nucleus set of each row of temperature-scaled ``logits [S, V]``."""
    _S, V = logits.shape
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(V)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (mass_before < top_p[:, None]) | (rank == 0)
    # Draw in vocabulary order (not sorted order) so that an unfiltered row gets the very token the
    # unfiltered path would give it: a row's sample must not depend on whether another row filters.
    keep = jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)
    masked = jnp.where(keep, logits, -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys, masked)


def argmax_tokens(logits: jax.Array) -> jax.Array:
    """int32 ``[S]``: ``jnp.argmax(logits, -1)`` (first maximum; a NaN counts as the maximum) as a
    max and a min-index, two plain reductions that XLA CPU vectorizes (its variadic argmax
    reduction is ~4x slower over a 16k-32k vocabulary)."""
    V = logits.shape[-1]
    top = logits.max(axis=-1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def sample(logits: jax.Array, temperature, top_k, top_p, seed, index) -> jax.Array:
    """int32 ``[S]`` tokens from float32 ``logits [S, V]`` and per-row parameters ``[S]``
    (``temperature`` 0 = greedy, ``top_k`` 0 = off, ``top_p`` 1 = off, uint32 ``seed``, int32
    ``index`` of the token being sampled)."""
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed, index)
    greedy = argmax_tokens(logits)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    needs_filter = jnp.any((temperature > 0) & ((top_k > 0) | (top_p < 1.0)))
    sampled = lax.cond(
        needs_filter,
        lambda: _filtered_sample(scaled, top_k, top_p, keys).astype(jnp.int32),
        # An all-greedy batch skips drawing S x V Gumbel noise (a large share of a CPU decode step).
        lambda: lax.cond(
            jnp.any(temperature > 0),
            lambda: jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32),
            lambda: greedy,
        ),
    )
    return jnp.where(temperature > 0, sampled, greedy)
