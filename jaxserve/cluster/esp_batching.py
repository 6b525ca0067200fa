"""LoongServe's prefill batching by dynamic programming (SOSP'24 §5.3; the artifact's
``minimize_prefill_iteration_time``).

The admitted prompts, in arrival order, are cut into consecutive batches, and the prefill
instances, in the given order, into consecutive blocks: batch b runs on block b, all batches at
once. A batch fits when its prompt tokens fit the free KV of its block (its KV is written there).
The objective is the prefill share of input-normalized latency the artifact minimises:
Σ_b T_b · Σ_{i∈b} 1/l_i, with T_b the batch's time on its block from the cost model. Trailing
instances may stay unused (more instances is not always faster for short prompts: ring hops cost).
O(n² · K²) cost evaluations, vectorised over the batch's first prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

# time_fn(num_requests, tokens, pairs, k) -> seconds, elementwise over numpy arrays of the first three.
PrefillTimeFn = Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


class PrefillBatch(NamedTuple):
    """Prompts ``first..stop-1`` (indices into the admitted list) on ``instances`` for ``time_s``."""

    first: int
    stop: int
    instances: tuple[int, ...]
    time_s: float


class BatchPlanDP(NamedTuple):
    batches: tuple[PrefillBatch, ...]
    objective: float  # Σ_b time_b · Σ_{i in b} 1/l_i


def batch_objective(prompt_lens: Sequence[int], batches: Sequence[PrefillBatch]) -> float:
    """The DP's objective of ``batches`` (Σ time · Σ 1/l), for tests and reports."""
    return float(sum(b.time_s * sum(1.0 / prompt_lens[i] for i in range(b.first, b.stop)) for b in batches))


def plan_prefill_batches(prompt_lens: Sequence[int], instances: Sequence[int], free_tokens: Sequence[int],
                         time_fn: PrefillTimeFn) -> BatchPlanDP:
    """The optimal partition (module docstring). ``instances[j]`` has ``free_tokens[j]`` KV tokens
    free. ``ValueError`` when no partition fits (the caller admitted more than the instances hold)."""
    lens = np.asarray(prompt_lens, np.float64)
    n, num_inst = len(lens), len(instances)
    if n == 0:
        return BatchPlanDP((), 0.0)
    if len(free_tokens) != num_inst or num_inst == 0:
        raise ValueError("instances and free_tokens must be equal-length and non-empty")
    if lens.min() < 1:
        raise ValueError("prompt lengths must be >= 1")
    tokens = np.concatenate([[0.0], np.cumsum(lens)])
    pairs = np.concatenate([[0.0], np.cumsum(lens * (lens + 1) / 2)])
    weight = np.concatenate([[0.0], np.cumsum(1.0 / lens)])
    free = np.concatenate([[0.0], np.cumsum(np.asarray(free_tokens, np.float64))])
    # cost[k][a, b]: prompts a..b-1 as one batch on k instances (inf where a >= b)
    a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    valid = a < b
    count, tok, pr = (b - a)[valid], (tokens[b] - tokens[a])[valid], (pairs[b] - pairs[a])[valid]
    span_tokens = np.where(valid, tokens[b] - tokens[a], np.inf)
    times, cost = {}, {}
    for k in range(1, num_inst + 1):
        t = np.full((n + 1, n + 1), np.inf)
        t[valid] = time_fn(count.astype(np.float64), tok, pr, k)
        times[k] = t
        cost[k] = t * np.where(valid, weight[b] - weight[a], np.inf)
    best = np.full((n + 1, num_inst + 1), np.inf)
    best[0, 0] = 0.0
    choice = np.zeros((n + 1, num_inst + 1, 2), np.int64)  # (first prompt, instances) of the last batch
    for i in range(1, n + 1):
        for j in range(1, num_inst + 1):
            for k in range(1, j + 1):
                cap = free[j] - free[j - k]
                cand = best[:i, j - k] + np.where(span_tokens[:i, i] <= cap, cost[k][:i, i], np.inf)
                first = int(np.argmin(cand))
                if cand[first] < best[i, j]:
                    best[i, j] = cand[first]
                    choice[i, j] = (first, k)
    j = int(np.argmin(best[n]))
    if not np.isfinite(best[n, j]):
        raise ValueError(f"{n} prompts ({int(tokens[-1])} tokens) do not fit {int(free[-1])} free KV tokens "
                         "of the prefill instances in any batching")
    objective, batches, i = float(best[n, j]), [], n
    while i > 0:
        first, k = (int(x) for x in choice[i, j])
        batches.append(PrefillBatch(first, i, tuple(instances[j - k:j]), float(times[k][first, i])))
        i, j = first, j - k
    return BatchPlanDP(tuple(reversed(batches)), objective)
