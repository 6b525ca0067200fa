"""The Executor protocol: what the replica loop needs from anything that runs a BatchPlan.

The simulator's cost-model executor and the engine's ModelRunner both implement it; the loop
(``jaxserve.runtime.replica``) knows nothing else about them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional, Protocol

import numpy as np

from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import Request


class DecodeRun(NamedTuple):
    """``k`` identical-batch decode steps in closed form: float64 [k] durations (s) and energies
    (J), each equal to what ``execute`` of that step would return, and the token id every row
    samples (executors that sample no real tokens, i.e. simulators)."""

    durations_s: np.ndarray
    energies_j: np.ndarray
    token_id: int


class Executor(Protocol):
    """Runs one BatchPlan at a time. Implementations subclass this protocol explicitly so they
    inherit the defaults: no closed form (``decode_run``), nothing to register per request, and no
    KV contents (``read_kv``/``write_kv``: a simulator's KV is bookkeeping only)."""

    def register(self, request: Request) -> None:
        """Called before ``request`` joins this executor's replica (on arrival or migrated in);
        raises ``ValueError`` naming the problem when it cannot be served here."""

    def release(self, request_id: str) -> None:
        """``request_id`` left this replica (finished, aborted or migrated away)."""

    def read_kv(self, blocks: Sequence[int]) -> Optional[np.ndarray]:
        """The contents of KV ``blocks`` (in that order) as one host array, for copying to another
        replica; ``None`` when this executor holds no KV contents."""
        return None

    def write_kv(self, blocks: Sequence[int], payload: Optional[np.ndarray]) -> None:
        """Writes ``payload`` (from another executor's ``read_kv`` of as many blocks) into ``blocks``."""

    def prepare_kv_copy(self, num_blocks: int) -> None:
        """Readies ``read_kv``/``write_kv`` of ``num_blocks`` blocks (e.g. compiles them), so that a
        measured copy times the copy alone."""

    def execute(self, plan: BatchPlan) -> StepOutput:
        """Applies the plan's swaps and copies, runs the step, returns one token per sampling row
        and the step's duration and energy."""
        ...

    def step_cost(self, plan: BatchPlan) -> Optional[tuple[float, float, int]]:
        """``(duration_s, energy_j, token)`` of ``plan`` told without running it, every sampling row
        sampling ``token`` (a simulator: the same as ``execute``); ``None`` when the executor must
        run the step (a real model). Closed-form runs of known steps use it."""
        return None

    def decode_run(self, num_rows: int, context_tokens: int, max_context: int, k: int) -> Optional[DecodeRun]:
        """The next ``k`` decode steps of the same ``num_rows`` rows, whose contexts sum to
        ``context_tokens`` (the longest ``max_context``) at the first step, without running them; or
        ``None`` when this executor can only run steps one by one (a real model must)."""
        return None

    def prefill_run(self, num_rows: int, decode_context: int, prefill_context: int, chunks: Sequence[int],
                    completes: bool) -> Optional[DecodeRun]:
        """The next ``len(chunks)`` steps of the same ``num_rows`` rows without running or planning
        them: every row decodes but one, which computes ``chunks[j]`` prompt tokens at step j (and
        samples only at the last step, when it ``completes`` its prompt); at the first step the
        decoding rows' contexts sum to ``decode_context`` (each step adds ``num_rows - 1``) and the
        prefilling row's is ``prefill_context``. Each step's duration and energy equal ``step_cost``
        of its plan; ``None`` when there is no such closed form (then the plans are costed)."""
        return None
