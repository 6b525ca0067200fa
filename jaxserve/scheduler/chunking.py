"""Chunking parts: how many of a request's pending tokens a step may compute.

A chunk function maps ``(remaining_tokens, budget_left) -> tokens to compute now`` (0 = not now).
"""

from __future__ import annotations

import dataclasses


def whole(remaining: int, budget: int) -> int:
    """All pending tokens in one step, or none (vLLM, Orca: prefills are never split)."""
    return remaining if remaining <= budget else 0


@dataclasses.dataclass(frozen=True)
class Chunked:
    """Sarathi-Serve chunks: as many tokens as the budget allows. With ``align > 1`` a chunk that
    does not finish the prompt is rounded down to a multiple of ``align`` (tile-sized chunks)."""

    align: int = 1

    def __post_init__(self):
        if not isinstance(self.align, int) or self.align < 1:
            raise ValueError(f"chunk_align must be an int >= 1, got {self.align!r}")

    def __call__(self, remaining: int, budget: int) -> int:
        if remaining <= budget:
            return remaining
        return budget - budget % self.align
