"""One serving replica: a scheduler, its KV, an executor and a clock, stepped from outside.

``Replica`` is the loop's unit (add arrivals -> schedule -> execute -> update -> log). It never
reads a global clock or an arrival list: a driver hands it requests (``add``) and asks it to
take its next step (``step``) when ``next_event_time`` is the earliest event it knows of.
``run_replica`` is that driver for one replica and a list of arrivals; a cluster drives many
replicas, each with its own executor, from one event clock in the same way.

Clock: ``now`` is when the replica can schedule its next step (the end of its last step). An
idle replica's clock jumps to the arrival of its next request: simulated time never sleeps,
and the engine's measured-time clock skips idle gaps the same way.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional

import numpy as np

from jaxserve.kv.config import KVConfig
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import Request
from jaxserve.runtime.events import EventLog
from jaxserve.runtime.executor import DecodeRun, Executor
from jaxserve.runtime.limits import RunLimits
from jaxserve.scheduler.fast_forward import (
    apply_decode_run, blocks_in_use_after, is_stable_decode, next_is_stable_decode, run_bounds,
)
from jaxserve.scheduler.prefill_runs import PrefillRun, apply_prefill_run, prefill_run, prefill_run_plan

StepHook = Callable[[BatchPlan, StepOutput, object], None]
_NO_TOKENS = np.zeros(0, np.int64)


class Progress(NamedTuple):
    """How far a run is: its clock (s), steps taken, requests done (finished or rejected) of all."""

    now: float
    num_steps: int
    num_done: int
    num_requests: int

    @property
    def fraction(self) -> float:
        return self.num_done / self.num_requests if self.num_requests else 1.0


ProgressHook = Callable[[Progress], None]


class Replica:
    """A scheduler (pure; its state is ``self.state``) driving ``executor`` over ``kv``.

    ``admit(request)`` may refuse a request by raising ``ValueError`` (an engine refuses ids it
    cannot serve); ``on_step(plan, out, state)`` sees every executed step. A driver that only needs
    to know which requests start and finish uses ``on_plan(plan)`` (every plan run one by one: closed-
    form runs start no request) and ``on_finished(finished)`` (every step, runs included) instead,
    which leaves runs free to end with a finishing step. With ``fast_forward``, runs of steps known
    from the state (identical decode steps, or those that finish a chunked prefill: see
    docs/architecture.md, "Fast path") before ``step``'s horizon are applied in closed form when
    the executor offers one (``Executor.decode_run``, ``step_cost``); the log and state equal the
    step-by-step ones.
    Replicas of a cluster share one ``log`` (each step tagged with ``index``); a request already in
    it (retried after a fault elsewhere, or registered when it reached the router) keeps its entry.
    """

    def __init__(
        self,
        scheduler,
        kv: KVConfig,
        executor: Executor,
        *,
        limits: RunLimits = RunLimits(),
        admit: Optional[Callable[[Request], None]] = None,
        on_step: Optional[StepHook] = None,
        fast_forward: bool = True,
        log: Optional[EventLog] = None,
        index: int = 0,
        on_plan: Optional[Callable[[BatchPlan], None]] = None,
        on_finished: Optional[Callable[[tuple], None]] = None,
    ):
        self.scheduler = scheduler
        self.index = index  # which replica of a cluster (the log's step_replica)
        self.executor = executor
        self.limits = limits
        self.state = scheduler.init(kv)
        self.log = EventLog() if log is None else log
        self.now = 0.0
        self.num_steps = 0
        self._admit = admit
        self._on_step = on_step
        self._on_plan = on_plan
        self._on_finished = on_finished
        self._fast_forward = fast_forward
        self._blocked = False  # the last schedule planned nothing: wait for new work
        # A cluster defers closed-form runs: held pending, cut (``settle``) only if the replica is
        # read or changed before the run ends — not at every arrival anywhere in the cluster.
        self.defer_runs = False
        # A driver that adds requests in time order, each as soon as it reaches the replica
        # (run_replica, a cluster placing arrivals), and cuts a pending run before anything else
        # touches the replica, may let a decode run go on through arrivals that cannot change it:
        # the queue's head is blocked and stays so, and an arrival queues behind it (``add`` then
        # joins it to the run); the run ignores ``step``'s horizon.
        self.runs_span_arrivals = False
        self._pending: Optional[PendingRun] = None

    # -- what a driver asks -----------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return self.state.has_unfinished

    @property
    def is_blocked(self) -> bool:
        """Work is queued but nothing can be scheduled until more requests arrive."""
        return self._blocked and self.state.has_unfinished

    @property
    def next_event_time(self) -> float:
        """When this replica next steps: ``now`` while it has schedulable work, else infinity."""
        if not self.state.has_unfinished or self._blocked or self.num_steps >= self.limits.max_steps:
            return math.inf
        return self.now

    # -- what a driver does -----------------------------------------------------------------------
    def add(self, request: Request, at: Optional[float] = None) -> bool:
        """Hands over a request that has arrived (``arrival_time <= now``, or the replica is idle
        and its clock jumps to it); ``at``: when it reaches this replica, if later than its arrival
        (a cluster's router held it). Returns False if it was rejected: over ``limits.max_context``,
        refused by ``admit`` or by the scheduler; the log keeps the reason."""
        t = request.arrival_time if at is None else at
        if self._pending is not None:
            if not self._pending.spans_arrivals:
                raise RuntimeError("add() with a run pending: settle() it at the arrival's time first")
            return self._add_during_run(request, self._pending, t)
        self.now = max(self.now, t)
        self._blocked = False
        log, rid = self.log, request.request_id
        if rid not in log.index:
            log.add_request(request, request.arrival_time)
        max_context = self.limits.max_context
        if max_context is not None and request.max_total_tokens > max_context:
            log.reject(rid, f"prompt + max_new_tokens = {request.max_total_tokens} > context {max_context}")
            return False
        try:
            if self._admit is not None:
                self._admit(request)
            self.state = self.scheduler.add_request(self.state, request, self.now)
        except ValueError as e:
            log.reject(rid, str(e))
            return False
        return True

    def _add_during_run(self, request: Request, run: "PendingRun", t: float) -> bool:
        """``add`` at ``t`` while a run that spans arrivals is pending: the request joins the state
        the run started from, at the end of the step it arrives in, as stepping would add it then,
        when it cannot change the run (it is rejected, or it queues behind the blocked head);
        otherwise the run is cut at its arrival first."""
        if self._admit is not None or t > run.ends[-1]:
            self.settle(t)
            return self.add(request, t)
        state, log, rid, reason = self.state, self.log, request.request_id, None
        max_context = self.limits.max_context
        if max_context is not None and request.max_total_tokens > max_context:
            reason = f"prompt + max_new_tokens = {request.max_total_tokens} > context {max_context}"
        else:
            try:
                state = self.scheduler.add_request(state, request, run.ends[bisect.bisect_left(run.ends, t)])
            except ValueError as e:
                reason = str(e)
            order = self.scheduler.order
            if reason is None and order.peek(state.waiting).request_id != order.peek(self.state.waiting).request_id:
                self.settle(t)  # it would be served first: the run ends with the step it arrives in
                return self.add(request, t)
        if rid not in log.index:
            log.add_request(request, t)
        if reason is not None:
            log.reject(rid, reason)
            return False
        self.state = state
        self._pending = run._replace(before=state, arrivals=run.arrivals + (t,))
        return True

    def replace_state(self, state) -> None:
        """Installs a scheduler state changed from outside between steps (a request migrated in or
        out); the replica looks for work again."""
        if state.inflight is not None:
            raise ValueError("replace_state() needs a state between steps (no plan in flight)")
        if self._pending is not None:
            raise RuntimeError("replace_state() with a run pending: settle() it first")
        self.state = state
        self._blocked = False

    def wait_until(self, t: float) -> None:
        """An idle replica's clock moves to ``t`` (never backwards)."""
        self.now = max(self.now, t)

    def step(self, horizon: float = math.inf) -> int:
        """Schedules, executes and applies one step at ``now``. With the fast path, when that step
        is a stable decode (or continues the one chunked prefill, the rest decoding), it and the
        steps like it after it that start before ``horizon`` (the next event the driver knows of)
        are applied in closed form instead (they start no request, only the last may finish some,
        and then only without ``on_step``, which does not see them). Returns the number of
        steps taken: 0 if the scheduler planned nothing (the replica is then blocked until ``add``)."""
        self.settle()
        scheduler, before = self.scheduler, self.state
        stable = next_is_stable_decode(scheduler, before) if self._fast_forward else False
        if stable:
            # A run from ``before``, told without scheduling (the policy's dry run); 0 when none
            # can be (a row finishes now, or the executor has no closed form): then step as planned.
            k = self._decode_run(before, min(horizon, self.limits.max_sim_time_s))
            if k:
                return k
        elif self._fast_forward and self._on_step is None:
            run = prefill_run(scheduler, before)  # the steps that finish a chunked prefill, if any
            if run is not None:
                k = self._prefill_run(before, run, min(horizon, self.limits.max_sim_time_s))
                if k:
                    return k
        state, plan = scheduler.schedule(before, self.now)
        if plan.is_empty:
            # Nothing runs, but scheduling may have changed the state (a preemption): keep it,
            # its step closed by an empty update so a driver may change it before the next one.
            self.state = scheduler.update(state, plan, StepOutput.for_plan(plan, _NO_TOKENS), self.now)
            self._blocked = True
            return 0
        if stable is None and is_stable_decode(scheduler, before, plan):
            # This step and the identical ones after it, in closed form from ``before`` (the
            # scheduled state is dropped: schedule is pure); 0 when none can be (a row finishes
            # now, or the executor has no closed form): then the step runs as planned.
            k = self._decode_run(before, min(horizon, self.limits.max_sim_time_s))
            if k:
                return k
        self.state = state
        try:
            out = self.executor.execute(plan)
        except BaseException:
            self.state = before  # the step never happened: a driver may carry its requests on
            raise
        start = self.now
        self.now = start + out.duration_s
        self.state = state = scheduler.update(state, plan, out, self.now)
        self.log.step(plan, start, out.duration_s, out.energy_j, state, state.finished, self.index)
        if self._on_plan is not None:
            self._on_plan(plan)
        if self._on_finished is not None and state.finished:
            self._on_finished(state.finished)
        if self._on_step is not None:
            self._on_step(plan, out, state)
        self.num_steps += 1
        return 1

    def _decode_run(self, state, horizon: float) -> int:
        """Applies, from ``state`` (whose next plan is a stable decode), the longest run of
        identical decode steps that nothing interrupts: the first runs now, each later one starts
        before ``horizon``, none runs out of blocks, no limit is hit, and only the last may finish
        requests. Returns how many (0: none, the caller steps normally). With ``defer_runs`` the
        run is held pending instead (``settle``)."""
        # The run may end with the step at which requests finish (retired as update would), unless
        # a driver watches every step that starts or finishes a request (``on_step``).
        k, finishes = run_bounds(state, finish=self._on_step is None)
        spans = self.runs_span_arrivals and state.num_waiting > 0
        if spans:  # (the queue's head is blocked: the policy's dry run said so) arrivals cannot cut it
            horizon = self.limits.max_sim_time_s
        if k > self.limits.max_steps - self.num_steps:
            k, finishes = self.limits.max_steps - self.num_steps, False
        if k < 1:
            return 0
        computed = state.running.num_computed
        closed = self.executor.decode_run(
            len(computed), int(np.add.reduce(computed)), int(np.maximum.reduce(computed)), k
        )  # fmt: skip
        if closed is None:
            return 0
        # End times summed in order, as the log sums them: a run cut at j and continued from there
        # has bitwise the same end times as the uncut run, so deferring changes nothing.
        ends = list(itertools.accumulate(closed.durations_s.tolist(), initial=self.now))[1:]
        # step j is scheduled at end_{j-1} (end_0 = now): it runs only if nothing is due by then
        cut = 1 + bisect.bisect_left(ends, horizon)
        if cut < k:
            k, finishes, ends = cut, False, ends[:cut]
        return self._take_run(PendingRun(state, self.now, ends, closed, finishes, self.num_steps, spans), k)

    def _take_run(self, pending: "PendingRun", k: int) -> int:
        """Holds the ``k``-step run ``pending`` (deferred, or joined by arrivals) or applies it; ``k``."""
        if (self.defer_runs or pending.spans_arrivals) and k > 1:
            self._pending = pending
            self.now = pending.ends[-1]
            self.num_steps += k
            return k
        self._apply_run(pending, k)
        return k

    def _apply_run(self, run: "PendingRun", k: int) -> None:
        """Applies the first ``k`` steps of ``run`` (all of them, or a cut: then none finishes)."""
        if run.prefill is not None:
            self._apply_prefill_steps(run, k)
            return
        state, closed = run.before, run.closed
        finishes = run.finishes and k == len(run.ends)
        new_state, used_after = apply_decode_run(state, k, closed.token_id, finishes)
        finished = new_state.finished
        ends = run.ends if k == len(run.ends) else run.ends[:k]
        waiting = None  # (the state's queue after every step)
        if run.arrivals:  # requests that joined during the run count from the step after they arrived
            base = state.num_waiting - len(run.arrivals)
            waiting = [base + bisect.bisect_right(run.arrivals, start) for start in [run.start] + ends[:-1]]
        self.log.decode_run(
            state.running.ids, ends, closed.durations_s[:k], closed.energies_j[:k], new_state,
            used_after / state.kv.config.num_blocks, self.index, finished, waiting,
        )  # fmt: skip
        self.state, self.now = new_state, ends[-1]
        self.num_steps = run.num_steps + k
        if finished and self._on_finished is not None:
            self._on_finished(finished)

    def _prefill_run(self, state, run: PrefillRun, horizon: float) -> int:
        """Takes, from ``state``, the steps of ``run`` that start before ``horizon`` (the first
        always) within the step limit, each costed by the executor without running it. Returns how
        many (0: the executor must run steps, the caller steps normally). With ``defer_runs`` they
        are held pending (``settle``), as decode runs are. Without ``on_plan`` (nobody looks at the
        plans) and with an executor that costs the run in closed form, no plan is built."""
        limit = min(len(run.chunks), self.limits.max_steps - self.num_steps)
        closed = None
        if self._on_plan is None and limit > 0:
            computed = state.running.num_computed
            prefill_context = computed.item(run.row)
            closed = self.executor.prefill_run(len(computed), int(np.add.reduce(computed)) - prefill_context, prefill_context,
                                               run.chunks[:limit], run.completes and limit == len(run.chunks))  # fmt: skip
        if closed is not None:
            durations = closed.durations_s.tolist()
            ends = list(itertools.accumulate(durations, initial=self.now))[1:]  # summed in order, as the log sums
            k = min(limit, 1 + bisect.bisect_left(ends, horizon))  # step j starts when step j - 1 ends
            costs = tuple(zip(durations[:k], closed.energies_j[:k].tolist()))
            pending = PendingRun(state, self.now, ends[:k], None, run.finishes and k == len(run.chunks), self.num_steps,
                                 prefill=PrefillSteps(run, None, costs, closed.token_id))  # fmt: skip
            return self._take_run(pending, k)
        peeked = state.kv.device.peek(run.num_blocks)
        tables, used = list(state.running.block_tables), 0
        plans, costs, ends, token = [], [], [], None
        for j in range(min(len(run.chunks), self.limits.max_steps - self.num_steps)):
            if j and ends[-1] >= horizon:  # step j starts when step j - 1 ends
                break
            for r in run.blocks[j]:
                tables[r] += (peeked[used],)
                used += 1
            plan = prefill_run_plan(state, run, j, tuple(tables), token)
            cost = self.executor.step_cost(plan)
            if cost is None or (token is not None and cost[2] != token):
                return 0  # no closed form (or a different token per step: the run assumes one)
            duration, energy, token = cost
            plans.append(plan)
            costs.append((duration, energy))
            ends.append((ends[-1] if ends else self.now) + duration)  # summed in order, as the log sums
        k = len(plans)
        if not k:
            return 0
        pending = PendingRun(state, self.now, ends, None, run.finishes and k == len(run.chunks), self.num_steps,
                             prefill=PrefillSteps(run, tuple(plans), tuple(costs), token))  # fmt: skip
        return self._take_run(pending, k)

    def _apply_prefill_steps(self, run: "PendingRun", k: int) -> None:
        """Applies the first ``k`` steps of the pending prefill run ``run`` and logs them; ``on_plan``
        sees their plans (they start no request) when they were built."""
        state, steps = run.before, run.prefill
        new_state, used_after = apply_prefill_run(state, steps.run, k, steps.token)
        finished, num_blocks = new_state.finished, state.kv.config.num_blocks
        waiting, running = state.num_waiting, state.num_running
        if steps.plans is None:  # costed in closed form (nobody asked for plans): logged without them
            pr = steps.run
            self.log.prefill_run(
                state.running.ids, pr.row, pr.chunks[:k], pr.completes and k == len(pr.chunks), run.start,
                run.ends[:k], steps.costs[:k], waiting, running, (used_after / num_blocks).tolist(), finished, self.index,
            )  # fmt: skip
        else:
            start = run.start
            for j, (plan, (duration, energy), used_blocks) in enumerate(zip(steps.plans, steps.costs, used_after.tolist())):
                last = j == k - 1
                self.log.record(plan, start, duration, energy, waiting, running - len(finished) * last,
                                used_blocks / num_blocks, finished if last else (), self.index)  # fmt: skip
                if self._on_plan is not None:
                    self._on_plan(plan)
                start = run.ends[j]
        self.state, self.now = new_state, run.ends[k - 1]
        self.num_steps = run.num_steps + k
        if finished and self._on_finished is not None:
            self._on_finished(finished)

    # -- deferred runs (a cluster's replicas) ------------------------------------------------------
    def steps_started_by(self, t: float) -> int:
        """Of the pending run, the steps that start before ``t`` (0 without one)."""
        return 0 if self._pending is None else self._pending.started_by(t)

    def pending_view(self, t: float):
        """``(state before the run, KV blocks in use)`` as of ``t`` while a run is pending and its
        last step has not started by ``t`` (queues are constant in a run: only blocks grow); None
        otherwise (``settle`` first, then read ``state``)."""
        run = self._pending
        if run is None:
            return None
        j = self.steps_started_by(t)
        if j >= len(run.ends):
            return None
        if run.prefill is not None:
            return run.before, run.before.kv.device.num_used + sum(map(len, run.prefill.run.blocks[:j]))
        return run.before, blocks_in_use_after(run.before, j)

    def settle(self, t: float = math.inf) -> None:
        """Applies the pending run's steps that start before ``t`` (all of them by default): the
        replica is then as if its run had been cut at ``t``, so a driver may read or change it."""
        run = self._pending
        if run is None:
            return
        self._pending = None
        self._apply_run(run, run.started_by(t))

    @property
    def pending_last_start(self) -> Optional[float]:
        """When the last step of a pending run that spans arrivals starts; None without one."""
        run = self._pending
        if run is None or not run.spans_arrivals:
            return None
        return run.ends[-2] if len(run.ends) > 1 else run.start

    @property
    def has_pending_run(self) -> bool:
        return self._pending is not None

    @property
    def pending_run(self) -> Optional["PendingRun"]:
        """The pending run itself (None without one): a new object whenever it changes."""
        return self._pending

    def pending_step_start(self, j: int) -> float:
        """When step ``j`` (from 0) of the pending run starts: ``steps_started_by(t)`` is ``j``
        for every ``t`` after the start of step ``j - 1`` up to this time."""
        run = self._pending
        return run.start if j == 0 else run.ends[j - 1]

    @property
    def pending_run_length(self) -> int:
        return 0 if self._pending is None else len(self._pending.ends)


class PrefillSteps(NamedTuple):
    """A prefill run's steps as the replica took them: their plans, (duration, energy) and the
    token every sampling row sampled."""

    run: PrefillRun
    plans: Optional[tuple[BatchPlan, ...]]  # None: costed in closed form (``Executor.prefill_run``)
    costs: tuple[tuple[float, float], ...]
    token: int


class PendingRun(NamedTuple):
    """A closed-form run computed but not yet applied (``Replica.defer_runs``): a decode run, or
    with ``prefill`` the steps that finish a chunked prefill."""

    before: object  # the scheduler state at its first step
    start: float  # its first step's start (s)
    ends: list[float]  # its k steps' end times, summed in order as the log sums them
    closed: Optional[DecodeRun]  # a decode run's durations, energies and token
    finishes: bool  # its last step finishes requests
    num_steps: int  # the replica's step count before it
    spans_arrivals: bool = False  # requests may join it as they arrive (Replica.runs_span_arrivals)
    arrivals: tuple[float, ...] = ()  # the arrival times of those that joined (``before`` has them)
    prefill: Optional[PrefillSteps] = None

    def started_by(self, t: float) -> int:
        """How many of its steps start before ``t`` (step j starts when step j - 1 ends): at least 1."""
        return min(len(self.ends), 1 + bisect.bisect_left(self.ends, t))


def run_replica(
    scheduler,
    kv: KVConfig,
    executor: Executor,
    requests: Sequence[Request],
    *,
    limits: RunLimits = RunLimits(),
    on_progress: Optional[ProgressHook] = None,
    progress_every: int = 2000,
    fast_forward: bool = True,
    admit: Optional[Callable[[Request], None]] = None,
    on_step: Optional[StepHook] = None,
) -> EventLog:
    """Serves ``requests`` on one replica in arrival order and returns the event log.

    Every request is in the log: served, or rejected with its reason (``Replica.add``), never
    dropped. Stops when everything is served, or at ``limits.max_sim_time_s`` / ``max_steps``.
    ``RuntimeError`` if the scheduler plans nothing while work is queued and nothing else will
    arrive (a policy bug: it would wait forever). ``on_progress(now, steps)`` is called about
    every ``progress_every`` steps and once at the end with a ``Progress``.
    """
    replica = Replica(scheduler, kv, executor, limits=limits, admit=admit, on_step=on_step, fast_forward=fast_forward)
    replica.runs_span_arrivals = True  # arrivals are added as soon as the clock passes them (below)
    return drive_replica(replica, requests, limits=limits, on_progress=on_progress, progress_every=progress_every)


def drive_replica(
    replica: Replica,
    requests: Sequence[Request],
    *,
    limits: RunLimits = RunLimits(),
    on_progress: Optional[ProgressHook] = None,
    progress_every: int = 2000,
) -> EventLog:
    """``run_replica``'s driver for a replica built by the caller (any ``Replica``: the pipelined
    one too): adds ``requests`` as the clock passes their arrivals, steps until all are served or
    a limit is hit, settles, and returns the log."""
    scheduler = replica.scheduler
    order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_time, i))
    arrivals = [requests[i] for i in order]
    nxt = 0
    while replica.num_steps < limits.max_steps:
        while nxt < len(arrivals) and arrivals[nxt].arrival_time <= replica.now:
            replica.add(arrivals[nxt])
            nxt += 1
        if replica.next_event_time == math.inf:  # idle, or blocked until more work arrives
            if nxt == len(arrivals):
                if replica.is_blocked:
                    raise RuntimeError(
                        f"scheduler {type(scheduler).__name__} planned an empty step with {replica.state.num_waiting} "
                        f"waiting and {replica.state.num_running} running requests and no more arrivals"
                    )
                break
            if not replica.has_unfinished and replica.now >= limits.max_sim_time_s:
                break
            replica.wait_until(arrivals[nxt].arrival_time)
            continue
        before = replica.num_steps
        replica.step(arrivals[nxt].arrival_time if nxt < len(arrivals) else math.inf)
        if on_progress is not None and before // progress_every != replica.num_steps // progress_every:
            on_progress(_progress(replica, len(arrivals)))
        if replica.now >= limits.max_sim_time_s or replica.num_steps >= limits.max_steps:
            # The last steps: stepping would have added what arrived before the last one started
            # (a run spanning arrivals is joined by them now; one that cuts it gives more steps).
            last = replica.pending_last_start
            while last is not None and nxt < len(arrivals) and arrivals[nxt].arrival_time <= last:
                replica.add(arrivals[nxt])
                nxt += 1
                last = replica.pending_last_start
            if replica.now >= limits.max_sim_time_s:
                break
    replica.settle()
    if on_progress is not None:
        on_progress(_progress(replica, len(arrivals)))
    return replica.log


def _progress(replica: Replica, num_requests: int) -> Progress:
    log = replica.log
    return Progress(replica.now, replica.num_steps, len(log.rejected) + len(log.finish_reasons), num_requests)
