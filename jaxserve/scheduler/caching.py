"""Offering computed KV blocks to the prefix cache.

Prompt blocks are offered as soon as their KV is computed (``offer_prompt_blocks``, vectorized over
a step), so requests sharing a prompt prefix reuse each other's blocks while they run. Generated
blocks are offered once, when their request leaves the batch (``offer_generated_blocks``: finish or
preemption), because only then can anyone else use them — a follow-up turn, or the request's own
recompute — and hashing them once there is much cheaper than per decode step.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from jaxserve.kv.block_pool import BlockPool


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


def offer_generated_blocks(run, pool: BlockPool, r: int, block_size: int, generated: Optional[list] = None):
    """Registers row ``r``'s remaining computed full blocks; returns ``(pool, hash chain)``.

    ``generated`` is the row's output tokens oldest first, when the caller has it already. Only
    requests with real token ids are extended past their precomputed (prompt) hashes.
    """
    chain = run.block_hashes[r]
    registered = int(run.num_registered[r])
    n_full = int(run.num_computed[r]) // block_size
    if not pool.enable_caching or n_full <= registered:
        return pool, chain
    if run.real_tokens[r] and n_full > len(chain):
        req = run.requests[r]
        prompt_len, start, stop = req.prompt_len, len(chain) * block_size, n_full * block_size
        if generated is None:
            generated = run.outputs[r][: int(run.num_output[r])]
        tokens = list(req.prompt_token_ids[start:prompt_len]) if start < prompt_len else []
        tokens += generated[max(start - prompt_len, 0) : stop - prompt_len]
        extended = list(chain)
        parent = chain[-1] if chain else 0
        for i in range(0, stop - start, block_size):
            parent = hash((parent, tuple(tokens[i : i + block_size])))
            extended.append(parent)
        chain = tuple(extended)
    upto = min(n_full, len(chain))
    table = run.block_tables[r]
    return pool.register(table[registered:upto], chain[registered:upto]), chain
