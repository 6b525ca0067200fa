"""Asynchronous scheduling: the replica loop with the host one step ahead of the device.

While the device runs step N, the host reconciles step N-1, closes step N provisionally (every
sampling row produced one token, a placeholder: ``scheduler/deferred_output.py``), schedules step
N+1 from that state and packs it (``prepare``). Then it waits for N's tokens (``collect``), writes
them into N+1's decode inputs (the placeholders) and dispatches N+1 (``launch``), which returns at
once; then it reconciles N (real tokens in, stop-token finishes, their rows in N+1 dropped) and
logs it. Scheduler, KV bookkeeping and the event log are those of the synchronous loop
(``runtime/replica.py``), whose ``Replica`` this extends (arrivals, rejections, the clock).

Clock: a step's duration is the measured interval from when the device could start it (its
predecessor's tokens collected, or its own preparation when nothing ran before it) to its tokens
on the host, compilation excluded. Host time that the device hid is in no step; host time longer
than a device step shows up as longer steps. (The synchronous engine leaves scheduler time out of
its steps altogether.)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional, Protocol

import numpy as np

from jaxserve.kv.config import KVConfig
from jaxserve.persistent import evolve, pick
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import Request
from jaxserve.runtime.events import EventLog
from jaxserve.runtime.limits import RunLimits
from jaxserve.runtime.replica import ProgressHook, Replica, StepHook, drive_replica
from jaxserve.scheduler.deferred_output import PendingStep, provisional_update, reconcile

_NO_TOKENS = np.zeros(0, np.int64)
INPUTS = ("device", "host")  # where step N+1's decode inputs (step N's tokens) are put in


class AsyncExecutor(Protocol):
    """An executor whose step comes in three parts (``engine.model_runner.ModelRunner`` is one):
    ``prepare(plan)`` applies its memory ops and packs it (ordered after every launched step),
    ``launch(prepared, patch=, after=)`` dispatches it without waiting (the input ids of some
    decode rows, placeholders in the plan, come from ``patch = (plan rows, token ids)`` or, on the
    device, from ``after = (plan rows, indices, launched)``: entries of an earlier launched step's
    tokens), ``is_done(launched)`` says whether its tokens are ready, ``collect(launched)`` waits
    for them: ``(StepOutput, logits)``. Prepared and launched steps have ``compile_s`` (seconds
    compiling, left out of step times); a prepared one has ``start`` (perf_counter at its start)."""

    def register(self, request: Request) -> None: ...

    def release(self, request_id: str) -> None: ...

    def prepare(self, plan: BatchPlan): ...

    def launch(self, prepared, patch: Optional[tuple] = None, after: Optional[tuple] = None): ...

    def is_done(self, launched) -> bool: ...

    def collect(self, launched) -> tuple[StepOutput, dict]: ...


class OverlapStats(NamedTuple):
    """Host-side timings of an async run (seconds, summed over steps). ``schedule_pack_s``: host
    time scheduling and packing (compilation excluded) of steps prepared while another was in
    flight; ``dispatch_s``: dispatching them behind it (``inputs="device"``); ``hidden_s``: the part
    of both spent while the device was still busy (measured: the step in flight was not done when
    the host came for its tokens, so it ran through all of it; one found done counts 0: a lower
    bound); ``wait_s``: time blocked collecting tokens; ``gap_s`` (``inputs="host"``): from a step's
    tokens collected to the next step dispatched (patch + dispatch), when the device idles;
    ``overlapped_steps``: steps prepared while another was in flight; ``hidden_steps``: of those,
    the ones whose predecessor was found not done."""

    schedule_pack_s: float = 0.0
    dispatch_s: float = 0.0
    hidden_s: float = 0.0
    wait_s: float = 0.0
    gap_s: float = 0.0
    overlapped_steps: int = 0
    hidden_steps: int = 0


class _InFlight(NamedTuple):
    pending: PendingStep
    launched: object
    dropped: tuple[str, ...] = ()  # its rows dropped at the previous step's reconcile (stopped there)


class PipelinedReplica(Replica):
    """``Replica`` (add, clock, log) whose ``step`` keeps one step in flight (module docstring).

    Between ``step`` calls one step may be in flight (``in_flight``); the state is then the one
    its provisional update left. ``abort(request_id)`` may be called then. ``drain()`` collects and
    logs the step in flight. ``on_step(plan, out, state)`` sees every step once its real tokens are
    in (``state.finished``: the requests it finished). Counters a test can read: ``num_dropped``
    (rows of a dispatched step dropped because their request hit a stop token one step earlier).
    ``inputs``: how step N+1's decode rows get step N's tokens: ``"device"`` (gathered on the
    device, so N+1 is dispatched before N ends) or ``"host"`` (patched into the packed ids once N's
    tokens are on the host, then dispatched)."""

    def __init__(self, scheduler, kv: KVConfig, executor: AsyncExecutor, *, limits: RunLimits = RunLimits(),
                 admit: Optional[Callable[[Request], None]] = None, on_step: Optional[StepHook] = None,
                 log: Optional[EventLog] = None, index: int = 0, inputs: str = "device"):  # fmt: skip
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
        self.inputs = inputs
        super().__init__(scheduler, kv, executor, limits=limits, admit=admit, on_step=on_step, fast_forward=False,
                         log=log, index=index)  # fmt: skip
        self._inflight: Optional[_InFlight] = None
        self._interval_start = 0.0  # perf_counter when the device could start the step in flight
        self._interval_compile = 0.0  # compilation seconds within that interval (left out)
        self.stats = OverlapStats()
        self.num_dropped = 0

    @property
    def in_flight(self) -> bool:
        return self._inflight is not None

    @property
    def next_event_time(self) -> float:
        if self._inflight is not None:
            return self.now
        return super().next_event_time

    def replace_state(self, state) -> None:
        if self._inflight is not None:
            raise RuntimeError("replace_state() with a step in flight: drain() first")
        super().replace_state(state)

    def abort(self, request_id: str) -> None:
        """Stops serving ``request_id`` now (a step may be in flight: its token is then ignored at
        reconcile, and its freed blocks go to others only in steps the device runs after it). A
        request whose finish the step in flight already decided is left to finish."""
        self.state = self.scheduler.abort(self.state, request_id, self.now)

    def step(self, horizon: float = math.inf) -> int:
        """Schedules and dispatches the next step, then collects, reconciles and logs the one in
        flight before it. Returns the steps logged (0 or 1): 0 when nothing was in flight, or the
        scheduler planned nothing and nothing was in flight (then blocked until ``add``)."""
        scheduler, executor, inflight = self.scheduler, self.executor, self._inflight
        if self.num_steps + (inflight is not None) >= self.limits.max_steps:
            return self.drain()
        t0 = time.perf_counter()
        state, plan = scheduler.schedule(self.state, self.now)
        if plan.is_empty:
            self.state = scheduler.update(state, plan, StepOutput.for_plan(plan, _NO_TOKENS), self.now)
            if inflight is None:
                self._blocked = True
                return 0
            return self.drain()
        prepared = executor.prepare(plan)  # (raising, the scheduled state is dropped: the step never happened)
        host_s = time.perf_counter() - t0 - prepared.compile_s
        if inflight is None:
            self._interval_start, self._interval_compile = prepared.start, prepared.compile_s
            launched = executor.launch(prepared)
            self._interval_compile += launched.compile_s
        else:
            self._interval_compile += prepared.compile_s
            rows, index = _decode_inputs(inflight.pending, plan)
            if self.inputs == "device":  # dispatched behind step N, its inputs gathered from N's tokens
                t = time.perf_counter()
                launched = executor.launch(prepared, after=(rows, index, inflight.launched))
                self._interval_compile += launched.compile_s
                dispatch_s = time.perf_counter() - t - launched.compile_s
                done = executor.is_done(inflight.launched)
                out, t_collected = self._collect(inflight)
                gap_s = 0.0
            else:  # N's tokens patched into the packed ids on the host, then dispatched
                done = executor.is_done(inflight.launched)
                out, t_collected = self._collect(inflight)
                launched = executor.launch(prepared, patch=(rows, out.token_ids.array[index]))
                dispatch_s = 0.0
                gap_s = time.perf_counter() - t_collected - launched.compile_s
            hidden = 0.0 if done else host_s + dispatch_s
            st = self.stats
            self.stats = st._replace(
                schedule_pack_s=st.schedule_pack_s + host_s, dispatch_s=st.dispatch_s + dispatch_s,
                hidden_s=st.hidden_s + hidden, gap_s=st.gap_s + gap_s,
                overlapped_steps=st.overlapped_steps + 1, hidden_steps=st.hidden_steps + (not done),
            )  # fmt: skip
            state, dropped = self._close(inflight, out, t_collected, state)
            if self.inputs == "host":  # (its compilation came after N's tokens: in the new interval)
                self._interval_compile += launched.compile_s
        self.state, pending = provisional_update(scheduler, state, plan)
        self._inflight = _InFlight(pending, launched, dropped if inflight is not None else ())
        return inflight is not None

    def drain(self) -> int:
        """Collects, reconciles and logs the step in flight, if any; returns the steps logged."""
        inflight = self._inflight
        if inflight is None:
            return 0
        out, t_collected = self._collect(inflight)
        self.state, _ = self._close(inflight, out, t_collected, self.state)
        return 1

    def _collect(self, inflight: _InFlight) -> tuple[StepOutput, float]:
        t = time.perf_counter()
        out, _ = self.executor.collect(inflight.launched)
        t_collected = time.perf_counter()
        self.stats = self.stats._replace(wait_s=self.stats.wait_s + t_collected - t)
        return out, t_collected

    def _close(self, inflight: _InFlight, out: StepOutput, t_collected: float, state):
        """Reconciles the step ``inflight`` into ``state`` with its tokens ``out``, logs it and
        starts the next interval; returns the state and the requests whose rows in the next step
        (already dispatched) were dropped. The log's plan leaves out this step's own dropped rows
        (their tokens were never anyone's: a request gets as many token times as tokens)."""
        plan = inflight.pending.plan
        state, rec = reconcile(self.scheduler, state, inflight.pending, out.token_ids.array)
        self.num_dropped += len(rec.dropped)
        duration = max(t_collected - self._interval_start - self._interval_compile, 0.0)
        self._interval_start, self._interval_compile = t_collected, 0.0
        self._inflight = None
        start = self.now
        self.now = start + duration
        state = evolve(state, finished=rec.finished)
        if inflight.dropped:
            plan = _without_rows(plan, set(inflight.dropped))
        self.log.step(plan, start, duration, out.energy_j, state, rec.finished, self.index)
        if self._on_plan is not None:
            self._on_plan(plan)
        if self._on_finished is not None and rec.finished:
            self._on_finished(rec.finished)
        if self._on_step is not None:
            self._on_step(plan, StepOutput(out.token_ids, duration, out.energy_j), state)
        self.num_steps += 1
        return state, rec.dropped


def _without_rows(plan: BatchPlan, request_ids: set) -> BatchPlan:
    """``plan`` without the rows of ``request_ids`` (its memory ops kept)."""
    keep = np.array([rid not in request_ids for rid in plan.request_ids], bool)
    rows = keep.nonzero()[0].tolist()
    return dataclasses.replace(
        plan, request_ids=pick(plan.request_ids, rows), num_computed_tokens=plan.num_computed_tokens[keep],
        num_new_tokens=plan.num_new_tokens[keep], samples_token=plan.samples_token[keep],
        block_tables=pick(plan.block_tables, rows), token_ids=plan.token_ids[np.repeat(keep, plan.num_new_tokens)],
    )  # fmt: skip


def _decode_inputs(pending: PendingStep, plan: BatchPlan) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, index)``: the decode rows of ``plan`` whose input is the token their request sampled
    in ``pending``'s step (a placeholder in the plan), and that token's index in that step's array."""
    where = dict(zip((r.request_id for r in pending.requests), pending.token_index.tolist()))
    rows, src = [], []
    for i, (rid, dec) in enumerate(zip(plan.request_ids, plan.is_decode.tolist())):
        j = where.get(rid) if dec else None
        if j is not None:
            rows.append(i)
            src.append(j)
    return np.array(rows, np.int64), np.array(src, np.int64)


def run_pipelined(
    scheduler,
    kv: KVConfig,
    executor: AsyncExecutor,
    requests: Sequence[Request],
    *,
    limits: RunLimits = RunLimits(),
    on_progress: Optional[ProgressHook] = None,
    progress_every: int = 2000,
    admit: Optional[Callable[[Request], None]] = None,
    on_step: Optional[StepHook] = None,
    replica: Optional[PipelinedReplica] = None,
    inputs: str = "device",
) -> EventLog:
    """``runtime.replica.run_replica`` with the host one step ahead (``PipelinedReplica``): serves
    ``requests`` in arrival order and returns the event log (every request in it, served or
    rejected); stops when all are served or at ``limits``. ``replica``: one built by the caller
    (to read its ``stats`` after), else a new one (with ``inputs``)."""
    if replica is None:
        replica = PipelinedReplica(scheduler, kv, executor, limits=limits, admit=admit, on_step=on_step, inputs=inputs)
    try:
        return drive_replica(replica, requests, limits=limits, on_progress=on_progress, progress_every=progress_every)
    finally:
        replica.drain()  # never leave a step running on the device
