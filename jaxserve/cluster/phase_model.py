"""Analytic latency model of disaggregated phases (DistServe §4.1), in ``jnp`` so one ``jax.vmap``
screens every candidate placement at once.

A phase candidate is ``count`` instances of one parallel config (tp, pp); Poisson arrivals at rate
``R`` split evenly, so each instance sees ``λ = R / count``.

* **Prefill** (one prompt per step, FCFS): an M/G/1 queue (M/D/1 for a fixed prompt length), whose
  service time ``S`` is the pipeline's bottleneck stage, ``D / in_flight`` (DistServe's
  ``D_m ≈ D / pp`` when ``pp`` micro-batches overlap; ``in_flight = 1`` when they do not), while a
  request's own latency is the whole pipeline traversal ``D``. Pollaczek-Khinchine:
  ``E[TTFT] = E[D] + λ E[S²] / (2 (1 − λ E[S]))``, infinite at ``λ E[S] >= 1``. For a TTFT target
  ``T`` with slack ``s = T − E[D] > 0`` the highest rate is ``λ* = 2s / (E[S²] + 2s E[S])``.
* **Decode** (continuous batching): ``in_flight`` micro-batches of ``b`` rows each take one step of
  ``t(b)`` seconds per token, so TPOT = ``t(b)``; Little's law with ``n`` decode steps per request
  ties ``b`` to the rate: ``in_flight · b = λ · n · t(b)``. ``b`` is capped by KV memory and
  ``max_num_seqs`` (``max_batch``); past the cap's rate the queue grows without bound (TPOT = inf).

Step times come from the simulator's cost model (``prefill_step_times`` / ``decode_step_times``
evaluate it on synthetic plans; nothing here restates the roofline) and are tabulated on a grid,
linear between points: ``D(L)`` over prompt lengths ``L``, ``t(b)`` over batch sizes at the
workload's mean context per running row (the roofline step is linear in context tokens, so the mean
context gives the mean step). The prompt-length distribution enters only as interpolation weights
on the grid (``PromptMoments``), so a candidate costs O(G²) whatever the sample size.

These are mean-value estimates (mean TTFT / TPOT against the targets, not the 90th percentile), a
screen for the simulator, not a substitute: KV transfer time and prefill batching are not modelled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.plan import BatchPlan


# -- the workload --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PhaseWorkload:
    """What the phase model needs of a workload, from a sample of (prompt, output) lengths in tokens.

    ``decode_steps``: mean decode steps per request (output − 1: the prefill samples the first token);
    ``context_per_row``: mean KV tokens of a running decode row, weighted by the steps it spends at
    each length; ``max_total``: the longest prompt + output (what a decode instance must hold)."""

    prompt_lens: np.ndarray  # int64 [N]
    decode_steps: float
    context_per_row: float
    max_prompt: int
    max_total: int

    @classmethod
    def from_lengths(cls, prompt_lens: Sequence[int], output_lens: Sequence[int]) -> PhaseWorkload:
        p = np.asarray(prompt_lens, np.int64).reshape(-1)
        o = np.asarray(output_lens, np.int64).reshape(-1)
        if not len(p) or len(p) != len(o):
            raise ValueError(f"workload: need as many output lengths as prompt lengths (> 0), got {len(p)} and {len(o)}")
        if p.min() < 1 or o.min() < 1:
            raise ValueError("workload: prompt and output lengths must be >= 1")
        steps = o - 1
        if not steps.sum():
            raise ValueError("workload: every request has 1 output token, so there is no decode phase to place")
        # decode step j (1-based) of a request runs with P + j − 1 tokens already in KV
        context = (steps * p + steps * (steps - 1) / 2.0).sum() / steps.sum()
        p.flags.writeable = False
        return cls(p, float(steps.mean()), float(context), int(p.max()), int((p + o).max()))

    @classmethod
    def from_requests(cls, requests) -> PhaseWorkload:
        """From ``Request`` values: their prompt lengths and ``sampling.max_new_tokens``."""
        requests = list(requests)
        return cls.from_lengths([r.prompt_len for r in requests], [r.sampling.max_new_tokens for r in requests])


def length_grid(max_len: int, points: int) -> np.ndarray:
    """Distinct integers from 1 to ``max_len`` (both included), about ``points`` of them, spaced
    geometrically (step times bend most at small sizes). float64 [G], G <= points."""
    if max_len < 1 or points < 2:
        raise ValueError(f"length_grid needs max_len >= 1 and points >= 2, got {max_len}, {points}")
    return np.unique(np.round(np.geomspace(1, max_len, points))).astype(np.float64)


class PromptMoments(NamedTuple):
    """The prompt-length sample as weights on a length grid: for step times ``d`` tabulated on the
    grid (linear between points), ``E[D] = first @ d`` and ``E[D²] = d @ second @ d``."""

    grid: np.ndarray  # float64 [G]
    first: np.ndarray  # float64 [G]
    second: np.ndarray  # float64 [G, G]


def prompt_moments(prompt_lens: np.ndarray, grid: np.ndarray) -> PromptMoments:
    """Interpolation weights of every prompt length on ``grid`` (which must cover them), averaged."""
    lens = np.asarray(prompt_lens, np.float64)
    if lens.min() < grid[0] or lens.max() > grid[-1]:
        raise ValueError(f"prompt lengths {lens.min():.0f}..{lens.max():.0f} lie outside the grid {grid[0]:.0f}..{grid[-1]:.0f}")
    hi = np.clip(np.searchsorted(grid, lens), 1, len(grid) - 1)
    frac = (lens - grid[hi - 1]) / (grid[hi] - grid[hi - 1])
    weights = np.zeros((len(lens), len(grid)))
    rows = np.arange(len(lens))
    weights[rows, hi - 1] = 1.0 - frac
    weights[rows, hi] += frac
    return PromptMoments(grid, weights.mean(0), weights.T @ weights / len(lens))


# -- step times from the cost model ----------------------------------------------------------------
def prefill_plan(prompt_len: int, block_size: int) -> BatchPlan:
    """A step that prefills one whole prompt of ``prompt_len`` tokens and samples its first token."""
    blocks = -(-prompt_len // block_size)
    return BatchPlan(
        request_ids=("prefill",),
        num_computed_tokens=np.zeros(1, np.int64),
        num_new_tokens=np.array([prompt_len], np.int64),
        samples_token=np.ones(1, bool),
        block_tables=(tuple(range(blocks)),),
        token_ids=np.zeros(prompt_len, np.int32),
        block_size=block_size,
    )


def prefill_step_times(cost_model, grid: np.ndarray, block_size: int) -> np.ndarray:
    """Seconds to prefill one prompt of each grid length through the whole pipeline (``step``)."""
    return np.array([cost_model.step(prefill_plan(int(n), block_size)).duration_s for n in grid])


def decode_step_times(cost_model, grid: np.ndarray, context_per_row: float, max_context: int) -> np.ndarray:
    """Seconds of one decode step of ``b`` rows for each grid ``b``, holding ``b · context_per_row``
    KV tokens (``decode_run`` with one step; ``max_context`` for cost models that read it)."""
    return np.array([
        cost_model.decode_run(int(b), int(round(b * context_per_row)), max_context, 1)[0][0] for b in grid
    ])


# -- the jnp model -------------------------------------------------------------------------------
class PrefillTable(NamedTuple):
    """Prefill candidates, C of them: ``step_s[c]`` is ``D`` on the moments' grid."""

    step_s: jax.Array  # [C, G] seconds
    in_flight: jax.Array  # [C] micro-batches that overlap (pp, or 1)
    count: jax.Array  # [C] instances


class DecodeTable(NamedTuple):
    """Decode candidates, C of them: ``step_s[c]`` is ``t(b)`` on ``grid`` (shared, [G] rows)."""

    grid: jax.Array  # [G] batch sizes (rows per micro-batch), increasing, grid[0] = 1
    step_s: jax.Array  # [C, G] seconds
    max_batch: jax.Array  # [C] rows per micro-batch that KV and max_num_seqs allow (>= 1)
    in_flight: jax.Array  # [C]
    count: jax.Array  # [C]


def _prefill_stats(first, second, step_s, in_flight):
    """E[D], E[S], E[S²] of one candidate (S = D / in_flight, the bottleneck stage)."""
    mean_d = first @ step_s
    return mean_d, mean_d / in_flight, (step_s @ second @ step_s) / in_flight**2


def _prefill_ttft_one(first, second, step_s, in_flight, count, rates):
    mean_d, m1, m2 = _prefill_stats(first, second, step_s, in_flight)
    lam = rates / count
    busy = lam * m1
    wait = lam * m2 / (2.0 * jnp.maximum(1.0 - busy, 1e-30))
    return jnp.where(busy < 1.0, mean_d + wait, jnp.inf)


def _prefill_max_rate_one(first, second, step_s, in_flight, count, ttft_s):
    mean_d, m1, m2 = _prefill_stats(first, second, step_s, in_flight)
    slack = ttft_s - mean_d
    lam = 2.0 * slack / (m2 + 2.0 * slack * m1)
    return jnp.where(slack > 0, lam * count, 0.0)


def _decode_rate_of_batch(grid, step_s, in_flight, decode_steps):
    """Per-instance arrival rate that keeps ``in_flight`` micro-batches of each grid size busy,
    made non-decreasing (it is for any step time with a positive intercept) so it can be inverted."""
    return jax.lax.cummax(in_flight * grid / (decode_steps * step_s))


def _decode_tpot_one(grid, step_s, max_batch, in_flight, count, decode_steps, rates):
    rate_of_b = _decode_rate_of_batch(grid, step_s, in_flight, decode_steps)
    cap_rate = in_flight * max_batch / (decode_steps * jnp.interp(max_batch, grid, step_s))
    lam = rates / count
    # On the grid segment whose rates bracket lam, t(b) = base + slope·b; Little's law
    # in_flight·b = lam·n·t(b) then gives b exactly (b is not linear in lam, so no interpolation).
    hi = jnp.clip(jnp.searchsorted(rate_of_b, lam), 1, grid.shape[0] - 1)
    slope = (step_s[hi] - step_s[hi - 1]) / (grid[hi] - grid[hi - 1])
    base = step_s[hi - 1] - slope * grid[hi - 1]
    work = lam * decode_steps
    b = jnp.maximum(work * base / (in_flight - work * slope), grid[0])  # below one row: one row's step
    return jnp.where(lam <= cap_rate, base + slope * b, jnp.inf)


def _decode_max_rate_one(grid, step_s, max_batch, in_flight, count, decode_steps, tpot_s):
    steps = jax.lax.cummax(step_s)  # a step never gets faster with more rows
    b = jnp.minimum(jnp.interp(tpot_s, steps, grid), max_batch)  # largest batch whose step meets the target
    rate = in_flight * b / (decode_steps * jnp.interp(b, grid, step_s))
    return jnp.where(steps[0] <= tpot_s, rate * count, 0.0)


def _over_candidates(fn, table_axes):
    return jax.jit(jax.vmap(fn, in_axes=table_axes))


_prefill_ttft = _over_candidates(_prefill_ttft_one, (None, None, 0, 0, 0, None))
_prefill_max_rate = _over_candidates(_prefill_max_rate_one, (None, None, 0, 0, 0, None))
_decode_tpot = _over_candidates(_decode_tpot_one, (None, 0, 0, 0, 0, None, None))
_decode_max_rate = _over_candidates(_decode_max_rate_one, (None, 0, 0, 0, 0, None, None))


def prefill_ttft(table: PrefillTable, moments: PromptMoments, rates) -> jax.Array:
    """Expected TTFT (s) of each candidate at each total request rate (req/s): [C, R]; inf where the
    queue is unstable."""
    return _prefill_ttft(moments.first, moments.second, *table, jnp.asarray(rates, jnp.float32))


def prefill_max_rate(table: PrefillTable, moments: PromptMoments, ttft_s: float) -> jax.Array:
    """Highest total rate (req/s) whose expected TTFT meets ``ttft_s``: [C]; 0 where no rate does."""
    return _prefill_max_rate(moments.first, moments.second, *table, ttft_s)


def decode_tpot(table: DecodeTable, decode_steps: float, rates) -> jax.Array:
    """Expected TPOT (s) of each candidate at each total request rate (req/s): [C, R]; inf past the
    rate its batch cap sustains."""
    return _decode_tpot(*table, decode_steps, jnp.asarray(rates, jnp.float32))


def decode_max_rate(table: DecodeTable, decode_steps: float, tpot_s: float) -> jax.Array:
    """Highest total rate (req/s) whose expected TPOT meets ``tpot_s`` within the batch cap: [C];
    0 where even one row per step misses it."""
    return _decode_max_rate(*table, decode_steps, tpot_s)
