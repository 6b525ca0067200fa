"""Prefix-cache identities: a hash chain over full KV blocks.

Block ``i`` of a sequence is named ``h_i = hash((h_{i-1}, tokens of block i))`` with ``h_{-1} = 0``,
so equal hashes mean equal prefixes (up to 64-bit collisions, the same trade-off vLLM makes).
Python's hash of ints and tuples of ints is not salted, so hashes are stable across processes.
Requests known only by length carry trace-provided identities (``Request.prefix_block_hashes``).
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxserve.request import Request

_TRACE_SALT = 0x6A617873  # keeps trace-derived chains apart from token-derived ones


def _distinct(x: int) -> int:
    """A bijection onto non-negative ints (hash(-1) == hash(-2) in CPython; these stay apart)."""
    return 2 * x if x >= 0 else -2 * x - 1


def chain_hashes(tokens: Sequence[int], block_size: int, num_blocks: int, parent: int = 0) -> list[int]:
    """Hashes of the first ``num_blocks`` full blocks of ``tokens``, continuing the chain at ``parent``."""
    out = []
    blocks = zip(*[iter(tokens[: num_blocks * block_size])] * block_size)  # the block tuples, at C speed
    for block in blocks:
        parent = hash((parent, block))
        out.append(parent)
    return out


def extend_chain(hashes: tuple[int, ...], block_tokens: Sequence[int]) -> int:
    """Hash of the next full block after ``hashes``."""
    return hash((hashes[-1] if hashes else 0, tuple(block_tokens)))


def prompt_block_hashes(request: Request, block_size: int) -> tuple[int, ...]:
    """Hashes of the request's full prompt blocks; () when the request has no prefix identity."""
    n_full = request.prompt_len // block_size
    if request.has_real_tokens:
        return tuple(chain_hashes(request.prompt_token_ids, block_size, n_full))
    ids = request.prefix_block_hashes
    if not ids:
        return ()
    span = request.prefix_hash_block_size
    # Block i is identified by the trace id covering its last token, chained so that a block is
    # shared only when every trace id before it is shared too.
    n_full = min(n_full, (len(ids) * span) // block_size)
    out, parent = [], _TRACE_SALT
    for i in range(n_full):
        parent = hash((parent, _distinct(ids[((i + 1) * block_size - 1) // span]), i))
        out.append(parent)
    return tuple(out)
