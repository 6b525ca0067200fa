"""How many KV pages a memory budget holds for a model."""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxserve.model.config import ModelConfig


def kv_bytes_per_block(cfg: ModelConfig, block_size: int) -> int:
    """Bytes of one KV page: K and V of ``block_size`` tokens in every layer, in the model's dtype."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def kv_blocks_for(cfg: ModelConfig, block_size: int, kv_cache_gb: float, max_model_len: int, max_num_seqs: int) -> int:
    """KV pages that fit ``kv_cache_gb``, but no more than ``max_num_seqs`` full-length sequences need."""
    by_memory = int(kv_cache_gb * 2**30 // kv_bytes_per_block(cfg, block_size))
    by_need = max_num_seqs * math.ceil(max_model_len / block_size)
    return max(1, min(by_memory, by_need))
