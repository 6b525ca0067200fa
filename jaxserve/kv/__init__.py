"""Paged KV bookkeeping: block pool, host pool, prefix cache (all persistent, pure values)."""

from jaxserve.kv.block_pool import BlockPool, OutOfBlocksError
from jaxserve.kv.config import KVConfig
from jaxserve.kv.prefix_hash import chain_hashes, extend_chain, prompt_block_hashes
from jaxserve.kv.state import KVState

__all__ = [
    "BlockPool",
    "KVConfig",
    "KVState",
    "OutOfBlocksError",
    "chain_hashes",
    "extend_chain",
    "prompt_block_hashes",
]
