"""TokenBuffer: the generated token ids of the running requests, one row (slot) per request.

A persistent value (``jaxserve.kv.versioned``): every version shares one int32 matrix
``[num_slots, width]`` (stored flat); a request's generated ids are ``[slot, :num_output]``, and
writes are recorded edits, so every older version stays valid and a decode step appends all its
tokens with a single scatter instead of one list append per request. A slot is taken when a
request enters the running batch and given back when it leaves (its ids are copied out first); a
free slot's cells are garbage. The matrix grows (doubling) in rows when every slot is taken and in
columns when an output outgrows it, so its size follows the longest output actually generated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxserve.kv.versioned import WHOLE, Versioned

TOK = 0  # int32 [num_slots * width]: slot s's ids at [s * width, (s + 1) * width)
STACK = 1  # int64 [num_slots]: freed slots, entries [0, num_stacked) live, the top last


class TokenBuffer(Versioned):
    __slots__ = ("next_fresh", "num_slots", "num_stacked", "width")

    def __init__(self, num_slots: int = 16, width: int = 64):
        self._data = [np.zeros(num_slots * width, np.int32), np.zeros(num_slots, np.int64)]
        self._link = None
        self.num_slots, self.width = num_slots, width
        self.next_fresh = 0  # slots >= next_fresh were never taken
        self.num_stacked = 0

    def _with(self, **changes) -> TokenBuffer:
        new = object.__new__(TokenBuffer)
        new.num_slots, new.width, new.next_fresh, new.num_stacked = (
            self.num_slots, self.width, self.next_fresh, self.num_stacked)
        for name, value in changes.items():
            setattr(new, name, value)
        return new

    def read(self, slot: int, n: int) -> tuple[int, ...]:
        """The first ``n`` ids of ``slot``."""
        start = slot * self.width
        return tuple(self._read()[TOK][start : start + n].tolist())

    # -- updates -------------------------------------------------------------------------------
    def take(self, tokens: Sequence[Sequence[int]]) -> tuple[TokenBuffer, tuple[int, ...]]:
        """Takes one slot per entry of ``tokens`` and writes that entry (a request's ids so far,
        often empty) into it; returns the slots."""
        data = self._read()
        n = len(tokens)
        k = min(n, self.num_stacked)
        slots = data[STACK][self.num_stacked - k : self.num_stacked][::-1].tolist()
        fresh = n - k
        slots += range(self.next_fresh, self.next_fresh + fresh)
        edits, changes = self._growth(data, self.next_fresh + fresh, max(map(len, tokens), default=0))
        width = changes.get("width", self.width)
        for slot, ids in zip(slots, tokens):
            if len(ids):
                edits.append((TOK, slice(slot * width, slot * width + len(ids)), np.asarray(ids, np.int32)))
        changes.update(next_fresh=self.next_fresh + fresh, num_stacked=self.num_stacked - k)
        return self._derive(edits, self._with(**changes)), tuple(slots)

    def write(self, slots: np.ndarray, positions: np.ndarray, tokens: np.ndarray) -> TokenBuffer:
        """Writes ``tokens[i]`` at ``positions[i]`` of ``slots[i]`` (distinct slots), int arrays;
        ``positions``/``tokens`` may be 2-D ``[len(slots), k]`` to write k ids per slot."""
        if not len(slots):
            return self
        data = self._read()
        edits, changes = self._growth(data, 0, int(np.maximum.reduce(positions, axis=None)) + 1)
        width = changes.get("width", self.width)
        flat = slots * width + positions if positions.ndim == 1 else (slots * width)[:, None] + positions
        edits.append((TOK, flat.ravel(), tokens.ravel()))
        return self._derive(edits, self._with(**changes))

    def fill(self, slots: np.ndarray, starts: np.ndarray, k: int, token: int) -> TokenBuffer:
        """Writes ``token`` at positions ``starts[i]`` to ``starts[i] + k - 1`` of ``slots[i]``
        (distinct slots; int arrays): k steps that sample the same token for every row."""
        if not len(slots) or k <= 0:
            return self
        data = self._read()
        edits, changes = self._growth(data, 0, int(np.maximum.reduce(starts)) + k)
        base = slots * changes.get("width", self.width) + starts
        edits.append((TOK, base if k == 1 else (base[:, None] + np.arange(k)).ravel(), token))
        return self._derive(edits, self._with(**changes))

    def release(self, slots: Sequence[int]) -> TokenBuffer:
        """Gives ``slots`` back (their ids are garbage from now on)."""
        if not len(slots):
            return self
        top = self.num_stacked
        edits = [(STACK, slice(top, top + len(slots)), np.asarray(slots, np.int64))]
        return self._derive(edits, self._with(num_stacked=top + len(slots)))

    def _growth(self, data: list, rows_needed: int, width_needed: int) -> tuple[list, dict]:
        """Edits (and field changes) that grow the matrix, doubling, to at least ``rows_needed``
        slots of ``width_needed`` ids."""
        rows, width = self.num_slots, self.width
        if rows_needed <= rows and width_needed <= width:
            return [], {}
        new_rows, new_width = rows, width
        while new_rows < rows_needed:
            new_rows *= 2
        while new_width < width_needed:
            new_width *= 2
        grown = np.zeros((new_rows, new_width), np.int32)
        grown[:rows, :width] = data[TOK].reshape(rows, width)
        edits = [(TOK, WHOLE, grown.reshape(-1))]
        if new_rows > rows:
            stack = np.zeros(new_rows, np.int64)
            stack[:rows] = data[STACK]
            edits.append((STACK, WHOLE, stack))
        return edits, {"num_slots": new_rows, "width": new_width}
