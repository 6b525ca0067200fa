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

from jaxserve.events import EventLog
from jaxserve.kv.config import KVConfig
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import Request

SIM_TOKEN_ID = 1  # the simulator samples no real tokens; requests finish on max_new_tokens


class SimExecutor:
    """Executes a BatchPlan on a cost model: the step's modelled duration and energy, and a
    placeholder token for every row that samples."""

    def __init__(self, cost_model):
        self.cost_model = cost_model

    def execute(self, plan: BatchPlan) -> StepOutput:
        cost = self.cost_model.step(plan)
        tokens = {rid: SIM_TOKEN_ID for rid, s in zip(plan.request_ids, plan.samples_token.tolist()) if s}
        return StepOutput(tokens, duration_s=cost.duration_s, energy_j=cost.energy_j)


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
) -> EventLog:
    """Serves ``requests`` (sorted by arrival_time) on one replica and returns the event log.

    A request longer than ``limits.max_context`` or that the scheduler refuses (it could never fit
    the KV cache or the step budget) is rejected and counted, never dropped silently.
    """
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
                state = scheduler.add_request(state, req, now)
            except ValueError as e:
                log.reject(req.request_id, str(e))
        if not state.has_unfinished:
            if nxt == len(order) or now >= limits.max_sim_time_s:
                break
            now = max(now, requests[order[nxt]].arrival_time)  # idle until the next arrival
            continue
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
        steps += 1
        if on_progress is not None and steps % progress_every == 0:
            on_progress(now, steps)
        if now >= limits.max_sim_time_s:
            break
    return log
