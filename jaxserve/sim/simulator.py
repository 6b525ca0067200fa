"""Discrete-event simulation of a serving instance driven by any registered scheduler.

Two kinds of events advance a simulated clock (it never sleeps): request arrivals and step
completions. Between steps the replica admits every request that has arrived, asks the scheduler
for a plan, and the executor (a cost model) says how long the step takes; the scheduler is
exactly the object the real engine uses, through the same protocol.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np

from jaxserve.events import EventLog
from jaxserve.kv.config import KVConfig
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import Request
from jaxserve.scheduler.fast_forward import advance_decodes, decode_run_limit, is_stable_decode

SIM_TOKEN_ID = 1  # the simulator samples no real tokens; requests finish on max_new_tokens


class SimExecutor:
    """Executes a BatchPlan on a cost model: the step's modelled duration and energy, and a
    placeholder token for every row that samples."""

    def __init__(self, cost_model):
        self.cost_model = cost_model

    def execute(self, plan: BatchPlan) -> StepOutput:
        cost = self.cost_model.step(plan)
        tokens = np.full(np.count_nonzero(plan.samples_token), SIM_TOKEN_ID, np.int64)
        return StepOutput.for_plan(plan, tokens, duration_s=cost.duration_s, energy_j=cost.energy_j)

    @property
    def can_fast_forward(self) -> bool:
        return hasattr(self.cost_model, "decode_run")

    def decode_run(self, num_rows: int, context_tokens: int, max_context: int, k: int):
        """Durations and energies of k identical-batch decode steps (see RooflineCostModel)."""
        return self.cost_model.decode_run(num_rows, context_tokens, max_context, k)


@dataclasses.dataclass(frozen=True)
class RunLimits:
    max_context: Optional[int] = None  # prompt + max_new_tokens above this are rejected
    max_sim_time_s: float = math.inf  # stop admitting and stepping after this simulated time
    max_steps: int = 50_000_000


def run_replica(
    scheduler,
    kv: KVConfig,
    executor,
    requests: Sequence[Request],
    *,
    limits: RunLimits = RunLimits(),
    on_progress: Optional[Callable[[float, int], None]] = None,
    progress_every: int = 2000,
    fast_forward: bool = True,
    admit: Optional[Callable[[Request], None]] = None,
    on_step: Optional[Callable[[BatchPlan, StepOutput, object], None]] = None,
) -> EventLog:
    """Serves ``requests`` (sorted by arrival_time) on one replica and returns the event log.

    A request longer than ``limits.max_context``, that ``admit`` refuses (raises ``ValueError``) or
    that the scheduler refuses (it could never fit the KV cache or the step budget) is rejected with
    its reason and counted, never dropped silently. ``on_step(plan, out, state)`` sees every step.
    With ``fast_forward``, runs of identical decode steps between events are applied in closed
    form (``scheduler.fast_forward``); the log and final state are exactly the step-by-step ones.
    """
    fast_forward = fast_forward and getattr(executor, "can_fast_forward", False)
    log = EventLog()
    state = scheduler.init(kv)
    order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_time, i))
    nxt, now, steps = 0, 0.0, 0
    while steps < limits.max_steps:
        while nxt < len(order) and requests[order[nxt]].arrival_time <= now:
            req = requests[order[nxt]]
            nxt += 1
            log.add_request(req, req.arrival_time)
            if limits.max_context is not None and req.max_total_tokens > limits.max_context:
                log.reject(req.request_id, f"prompt + max_new_tokens = {req.max_total_tokens} > context {limits.max_context}")
                continue
            try:
                if admit is not None:
                    admit(req)
                state = scheduler.add_request(state, req, now)
            except ValueError as e:
                log.reject(req.request_id, str(e))
        if not state.has_unfinished:
            if nxt == len(order) or now >= limits.max_sim_time_s:
                break
            now = max(now, requests[order[nxt]].arrival_time)  # idle until the next arrival
            continue
        before = state
        state, plan = scheduler.schedule(state, now)
        if plan.is_empty:
            if nxt < len(order):  # nothing fits until more work arrives
                now = max(now, requests[order[nxt]].arrival_time)
                continue
            raise RuntimeError(
                f"scheduler {type(scheduler).__name__} planned an empty step with "
                f"{state.num_waiting} waiting and {state.num_running} running requests and no more arrivals"
            )
        out = executor.execute(plan)
        start, now = now, now + out.duration_s
        state = scheduler.update(state, plan, out, now)
        log.step(plan, start, out.duration_s, out.energy_j, state, [f.request_id for f in state.finished])
        if on_step is not None:
            on_step(plan, out, state)
        steps += 1
        next_arrival = requests[order[nxt]].arrival_time if nxt < len(order) else math.inf
        if fast_forward and not state.finished and now < next_arrival and now < limits.max_sim_time_s:
            if is_stable_decode(scheduler, before, plan):
                now, skipped = _skip_decodes(scheduler, executor, log, state, now, next_arrival, limits, steps)
                if skipped:
                    state = skipped[0]
                    if on_progress is not None and (steps // progress_every) != ((steps + skipped[1]) // progress_every):
                        on_progress(now, steps + skipped[1])
                    steps += skipped[1]
        if on_progress is not None and steps % progress_every == 0:
            on_progress(now, steps)
        if now >= limits.max_sim_time_s:
            break
    return log


def _skip_decodes(scheduler, executor, log, state, now, next_arrival, limits, steps):
    """Applies the longest run of identical decode steps that no event interrupts: no arrival is
    due before a step's schedule, no request finishes, no block runs out, no limit is hit."""
    k = min(decode_run_limit(state), limits.max_steps - steps)
    if k < 1:
        return now, None
    run = state.running
    durations, energies = executor.decode_run(len(run), int(run.num_computed.sum()), int(run.num_computed.max()), k)
    ends = now + np.cumsum(durations)  # only to find the cut; the log recomputes them sequentially
    # step j is scheduled at end_{j-1} (end_0 = now): it runs only if nothing is due by then
    k = min(k, 1 + int(np.searchsorted(ends, min(next_arrival, limits.max_sim_time_s), side="left")))
    durations, energies = durations[:k], energies[:k]
    new_state, used_after = advance_decodes(state, k, SIM_TOKEN_ID)
    ends = log.decode_run(run.ids, now, durations, energies, new_state, used_after / state.kv.config.num_blocks)
    return float(ends[-1]), (new_state, k)
