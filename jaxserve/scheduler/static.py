"""``static``: request-level static batching, the pre-Orca baseline (FasterTransformer-style).

A batch is admitted only when the previous one has fully finished; its prompts run in one step and
then the batch decodes until its last request is done. KV is reserved for prompt + max_new_tokens.
"""

from __future__ import annotations

import dataclasses

from jaxserve.scheduler.base import WholePromptScheduler
from jaxserve.scheduler.chunking import whole
from jaxserve.scheduler.step import StepBuilder


@dataclasses.dataclass(frozen=True)
class StaticScheduler(WholePromptScheduler):
    fast_forward_safe = True  # see scheduler/fast_forward.py

    def schedule(self, state, now):
        step = StepBuilder(self, state, self.max_num_batched_tokens)
        if state.num_running:
            step.run_running(whole)
        else:
            step.admit_new(whole, reserve="full")
        return step.build()

    def decode_only(self, state) -> bool:
        """Whether ``schedule(state)`` would plan one decode of every running request and nothing
        else (fast_forward.next_is_stable_decode): a batch is running and decodes without a preemption."""
        return bool(state.num_running) and StepBuilder(self, state, self.max_num_batched_tokens).decodes_only()
