"""``orca``: iteration-level scheduling (Yu et al., OSDI'22).

Every step runs all running decodes plus whole-prompt prefills of newly admitted requests (no
chunking); a request is admitted, FCFS, only if KV for its prompt + max_new_tokens fits, so running
requests never need more memory and nothing is ever preempted.
"""

from __future__ import annotations

import dataclasses

from jaxserve.scheduler.base import WholePromptScheduler
from jaxserve.scheduler.chunking import whole
from jaxserve.scheduler.step import StepBuilder


@dataclasses.dataclass(frozen=True)
class OrcaScheduler(WholePromptScheduler):
    fast_forward_safe = True  # see scheduler/fast_forward.py

    def schedule(self, state, now):
        step = StepBuilder(self, state, self.max_num_batched_tokens)
        step.run_running(whole)
        step.admit_new(whole, reserve="full")
        return step.build()

    def decode_only(self, state) -> bool:
        """Whether ``schedule(state)`` would plan one decode of every running request and nothing
        else (fast_forward.next_is_stable_decode)."""
        step = StepBuilder(self, state, self.max_num_batched_tokens)
        return step.decodes_only() and not step.would_admit(whole, reserve="full")
