"""Offering computed KV blocks to the prefix cache.

Prompt blocks are offered as soon as their KV is computed (``prompt_blocks_to_offer``, once per
step), so requests sharing a prompt prefix reuse each other's blocks while they run. Generated
blocks are offered once, when their request leaves the batch (``offer_generated_blocks``: finish or
preemption), because only then can anyone else use them — a follow-up turn, or the request's own
recompute — and hashing them once there is much cheaper than per decode step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxserve.kv.block_pool import BlockPool
from jaxserve.kv.prefix_hash import chain_hashes
from jaxserve.scheduler.running import COL

_REGISTERED, _HASHED, _COMPUTED = COL["num_registered"], COL["num_hashed"], COL["num_computed"]


def prompt_blocks_to_offer(run, rows: np.ndarray, block_size: int, nums: np.ndarray) -> tuple[list, list]:
    """``(blocks, hashes)``: the full blocks with precomputed hashes that ``rows`` (sorted,
    distinct) have now computed and not yet offered. Counts them as offered in ``nums``, a
    writable copy of ``run.nums`` (its ``num_registered`` column). The caller registers them
    (possibly together with other blocks, in this order)."""
    if len(rows) > 4:
        # Only rows with precomputed hashes not yet offered can offer anything: after their prompt
        # is computed that is none of them, so a decode step stops at this cheap test.
        if len(rows) == len(run):  # sorted distinct rows covering the batch: whole columns
            pending = run.num_registered < run.num_hashed
        else:
            pending = run.num_registered[rows] < run.num_hashed[rows]
        rows = rows[pending]
    blocks, hashes = [], []
    src, tables, chains = run.nums, run.block_tables, run.block_hashes
    for r in rows.tolist():  # a step's few prefill rows: Python ints beat a dozen numpy calls
        k, hashed = src.item(r, _REGISTERED), src.item(r, _HASHED)
        n = min(src.item(r, _COMPUTED) // block_size, hashed)
        if n > k:
            blocks.extend(tables[r][k:n])
            hashes.extend(chains[r][k:n])
            nums[r, _REGISTERED] = n
    return blocks, hashes


def offer_generated_blocks(run, pool: BlockPool, r: int, block_size: int, generated: Sequence[int]):
    """Registers row ``r``'s remaining computed full blocks; returns ``(pool, hash chain)``.

    ``generated`` is the row's output tokens oldest first. Only requests with real token ids are
    extended past their precomputed (prompt) hashes.
    """
    if not pool.enable_caching:
        return pool, run.block_hashes[r]
    blocks, hashes, chain = generated_blocks_to_offer(run, r, block_size, generated)
    return (pool.register(blocks, hashes) if blocks else pool), chain


def generated_blocks_to_offer(run, r: int, block_size: int, generated: Sequence[int]):
    """``(blocks, hashes, chain)``: row ``r``'s computed full blocks not offered yet with their
    hashes, and its hash chain extended over them (see ``offer_generated_blocks``). Pure: the
    caller registers the blocks (with caching on)."""
    chain = run.block_hashes[r]
    registered = int(run.num_registered[r])
    n_full = int(run.num_computed[r]) // block_size
    if n_full <= registered:
        return (), (), chain
    if run.real_tokens[r] and n_full > len(chain):
        req = run.requests[r]
        prompt_len, start, stop = req.prompt_len, len(chain) * block_size, n_full * block_size
        gen = np.asarray(generated[max(start - prompt_len, 0) : stop - prompt_len], np.int32)
        tokens = np.concatenate((req.prompt_array[start:prompt_len], gen)) if start < prompt_len else gen
        parent = chain[-1] if chain else None  # no chain yet: start one, with the request's salt
        chain = chain + tuple(chain_hashes(tokens, block_size, n_full - len(chain), parent, req.cache_salt))
    upto = min(n_full, len(chain))
    return run.block_tables[r][registered:upto], chain[registered:upto], chain
