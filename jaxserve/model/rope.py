"""Rotary position embeddings in the Hugging Face Llama convention (rotate-half, not interleaved).

``inv_freq`` implements the rope types jaxserve supports: ``default``, ``linear`` (positions
divided by ``factor``) and ``llama3`` (Llama 3.1's smooth rescaling of low frequencies).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.model.config import ModelConfig


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """float32 ``[head_dim // 2]`` inverse frequencies after RoPE scaling."""
    d = cfg.head_dim
    base = 1.0 / (
        cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d)
    )
    base = base.astype(np.float32)
    rs = cfg.rope_scaling
    if rs.rope_type == "default":
        return base
    if rs.rope_type == "linear":
        return (base / rs.factor).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by factor, interpolate in between.
    old_len = rs.original_max_position_embeddings
    low_wavelen = old_len / rs.low_freq_factor
    high_wavelen = old_len / rs.high_freq_factor
    wavelen = 2 * math.pi / base
    scaled = np.where(wavelen > low_wavelen, base / rs.factor, base)
    smooth = (old_len / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, freqs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` float32 ``[T, head_dim]`` for int ``positions [T]`` (frequencies repeated twice,
    as HF's rotate-half layout expects)."""
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [T, heads, head_dim]`` by the tables from :func:`rope_tables`, in x's dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, None, :].astype(x.dtype)
    sin = sin[:, None, :].astype(x.dtype)
    return x * cos + rotated * sin
