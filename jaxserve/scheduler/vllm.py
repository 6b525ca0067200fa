"""``vllm``: PagedAttention scheduling (Kwon et al., SOSP'23; vLLM's v0 scheduler).

Blocks are allocated on demand. Prefill-prioritizing: when waiting prompts fit, a step runs only
prefills (whole prompts, FCFS, within ``max_num_batched_tokens``); otherwise it runs every running
decode, preempting the latest-arrived request when blocks run out (recompute or swap), and, if
nothing was preempted, swaps requests back in. No new prefills start while any request is swapped.
"""

from __future__ import annotations

import dataclasses

from jaxserve.request import Request
from jaxserve.scheduler.base import WholePromptScheduler
from jaxserve.scheduler.chunking import whole
from jaxserve.scheduler.step import StepBuilder


@dataclasses.dataclass(frozen=True)
class VLLMScheduler(WholePromptScheduler):
    fast_forward_safe = True  # see scheduler/fast_forward.py

    def longest_prefill(self, request: Request) -> int:
        # A recompute after preemption prefills prompt + every generated token but the last.
        return request.max_total_tokens - 1

    def schedule(self, state, now):
        step = StepBuilder(self, state, self.max_num_batched_tokens)
        if not state.num_swapped:
            step.admit_new(whole)
        if not step.new_rows:
            step.run_running(whole)
            if not step.preempted and not step.swapped_out:
                step.swap_in(whole)
        return step.build()

    def decode_only(self, state) -> bool:
        """Whether ``schedule(state)`` would plan one decode of every running request and nothing
        else (fast_forward.next_is_stable_decode): the queue head does not fit (or admission waits
        for swapped requests), every row decodes without a preemption, none is swapped back in."""
        step = StepBuilder(self, state, self.max_num_batched_tokens)
        if not state.num_swapped and step.would_admit(whole):
            return False
        return step.decodes_only() and not step.would_swap_in(whole)
