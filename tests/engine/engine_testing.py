"""Helpers of the engine tests: a step loop over a real ModelRunner that records what happened.

``run_steps`` is ``scheduler.driver.drive`` with the runner as the executor: requests arrive before
given steps (so a test controls exactly who shares a batch), every plan is validated, and the
result keeps each request's tokens, the plans, the bucket shapes that ran and, with
``with_logits``, the float32 logits of every position each request computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from jaxserve.engine.packing import PackSpec
from jaxserve.kv.config import KVConfig
from jaxserve.plan import BatchPlan
from jaxserve.request import Request, SamplingParams

VOCAB = 96  # tests/model/hf_checkpoints.py
RUNNER_KV = KVConfig(num_blocks=64, block_size=4, num_host_blocks=16)
MAX_ROWS = 2  # decode rows and prefill blocks per step most scenarios stay within


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def prompt(seed: int, n: int) -> list[int]:
    """A reproducible prompt of ``n`` ids in ``[3, VOCAB)`` (clear of bos/eos/pad)."""
    return np.random.default_rng(seed).integers(3, VOCAB, size=n).tolist()


def request(rid: str, ids, sampling: SamplingParams, **kw) -> Request:
    return Request(rid, prompt_token_ids=list(ids), sampling=sampling, **kw)


@dataclasses.dataclass
class StepTrace:
    tokens: dict[str, tuple[int, ...]]  # request id -> generated ids
    finished: dict  # request id -> FinishedRequest
    plans: list[BatchPlan]
    shapes: set  # (decode rows, prefill blocks) buckets that ran
    logits: dict[str, dict[int, np.ndarray]]  # request id -> position -> logits (last computation)

    def logits_matrix(self, rid: str) -> np.ndarray:
        """``[positions, vocab]``: the logits of positions 0..n-1 of ``rid`` (every one computed)."""
        rows = self.logits[rid]
        assert sorted(rows) == list(range(len(rows))), f"{rid}: positions {sorted(rows)} not contiguous"
        return np.stack([rows[p] for p in range(len(rows))])

    def rows_of(self, rid: str) -> list[tuple[int, int]]:
        """``(num_computed_tokens, num_new_tokens)`` of every plan row of ``rid``, in step order."""
        out = []
        for p in self.plans:
            if rid in p.request_ids:
                i = p.request_ids.index(rid)
                out.append((int(p.num_computed_tokens[i]), int(p.num_new_tokens[i])))
        return out


@contextlib.contextmanager
def step_compiles():
    """Collects jax's "Compiling jit(_step_fn) ..." messages: one per compile request of a runner
    step (persistent-cache hits included), whether or not the function was traced again."""
    import jax

    found = []

    class Handler(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Compiling jit(_step_fn)"):
                found.append(message)

    handler = Handler()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield found
    finally:
        logger.removeHandler(handler)


def rows_plan(rows, prompts: dict, step: int, block_size: int = RUNNER_KV.block_size) -> BatchPlan:
    """A plan whose every row samples; ``rows``: ``(request id, tokens in KV, new tokens, block
    table)`` (the table cut to the pages the row's tokens reach), new tokens from ``prompts[id]``."""
    return BatchPlan(
        request_ids=tuple(r[0] for r in rows),
        num_computed_tokens=np.array([r[1] for r in rows], np.int64),
        num_new_tokens=np.array([r[2] for r in rows], np.int64),
        samples_token=np.ones(len(rows), bool),
        block_tables=tuple(table[: -(-(c + n) // block_size)] for _, c, n, table in rows),
        token_ids=np.array([t for rid, c, n, _ in rows for t in prompts[rid][c : c + n]], np.int32),
        block_size=block_size,
        step=step,
    )


def shape_of(plan: BatchPlan, block_rows: int) -> tuple[int, int]:
    """The bucket ``(num_decode_rows, num_blocks)`` that ``packing.pack`` gives ``plan``."""
    n = plan.num_new_tokens.tolist()
    spec = PackSpec(num_pages=1, page_size=1, pages_per_seq=1, block_rows=block_rows)
    return spec.shape(sum(1 for k in n if k == 1), sum(-(-k // block_rows) for k in n if k > 1))


def run_steps(
    runner,
    scheduler,
    kv: KVConfig,
    requests: Sequence[Request],
    *,
    arrival_steps: Sequence[int] | None = None,
    with_logits: bool = False,
    max_steps: int = 2000,
) -> StepTrace:
    """Serves ``requests`` on ``runner``; ``requests[i]`` is added before step ``arrival_steps[i]``
    (default 0). Fails if a request is left unfinished."""
    arrival_steps = list(arrival_steps) if arrival_steps is not None else [0] * len(requests)
    pending = sorted(range(len(requests)), key=lambda i: (arrival_steps[i], i))
    state = scheduler.init(kv)
    trace = StepTrace({}, {}, [], set(), {r.request_id: {} for r in requests})
    nxt = step = 0
    try:
        while step < max_steps:
            while nxt < len(pending) and arrival_steps[pending[nxt]] <= step:
                req = requests[pending[nxt]]
                runner.register(req)
                state = scheduler.add_request(state, req, float(step))
                nxt += 1
            if nxt == len(pending) and not state.has_unfinished:
                break
            state, plan = scheduler.schedule(state, float(step))
            plan.validate()
            if plan.is_empty:
                assert nxt < len(pending), f"empty plan at step {step} with nothing left to arrive"
            trace.plans.append(plan)
            if with_logits:
                out, logits = runner.execute_with_logits(plan)
                for rid, c, n in zip(plan.request_ids, plan.num_computed_tokens.tolist(), plan.num_new_tokens.tolist()):
                    assert logits[rid].shape == (n, runner.cfg.vocab_size)
                    for j in range(n):
                        trace.logits[rid][c + j] = logits[rid][j]
            else:
                out = runner.execute(plan)
            if not plan.is_empty:
                trace.shapes.add(shape_of(plan, runner.spec.block_rows))
            state = scheduler.update(state, plan, out, float(step))
            for f in state.finished:
                trace.finished[f.request_id] = f
                trace.tokens[f.request_id] = f.output_token_ids
                runner.release(f.request_id)
            step += 1
    finally:
        for r in requests:
            runner.release(r.request_id)
    missing = [r.request_id for r in requests if r.request_id not in trace.finished]
    assert not missing, f"unfinished after {step} steps: {missing}"
    return trace


def hf_sequence_logits(model, req: Request, output: Sequence[int]) -> np.ndarray:
    """transformers logits of every position the engine computed for ``req``: prompt + all but the
    last generated token."""
    from hf_checkpoints import hf_logits

    return hf_logits(model, list(req.prompt_token_ids) + list(output[:-1]))
