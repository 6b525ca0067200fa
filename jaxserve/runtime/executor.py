"""The Executor protocol: what the replica loop needs from anything that runs a BatchPlan.

The simulator's cost-model executor and the engine's ModelRunner both implement it; the loop
(``jaxserve.runtime.replica``) knows nothing else about them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol

import numpy as np

from jaxserve.plan import BatchPlan, StepOutput


class DecodeRun(NamedTuple):
    """``k`` identical-batch decode steps in closed form: float64 [k] durations (s) and energies
    (J), each equal to what ``execute`` of that step would return, and the token id every row
    samples (executors that sample no real tokens, i.e. simulators)."""

    durations_s: np.ndarray
    energies_j: np.ndarray
    token_id: int


class Executor(Protocol):
    """Runs one BatchPlan at a time. Implementations subclass this protocol explicitly so they
    inherit ``decode_run``'s default (no closed form)."""

    def execute(self, plan: BatchPlan) -> StepOutput:
        """Applies the plan's swaps and copies, runs the step, returns one token per sampling row
        and the step's duration and energy."""
        ...

    def decode_run(self, num_rows: int, context_tokens: int, max_context: int, k: int) -> Optional[DecodeRun]:
        """The next ``k`` decode steps of the same ``num_rows`` rows, whose contexts sum to
        ``context_tokens`` (the longest ``max_context``) at the first step, without running them; or
        ``None`` when this executor can only run steps one by one (a real model must)."""
        return None
