"""Hand-built BatchPlans for a step shape, and one timed sample of such a plan on a runner.

Shared by the profiler and the speed probe, so both sample a step the same way.
"""

from __future__ import annotations

import numpy as np

from jaxserve.calibration.profile_format import PointSpec
from jaxserve.plan import BatchPlan
from jaxserve.request import Request, SamplingParams


def build_plan(
    spec: PointSpec, block_size: int, vocab_size: int, num_pages: int, rng, temperature: float = 1.0,
    *, first_page: int = 0, id_prefix: str = "",
):  # fmt: skip
    """``(BatchPlan, requests)``: the step ``spec`` describes, every row sampling (a prefill row is
    its prompt's last chunk) at ``temperature``, with the requests to ``register`` on the runner.
    Rows get distinct pages drawn at random from ``[first_page, num_pages)``, as a pool in steady
    state hands them out (contents do not matter for timing; where the pages lie does, a little);
    request ids start with ``id_prefix``."""
    rows = [(f"{id_prefix}dec{i}", c, 1) for i, c in enumerate(spec.decode)]
    rows += [(f"{id_prefix}pre{j}", c, n) for j, (c, n) in enumerate(spec.prefill)]
    needed = spec.blocks_needed(block_size)
    if needed > num_pages - first_page:
        raise ValueError(f"{spec.describe()} needs {needed} KV pages, the pool has {num_pages - first_page}")
    pages = (first_page + rng.choice(num_pages - first_page, size=needed, replace=False)).tolist()
    requests, tables, tokens = [], [], []
    for rid, c, n in rows:
        decode = n == 1
        prompt_len = c if decode else c + n  # a decode samples generated token 1; a chunk token 0
        ids = rng.integers(0, vocab_size, size=prompt_len).tolist()
        sampling = SamplingParams(2 if decode else 1, temperature=temperature)
        requests.append(Request(rid, prompt_token_ids=ids, sampling=sampling))
        k = -(-(c + n) // block_size)
        tables.append(tuple(pages[:k]))
        pages = pages[k:]
        tokens.append(rng.integers(0, vocab_size, size=n))
    plan = BatchPlan(
        request_ids=tuple(r for r, _, _ in rows),
        num_computed_tokens=np.array([c for _, c, _ in rows], np.int64),
        num_new_tokens=np.array([n for _, _, n in rows], np.int64),
        samples_token=np.ones(len(rows), bool),
        block_tables=tuple(tables),
        token_ids=np.concatenate(tokens).astype(np.int32),
        block_size=block_size,
    )
    plan.validate()
    return plan, requests



def time_step(runner, spec: PointSpec, plan, requests, *, warmup: int, first_visit: bool) -> float:
    """One timed sample of ``plan`` (built from ``spec`` by ``build_plan``) on ``runner``, in the
    profile's serving-like context: a first visit compiles the shape (``warmup`` untimed runs); a
    decode-only step runs right after its own batch's previous step in serving, so its samples
    follow ``warmup`` runs of itself; a step with prefill rows follows steps of other shapes, so its
    samples follow whatever ran last. The requests are registered for the sample only."""
    for r in requests:
        runner.register(r)
    try:
        if first_visit or not spec.prefill:
            for _ in range(warmup):
                runner.execute(plan)
        return runner.execute(plan).duration_s
    finally:
        for r in requests:
            runner.release(r.request_id)
