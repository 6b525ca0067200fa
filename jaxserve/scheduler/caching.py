"""Offering computed KV blocks to the prefix cache.

Prompt blocks are offered as soon as their KV is computed (``offer_prompt_blocks``, vectorized over
a step), so requests sharing a prompt prefix reuse each other's blocks while they run. Generated
blocks are offered once, when their request leaves the batch (``offer_generated_blocks``: finish or
preemption), because only then can anyone else use them — a follow-up turn, or the request's own
recompute — and hashing them once there is much cheaper than per decode step.
"""

from __future__ import annotations

import numpy as np

from jaxserve.kv.block_pool import BlockPool
from jaxserve.kv.prefix_hash import extend_chain
from jaxserve.persistent import cons_to_list_oldest_first


def offer_prompt_blocks(run, pool: BlockPool, rows: np.ndarray, block_size: int):
    """Registers the full blocks with precomputed hashes that ``rows`` have now computed."""
    upto = np.minimum(run.num_computed[rows] // block_size, run.num_hashed[rows])
    todo = rows[upto > run.num_registered[rows]]
    if not len(todo):
        return run, pool
    registered = run.num_registered.copy()
    blocks, hashes = [], []
    for r, n in zip(todo.tolist(), upto[upto > run.num_registered[rows]].tolist()):
        k = int(registered[r])
        blocks.extend(run.block_tables[r][k:n])
        hashes.extend(run.block_hashes[r][k:n])
        registered[r] = n
    return run.replace(num_registered=registered), pool.register(blocks, hashes)


def offer_generated_blocks(run, pool: BlockPool, r: int, block_size: int):
    """Registers row ``r``'s remaining computed full blocks; returns ``(pool, hash chain)``.

    Only requests with real token ids are extended past their precomputed (prompt) hashes.
    """
    chain = run.block_hashes[r]
    registered = int(run.num_registered[r])
    n_full = int(run.num_computed[r]) // block_size
    if not pool.enable_caching or (n_full <= registered):
        return pool, chain
    if run.real_tokens[r] and n_full > len(chain):
        req = run.requests[r]
        prompt_len = req.prompt_len
        generated = cons_to_list_oldest_first(run.outputs[r])
        tokens = req.prompt_token_ids
        extra = list(chain)
        for k in range(len(chain), n_full):
            start, stop = k * block_size, (k + 1) * block_size
            block = list(tokens[start:prompt_len]) if start < prompt_len else []
            block += generated[max(start - prompt_len, 0) : stop - prompt_len]
            extra.append(extend_chain(extra, block))
        chain = tuple(extra)
    upto = min(n_full, len(chain))
    table = run.block_tables[r]
    return pool.register(table[registered:upto], chain[registered:upto]), chain
