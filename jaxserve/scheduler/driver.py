"""A minimal synchronous driver: add arrivals -> schedule -> (fake) execute -> update.

It runs a scheduler without a model or a clock model: each step takes one unit of time and every
sampled token comes from ``token_fn``. Tests, demos and the scheduler benchmark use it; the
simulator and the engine run the same loop with real step times and real tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np

from jaxserve.kv.config import KVConfig
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import Request
from jaxserve.scheduler.seq import FinishedRequest

TokenFn = Callable[[str, int], int]  # (request_id, index of the token being sampled) -> token id


def constant_token(token_id: int = 1) -> TokenFn:
    return lambda request_id, index: token_id


@dataclasses.dataclass(frozen=True)
class StepRecord:
    before: object  # state before schedule()
    scheduled: object  # state returned by schedule()
    plan: BatchPlan
    pre_update: object  # state given to update() (after any aborts)
    out: StepOutput
    after: object  # state returned by update()


@dataclasses.dataclass
class DriveResult:
    plans: list[BatchPlan]
    finished: dict[str, FinishedRequest]
    num_steps: int
    final_state: object


OUTPUT_FORMS = ("array", "mapping", "alternate")


def step_output(plan: BatchPlan, token_fn: TokenFn, generated: dict[str, int], form: str = "array") -> StepOutput:
    """Tokens for every sampling row of ``plan``; ``generated`` counts tokens per request so far.
    ``form`` "array" builds them as executors do (``StepOutput.for_plan``), "mapping" as a dict."""
    tokens = {}
    for rid, samples in zip(plan.request_ids, plan.samples_token.tolist()):
        if samples:
            tokens[rid] = token_fn(rid, generated.get(rid, 0))
    if form == "array":
        return StepOutput.for_plan(plan, np.fromiter(tokens.values(), np.int64, len(tokens)))
    return StepOutput(tokens)


def drive(
    scheduler,
    kv: KVConfig,
    requests: Sequence[Request],
    token_fn: TokenFn = constant_token(),
    *,
    arrival_steps: Optional[Sequence[int]] = None,
    aborts: Optional[dict[int, Sequence[str]]] = None,
    max_steps: int = 100_000,
    keep_plans: bool = True,
    on_step: Optional[Callable] = None,
    output_form: str = "array",
) -> DriveResult:
    """Runs until every request finished or was aborted (or ``max_steps``).

    ``arrival_steps[i]`` is the step before which ``requests[i]`` is added (default: all at 0);
    ``aborts[step]`` lists request ids aborted right after that step's ``schedule``.
    ``on_step(StepRecord)`` sees every step (the states around it, the plan and the output).
    ``output_form`` is how outputs are handed over: "array", "mapping", or "alternate" (array on
    even steps, mapping on odd ones: tests cover both paths of ``update``).
    """
    if output_form not in OUTPUT_FORMS:
        raise ValueError(f"drive: output_form must be one of {OUTPUT_FORMS}, got {output_form!r}")
    arrival_steps = list(arrival_steps) if arrival_steps is not None else [0] * len(requests)
    pending = sorted(range(len(requests)), key=lambda i: (arrival_steps[i], i))
    aborts = aborts or {}
    state = scheduler.init(kv)
    plans, finished, generated = [], {}, {}
    nxt = 0
    step = 0
    while step < max_steps:
        while nxt < len(pending) and arrival_steps[pending[nxt]] <= step:
            state = scheduler.add_request(state, requests[pending[nxt]], float(step))
            nxt += 1
        if nxt == len(pending) and not state.has_unfinished:
            break
        before = state
        state, plan = scheduler.schedule(state, float(step))
        scheduled = state
        for rid in aborts.get(step, ()):
            state = scheduler.abort(state, rid, float(step))
        pre_update = state
        form = output_form if output_form != "alternate" else ("array", "mapping")[step % 2]
        out = step_output(plan, token_fn, generated, form)
        state = scheduler.update(state, plan, out, float(step))
        for rid in out.token_ids:
            generated[rid] = generated.get(rid, 0) + 1
        for f in state.finished:
            finished[f.request_id] = f
        if keep_plans:
            plans.append(plan)
        if on_step is not None:
            on_step(StepRecord(before, scheduled, plan, pre_update, out, state))
        step += 1
    return DriveResult(plans, finished, step, state)
