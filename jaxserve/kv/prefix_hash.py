"""Prefix-cache identities: one exact key per full KV block, chained by a 256-bit digest.

A block's key is the exact input of its link in a hash chain, not the link's output:

    key_i = tag || parent_i || content_i        parent_0 = the salt field, parent_i = D(key_{i-1})

with ``D`` = BLAKE2b-256 (``block_digest``). The prefix cache is a dict keyed by these bytes, so a
lookup compares a candidate's whole key with the request's own: a hit always holds exactly the
request's tokens for that block, after the same parent digest, with the same salt (first block).
What the key does not spell out — the tokens before the block — is named by the 256-bit parent
digest; two different prefixes share it only through a BLAKE2b-256 collision (about 2^128 work).

Layouts (each parses uniquely: one-byte tag, fixed-width digest, length-prefixed salt):
* token block 0:   ``b"S" + salt_field + tokens``; token block i > 0: ``b"T" + D(key_{i-1}) + tokens``,
  the tokens as little-endian int32 (exact: token ids are validated to lie in [0, 2^31)).
* trace blocks (requests known by length, carrying ``Request.prefix_block_hashes``): the trace id
  covering the block's last token, named by its position in a chain of trace ids (one digest per
  trace id, not per block): ``p_0 = b"M" + salt_field + b"<span>/<id_0>"``,
  ``p_j = b"N" + D(p_{j-1}) + b"<id_j>"``; block i's key is ``p_j + b"@<i>"``. The tags keep trace
  chains and token chains apart even if every digest collided.
* ``salt_field = b"<len>:" + salt`` (UTF-8; ``b"0:"`` for no salt, since a salt is non-empty).

Keys are deterministic bytes (no process-salted ``hash()``), so chains are stable across processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Optional

import numpy as np

from jaxserve.request import Request

DIGEST_SIZE = 32  # bytes of the parent digest in every key after the first
BlockKey = bytes


def block_digest(key: bytes) -> bytes:
    """The parent digest a key hands to the next block: BLAKE2b with a DIGEST_SIZE-byte output."""
    return hashlib.blake2b(key, digest_size=DIGEST_SIZE).digest()


def salt_field(salt: Optional[str]) -> bytes:
    """The exact, length-prefixed encoding of a cache salt (``b"0:"`` for None)."""
    if salt is None:
        return b"0:"
    raw = salt.encode("utf-8", "surrogatepass")  # injective on every str
    return b"%d:%b" % (len(raw), raw)


def _token_bytes(tokens) -> bytes:
    """Tokens as little-endian int32 bytes (raises OverflowError on an id outside int32)."""
    return np.asarray(tokens, "<i4").tobytes()


def _token_keys(buf: bytes, block_size: int, parent: Optional[bytes], salt: Optional[str]) -> list[bytes]:
    """Keys of the full blocks in ``buf`` (int32 bytes), after key ``parent`` (None: a chain start)."""
    digest = block_digest  # looked up per call, so tests can swap in a weak digest
    width = 4 * block_size
    out = []
    append = out.append
    start = 0
    if parent is None:
        if len(buf) < width:
            return out
        parent = b"S" + salt_field(salt) + buf[:width]
        append(parent)
        start = width
    for i in range(start, len(buf) - width + 1, width):  # one digest per block: the chain's cost
        parent = b"T" + digest(parent) + buf[i : i + width]
        append(parent)
    return out


def chain_hashes(
    tokens: Sequence[int], block_size: int, num_blocks: int, parent: Optional[bytes] = None,
    salt: Optional[str] = None,
) -> list[bytes]:
    """Keys of the first ``num_blocks`` full blocks of ``tokens``, continuing the chain after key
    ``parent``; ``parent=None`` starts a chain, salted with ``salt`` (ignored otherwise)."""
    n = min(num_blocks, len(tokens) // block_size)
    if n <= 0:
        return []
    return _token_keys(_token_bytes(tokens[: n * block_size]), block_size, parent, salt)


def extend_chain(hashes: Sequence[bytes], block_tokens: Sequence[int], salt: Optional[str] = None) -> bytes:
    """Key of the next full block (``block_tokens``) after the chain ``hashes`` (salted when empty)."""
    (key,) = _token_keys(_token_bytes(block_tokens), len(block_tokens), hashes[-1] if hashes else None, salt)
    return key


def trace_chain(ids: Sequence[int], span: int, block_size: int, num_blocks: int, salt: Optional[str] = None) -> list[bytes]:
    """Keys of the first ``num_blocks`` blocks of a prompt named by trace ids (``span`` tokens per
    id): block i carries the id covering its last token, chained over every id before it, so a
    block is shared only when every trace id up to it is shared too."""
    digest = block_digest
    out = []
    j_prev, link = -1, b""
    for i in range(num_blocks):
        j = ((i + 1) * block_size - 1) // span
        while j_prev < j:  # the trace-id links up to id j (several when a block spans ids)
            j_prev += 1
            if j_prev == 0:
                link = b"M" + salt_field(salt) + b"%d/%d" % (span, ids[0])
            else:
                link = b"N" + digest(link) + b"%d" % ids[j_prev]
        out.append(link + b"@%d" % i)
    return out


def prompt_block_hashes(request: Request, block_size: int) -> tuple[bytes, ...]:
    """Keys of the request's full prompt blocks; () when the request has no prefix identity."""
    n_full = request.prompt_len // block_size
    salt = request.cache_salt
    if request.has_real_tokens:
        if not n_full:
            return ()
        buf = request.prompt_array[: n_full * block_size].astype("<i4", copy=False).tobytes()
        return tuple(_token_keys(buf, block_size, None, salt))
    ids = request.prefix_block_hashes
    if not ids:
        return ()
    span = request.prefix_hash_block_size
    return tuple(trace_chain(ids, span, block_size, min(n_full, (len(ids) * span) // block_size), salt))
