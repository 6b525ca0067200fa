"""Nano-batches of one engine step (NanoFlow, shared/PAPERS.md §9): static row boundaries per bucket shape.

A step's rows are ``D`` decode rows, then ``NB`` prefill blocks of ``block_rows`` rows
(``model/attention.py``). ``nano_split(D, NB, block_rows, n)`` cuts each kind into ``n`` contiguous,
near-equal runs; nano-batch ``i`` is decode run ``i`` plus block run ``i`` (empty ones are dropped),
so every nano-batch holds about ``1/n`` of the step's tokens *and* of each attention kind, and is
itself a valid ``(D_i, NB_i)`` step layout. The boundaries are a pure function of the (bucketed)
shape and ``n``: nano-batching adds no compiled shape.

Causality across nano-batches: a decode row reads only its own sequence's KV, and the blocks of one
prefill chunk are in row order, so a row's keys come from its own or an earlier nano-batch. The
model therefore writes and attends nano-batch by nano-batch, in order, and gets the unsplit step's
result (``LlamaForCausalLM.__call__(..., nano=)``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.model.attention import AttentionBatch


def _cuts(total: int, n: int) -> tuple[int, ...]:
    """``n + 1`` boundaries of ``total`` items in ``n`` contiguous runs differing by at most one."""
    return tuple((i * total) // n for i in range(n + 1))


class NanoSplit(NamedTuple):
    """Static nano-batch boundaries of a ``(num_decode_rows, num_blocks)`` step; hashable, so it can
    be a ``jax.jit`` static argument. ``parts[i] = ((d0, d1), (b0, b1))``: nano-batch ``i``'s
    decode rows ``[d0, d1)`` and prefill blocks ``[b0, b1)`` (every part non-empty, in row order)."""

    num_decode_rows: int
    num_blocks: int
    block_rows: int
    parts: tuple[tuple[tuple[int, int], tuple[int, int]], ...]

    @property
    def num_rows(self) -> int:
        return self.num_decode_rows + self.num_blocks * self.block_rows

    def row_ranges(self, i: int) -> tuple[tuple[int, int], ...]:
        """The non-empty ``[start, stop)`` row ranges of nano-batch ``i`` in the step's rows."""
        (d0, d1), (b0, b1) = self.parts[i]
        D, B = self.num_decode_rows, self.block_rows
        return tuple(r for r in ((d0, d1), (D + b0 * B, D + b1 * B)) if r[1] > r[0])

    def take(self, x: jax.Array, i: int) -> jax.Array:
        """Nano-batch ``i``'s rows of ``x [T, ...]`` (static slices)."""
        pieces = [x[a:b] for a, b in self.row_ranges(i)]
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)

    def merge(self, xs) -> jax.Array:
        """The inverse of ``take``: ``xs[i]`` (nano-batch ``i``'s rows) back in the step's row order."""
        decode, blocks = [], []
        for (d, _), x in zip(self.parts, xs):
            n_dec = d[1] - d[0]
            decode.append(x[:n_dec])
            blocks.append(x[n_dec:])
        pieces = [p for p in decode + blocks if p.shape[0]]
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)

    def batch(self, batch: AttentionBatch, i: int) -> AttentionBatch:
        """Nano-batch ``i``'s attention metadata: its rows' slots and positions, its decode rows'
        and blocks' KV lengths and page tables, and the ragged layout with one sequence per decode
        row and per block (a block's queries are the last ``block_rows`` positions of a KV length
        of its first row's position + ``block_rows``: the same rows and keys as the unsplit step,
        whose ragged layout has one sequence per prefill chunk)."""
        (d0, d1), (b0, b1) = self.parts[i]
        D, B = self.num_decode_rows, self.block_rows
        # A padding decode row is a sequence of one query over itself in the ragged layout (packing).
        kv_lens = jnp.concatenate([jnp.maximum(batch.decode_kv_lens[d0:d1], 1), batch.positions[D + b0 * B : D + b1 * B : B] + B])
        q_lens = np.array([1] * (d1 - d0) + [B] * (b1 - b0), np.int32)
        return AttentionBatch(
            slot_page=self.take(batch.slot_page, i),
            slot_offset=self.take(batch.slot_offset, i),
            positions=self.take(batch.positions, i),
            decode_kv_lens=batch.decode_kv_lens[d0:d1],
            decode_pages=batch.decode_pages[d0:d1],
            block_kv_lens=batch.block_kv_lens[b0:b1],
            block_pages=batch.block_pages[b0:b1],
            kv_lens=kv_lens.astype(jnp.int32),
            page_indices=jnp.concatenate([batch.decode_pages[d0:d1], batch.block_pages[b0:b1]]),
            cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)),
            num_seqs=jnp.asarray([len(q_lens)], jnp.int32),
        )


def nano_split(num_decode_rows: int, num_blocks: int, block_rows: int, n: int) -> NanoSplit | None:
    """The step split into at most ``n`` nano-batches (see the module docstring); None when that
    leaves one (``n = 1``, or a single row or block): the caller runs the unsplit step."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"nano_batches must be an integer >= 1, got {n!r}")
    dec, blk = _cuts(num_decode_rows, n), _cuts(num_blocks, n)
    parts = tuple(
        ((dec[i], dec[i + 1]), (blk[i], blk[i + 1]))
        for i in range(n)
        if dec[i + 1] > dec[i] or blk[i + 1] > blk[i]
    )
    return NanoSplit(num_decode_rows, num_blocks, block_rows, parts) if len(parts) > 1 else None
