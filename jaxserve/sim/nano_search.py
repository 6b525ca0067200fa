"""Offline search for a nano-batched schedule: NanoFlow's auto-search (arXiv:2408.12757 §4.1) in small.

NanoFlow solves two MILPs offline for a model, a machine and a workload's dense batch: the pipeline's
structure (how many nano-batches, their sizes, the op order), then each nano-operation's share of
the SMs under the profiled interference curves. Here the structure is fixed (equal nano-batches,
one share per kind; ``overlap_cost_model``) and the space is small enough to enumerate: every
nano-batch count up to ``max_nano`` times every pair of shares on a grid (NanoFlow profiles its
curves at 0.1 steps), all evaluated at once by ``overlapped_busy``'s numpy broadcasting over the
workload's representative steps. ``steady_state_plan`` builds such a step for a length mix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxserve.plan import BatchPlan
from jaxserve.sim.cost_model import RooflineCostModel, StepParts
from jaxserve.sim.interference import NANOFLOW_A100, Interference
from jaxserve.sim.overlap_cost_model import NanoSchedule, nano_duration


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The best ``schedule`` for the plans, its (weighted) total step seconds ``step_s`` and the
    unsplit steps' ``unsplit_s``; ``candidates`` schedules were compared."""

    schedule: NanoSchedule
    step_s: float
    unsplit_s: float
    candidates: int

    @property
    def speedup(self) -> float:
        return self.unsplit_s / self.step_s


def schedule_grid(max_nano: int = 8, share_step: float = 0.1, network: bool = True) -> tuple[np.ndarray, ...]:
    """``(num_nano, memory_share, network_share)`` arrays of every candidate: the unsplit step
    (1, 0, 0) first, then for each count 2..``max_nano`` every pair of shares that are positive
    multiples of ``share_step`` and leave the GEMMs a share (the network share is 0 when the
    replica has no collectives, ``network=False``)."""
    if not isinstance(max_nano, int) or isinstance(max_nano, bool) or max_nano < 1:
        raise ValueError(f"max_nano must be an int >= 1, got {max_nano!r}")
    steps = round(1.0 / share_step) if isinstance(share_step, (int, float)) and share_step > 0 else 0
    if steps < 2 or not np.isclose(steps * share_step, 1.0):
        raise ValueError(f"share_step must divide 1 into at least 2 steps (0.1, 0.05, ...), got {share_step!r}")
    shares = np.arange(1, steps) / steps
    m, n = np.meshgrid(shares, shares if network else np.zeros(1), indexing="ij")
    keep = m + n < 1.0 - 1e-9
    m, n = m[keep], n[keep]
    counts = np.arange(2, max_nano + 1)
    nano = np.concatenate([[1.0], np.repeat(counts, len(m)).astype(np.float64)])
    return nano, np.concatenate([[0.0], np.tile(m, len(counts))]), np.concatenate([[0.0], np.tile(n, len(counts))])


def search_schedule(cost_model: RooflineCostModel, plans: Sequence[BatchPlan], weights: Sequence[float] | None = None,
                    *, max_nano: int = 8, share_step: float = 0.1,
                    interference: Interference = NANOFLOW_A100) -> SearchResult:  # fmt: skip
    """The schedule minimising the ``weights``-weighted sum of ``plans``' step times on
    ``cost_model``'s device (each step at the smaller of its nano-batched and unsplit times, as
    ``OverlapCostModel`` costs it); ties go to the fewer nano-batches, then the smaller shares."""
    plans = list(plans)
    if not plans:
        raise ValueError("search_schedule needs at least one plan")
    w = np.ones(len(plans)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(plans),) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"weights must be {len(plans)} non-negative numbers, not all 0, got {weights!r}")
    parts = [cost_model.parts(p) for p in plans]
    stacked = StepParts(*(np.array([getattr(p, f) for p in parts])[:, None] for f in StepParts._fields))
    nano, memory, network = schedule_grid(max_nano, share_step, network=bool(np.any(stacked.comm_s + stacked.comm_fixed_s > 0)))
    duration, _ = nano_duration(cost_model, stacked, nano[None, :], memory[None, :], network[None, :], interference)
    unsplit = np.array([cost_model.step(p).duration_s for p in plans])[:, None]
    totals = w @ np.minimum(duration, unsplit)
    totals[0] = w @ unsplit[:, 0]  # the unsplit step itself, exactly
    best = int(np.argmin(totals))
    schedule = NanoSchedule(int(nano[best]), round(float(memory[best]), 6), round(float(network[best]), 6))
    return SearchResult(schedule, float(totals[best]), float(totals[0]), len(nano))


def steady_state_plan(prompt_len: float, output_len: float, dense_tokens: int, block_size: int = 16) -> BatchPlan:
    """A step of a saturated chunked-prefill server (NanoFlow's batch formation, Sarathi's chunks)
    serving requests of ``prompt_len`` / ``output_len`` tokens with ``dense_tokens`` tokens a step:
    decodes in proportion to the tokens each phase needs, ``d = dense·o/(p+o)`` rows at the mean
    decode context ``p + o/2``; the rest prefill, in whole prompts from position 0 (the last one
    partial). Every row samples except a partial prompt's."""
    if not prompt_len >= 1 or not output_len >= 1 or not isinstance(dense_tokens, int) or dense_tokens < 1:
        raise ValueError(f"need prompt_len, output_len >= 1 and an int dense_tokens >= 1, got "
                         f"{prompt_len!r}, {output_len!r}, {dense_tokens!r}")
    decodes = min(dense_tokens, max(1, round(dense_tokens * output_len / (prompt_len + output_len))))
    context = round(prompt_len + output_len / 2)
    prompt = max(1, round(prompt_len))
    left = dense_tokens - decodes
    chunks = [prompt] * (left // prompt) + ([left % prompt] if left % prompt else [])
    computed = np.array([context] * decodes + [0] * len(chunks), np.int64)
    new = np.array([1] * decodes + chunks, np.int64)
    samples = np.array([True] * decodes + [c == prompt for c in chunks], bool)
    tables = tuple(tuple(range(-(-int(c + n) // block_size))) for c, n in zip(computed.tolist(), new.tolist()))
    return BatchPlan(request_ids=tuple(f"s{i}" for i in range(len(new))), num_computed_tokens=computed,
                     num_new_tokens=new, samples_token=samples, block_tables=tables,
                     token_ids=np.zeros(int(new.sum()), np.int32), block_size=block_size)  # fmt: skip
