"""``sarathi``: Sarathi-Serve chunked prefills with stall-free batching (Agrawal et al., OSDI'24).

Each step has a token budget ``chunk_size``. It is filled by (1) every running decode, (2) the
ongoing prefills' next chunks, (3) new prefills, each chunk cut to the budget left (rounded down to
a multiple of ``chunk_align`` unless it finishes the prompt). Decodes are never paused for a prefill.
KV is paged on demand with vLLM's preemption of the latest arrival.
"""

from __future__ import annotations

import dataclasses

from jaxserve.scheduler.base import BatchingScheduler, _check_option
from jaxserve.scheduler.chunking import Chunked
from jaxserve.scheduler.step import StepBuilder


@dataclasses.dataclass(frozen=True)
class SarathiScheduler(BatchingScheduler):
    fast_forward_safe = True  # see scheduler/fast_forward.py
    chunk_size: int = 512
    chunk_align: int = 1

    def __post_init__(self):
        super().__post_init__()
        _check_option("chunk_size", self.chunk_size, 1)
        _check_option("chunk_align", self.chunk_align, 1)
        if self.chunk_align > self.chunk_size:
            raise ValueError(
                f"scheduler option chunk_align ({self.chunk_align}) must not exceed chunk_size ({self.chunk_size})"
            )

    def schedule(self, state, now):
        chunk = Chunked(self.chunk_align)
        step = StepBuilder(self, state, self.chunk_size)
        step.run_running(chunk)
        step.admit_waiting(chunk)
        return step.build()

    def prefill_run_budget(self, state):
        """``(token budget, chunking, whether a step may leave budget over)`` of the steps after
        ``state`` while one request prefills (scheduler/prefill_runs.py): they run_running alone
        when they use the whole budget, and also when they leave some if nobody waiting could be
        admitted then (the queue is empty, or its head fits not even with the whole budget and the
        blocks free now: blocks only shrink in such a run). None with requests swapped out."""
        if state.num_swapped:
            return None
        chunk = Chunked(self.chunk_align)
        if not state.num_waiting:
            return self.chunk_size, chunk, True
        return self.chunk_size, chunk, not StepBuilder(self, state, self.chunk_size).would_admit(chunk)

    def decode_only(self, state) -> bool:
        """Whether ``schedule(state)`` would plan one decode of every running request and nothing
        else (fast_forward.next_is_stable_decode): every row decodes without a preemption and
        then neither the first swapped request nor (with none swapped) the queue head fits."""
        step, chunk = StepBuilder(self, state, self.chunk_size), Chunked(self.chunk_align)
        if not step.decodes_only():
            return False
        return not (step.would_swap_in(chunk) if state.num_swapped else step.would_admit(chunk))
