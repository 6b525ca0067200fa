"""Per-request scheduler records: SeqState (a request outside the running batch) and FinishedRequest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from jaxserve.request import Request


class SeqState(NamedTuple):
    """A request waiting or swapped out, with the progress it keeps across preemptions."""

    request: Request
    seq_no: int  # arrival order (order of add_request calls); smaller = earlier
    outputs: tuple[int, ...] = ()  # generated ids (num_output of them)
    num_output: int = 0
    block_hashes: tuple[int, ...] = ()  # hash chain of the full blocks known so far
    num_preemptions: int = 0
    num_computed: int = 0  # swapped only: tokens whose KV sits in host_blocks
    host_blocks: tuple[int, ...] = ()  # swapped only

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what a recompute must process."""
        return self.request.prompt_len + self.num_output


class FinishedRequest(NamedTuple):
    request_id: str
    output_token_ids: tuple[int, ...]
    finish_reason: str  # "length" or "stop"
    num_preemptions: int


def seq_tokens(request: Request, outputs: Sequence[int], num_output: int, start: int, stop: int) -> list[int]:
    """Token ids ``[start, stop)`` of prompt + generated tokens (``outputs[:num_output]``)."""
    prompt_len = request.prompt_len
    out = list(request.prompt_token_ids[start:min(stop, prompt_len)]) if start < prompt_len else []
    if stop > prompt_len:
        if stop - prompt_len > num_output:
            raise IndexError(f"token {stop - 1} of {request.request_id!r} is not known yet")
        out += outputs[max(start - prompt_len, 0) : stop - prompt_len]
    return out
