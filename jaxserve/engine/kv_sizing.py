"""How many KV pages a memory budget holds for a model."""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxserve.model.config import ModelConfig
from jaxserve.parallel.tensor_parallel import TensorParallel


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, tp: int = 1) -> int:
    """Bytes of one KV page on one device: K and V of ``block_size`` tokens in every layer, in the
    model's dtype, for the KV heads each of ``tp`` tensor-parallel devices holds (one replicated
    head each when the model has fewer than ``tp``)."""
    heads = TensorParallel(cfg, tp).kv_heads // tp
    return 2 * cfg.num_layers * heads * block_size * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def kv_blocks_for(
    cfg: ModelConfig, block_size: int, kv_cache_gb: float, max_model_len: int, max_num_seqs: int, tp: int = 1
) -> int:
    """KV pages that fit ``kv_cache_gb`` per device (``tp`` devices hold a page's heads between
    them), but no more than ``max_num_seqs`` full-length sequences need."""
    by_memory = int(kv_cache_gb * 2**30 // kv_bytes_per_block(cfg, block_size, tp))
    by_need = max_num_seqs * math.ceil(max_model_len / block_size)
    return max(1, min(by_memory, by_need))
