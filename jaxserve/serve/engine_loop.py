"""The real-time engine loop: one thread owns a ``runtime.Replica`` (scheduler state + executor) and
steps it while requests arrive from other threads at any time.

    loop = EngineLoop.from_llm(llm); loop.start()
    loop.submit(request, sink)   # sink(RequestOutput) is called on the loop's thread
    loop.abort(request_id)       # takes effect before the next step, frees the request's blocks
    loop.stop(grace_s=5.0)       # stop admitting, finish in-flight requests, abort the rest

Continuous batching: between two steps the loop takes everything that arrived (``submit``,
``abort``) from a thread-safe inbox and hands it to the replica, so a new request joins the
running batch at the next ``schedule`` of whatever policy the scheduler is. The replica is the one
the simulator and the offline engine run (``Replica.add`` / ``step``, the same event log), stepped
here one step at a time (no closed-form runs: a real model must run every step) on a wall clock:
before each step the replica's clock is moved to the wall time since the loop started, so the log's
times are the server's. A request the replica refuses (found late: over the context, ids outside
the vocabulary, over the scheduler's budget) or whose step raises ends with an error; the others
go on.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, Optional, Protocol

from jaxserve.kv.config import KVConfig
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import Request
from jaxserve.runtime import Executor, Replica, RunLimits

log = logging.getLogger(__name__)

# A server runs until it is stopped: no step limit worth the name (RunLimits needs a number).
_UNLIMITED_STEPS = 2**62


class RequestOutput(NamedTuple):
    """What a request's sink receives: the tokens sampled for it since its last output (in order),
    and once, with the last output, why it ended: ``"stop"`` / ``"length"`` (the scheduler's),
    ``"abort"`` (``EngineLoop.abort`` or a stop past its grace), ``"rejected"`` (the replica refused
    it: bad input found late; ``error`` says why) or ``"error"`` (its step failed; ``error``)."""

    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: Optional[str] = None
    error: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


Sink = Callable[[RequestOutput], None]


class RequestTimes(NamedTuple):
    """One request's life on the loop's clock (seconds since the loop started): arrival, first
    scheduled (nan if never), first token and last token (nan if none), end; its prompt length,
    the tokens it got and how it ended."""

    request_id: str
    arrival_s: float
    scheduled_s: float
    first_token_s: float
    last_token_s: float
    end_s: float
    prompt_tokens: int
    output_tokens: int
    finish_reason: str


class StepStats(NamedTuple):
    """One executed step as a metrics observer sees it (``time_s`` on the loop's clock, after the
    step): the queues and KV usage after it, prompt tokens of requests that got their first token in
    it, tokens sampled, requests preempted, and prefix-cache lookups (prompt tokens of requests
    scheduled for the first time, and how many of those were already cached) when caching is on."""

    time_s: float
    num_running: int
    num_waiting: int
    kv_usage: float
    new_prompt_tokens: int
    generation_tokens: int
    num_preemptions: int
    prefix_queries: int
    prefix_hits: int
    num_tokens: int  # tokens the step computed (prefill chunks + decodes)


class Observer(Protocol):
    """Receives the loop's measurements on the loop's thread (e.g. ``serve.metrics.ServerMetrics``)."""

    def on_step(self, stats: StepStats) -> None: ...

    def on_token(self, request_id: str, gap_s: float) -> None:
        """A request got a token ``gap_s`` after its previous one (inter-token latency)."""

    def on_finish(self, times: RequestTimes) -> None: ...


class Snapshot(NamedTuple):
    """The loop's state after its last step, readable from any thread."""

    num_running: int
    num_waiting: int  # in the scheduler's queue or swapped out (``EngineLoop.num_waiting`` adds the inbox)
    kv_blocks_used: int
    kv_usage: float
    num_steps: int
    num_unfinished: int  # requests submitted and not yet ended


class QueueFull(RuntimeError):
    """``submit`` while ``max_queue`` requests already wait to be scheduled."""


class Draining(RuntimeError):
    """``submit`` after ``stop``/``drain`` began: the loop admits nothing new."""


@dataclasses.dataclass
class _Stream:
    """The loop's record of one live request (owned by the loop's thread)."""

    request: Request
    sink: Sink
    arrival_s: float
    scheduled_s: float = float("nan")
    first_token_s: float = float("nan")
    last_token_s: float = float("nan")
    num_tokens: int = 0
    stepped: bool = False  # has been through a step that ran without raising


class StreamingLoop(abc.ABC):
    """What every serving loop shares (``EngineLoop``, ``ClusterLoop``): a thread that owns the
    engines, a thread-safe inbox other threads ``submit`` to and ``abort`` through, admission
    (``Draining``, ``QueueFull`` past ``max_queue``), draining and stopping, and the delivery of a
    step's tokens and endings to the requests' sinks. A subclass gives the thread (``_run``),
    taking a request in (``_add``), ending one early (``_end``), ``_publish`` and ``log``; its
    thread takes the inbox with ``_take_inbox`` between steps. Times are seconds on ``clock``
    since ``origin`` (default: when the loop is built)."""

    executor = None  # the stepping engine's executor while ``_deliver`` runs (it releases finished requests)
    _caching = False  # whether that engine caches prefixes (the metrics' prefix-cache queries)

    def __init__(self, *, max_queue: Optional[int] = None, observer: Optional[Observer] = None,
                 clock: Callable[[], float] = time.monotonic, origin: Optional[float] = None):  # fmt: skip
        if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 0):
            raise ValueError(f"max_queue must be an int >= 0 or None, got {max_queue!r}")
        self.max_queue = max_queue
        self.observer = observer
        self._clock = clock
        self._t0 = clock() if origin is None else origin
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # live requests (the loop's thread only)
        self._lock = threading.Lock()  # guards the counters other threads read and _draining
        self._in_inbox = 0  # submitted, not yet taken by the loop
        self.queued_tokens = 0  # prompt tokens of requests submitted and not yet scheduled (routers read it)
        self._unfinished = 0
        self._draining = False
        self._stop = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._thread: Optional[threading.Thread] = None
        self.snapshot = Snapshot(0, 0, 0, 0.0, 0, 0)

    # -- what a subclass provides (its engine or cluster) --------------------------------------------
    @property
    @abc.abstractmethod
    def log(self):
        """The event log its steps write."""

    @abc.abstractmethod
    def _run(self) -> None:
        """The loop thread's body: takes the inbox, steps, delivers, until stopped."""

    @abc.abstractmethod
    def _add(self, request: Request, sink: Sink) -> None:
        """Hands a request taken from the inbox to its engine (on the loop thread)."""

    @abc.abstractmethod
    def _end(self, request_id: str, finish_reason: str, error: Optional[str]) -> None:
        """Ends a live request that did not finish by itself (and takes it out of its engine)."""

    @abc.abstractmethod
    def _publish(self) -> None:
        """Refreshes ``snapshot`` (the counts other threads read) after a step."""

    # -- any thread ---------------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the loop was built (the clock of arrivals, tokens and the event log)."""
        return self._clock() - self._t0

    @property
    def num_waiting(self) -> int:
        """Requests waiting to be scheduled: submitted but not yet taken, queued or swapped out."""
        return self._in_inbox + self.snapshot.num_waiting

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "StreamingLoop":
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine-loop", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: Request, sink: Sink) -> Request:
        """Queues ``request`` (stamped with its arrival on the loop's clock, which is returned) to
        join the batch at the next step; ``sink`` then receives its outputs on the loop's thread.
        Raises ``Draining`` once stopping began and ``QueueFull`` past ``max_queue``."""
        with self._lock:
            if self._draining or (self._thread is not None and not self._thread.is_alive()):
                raise Draining("the server is shutting down and admits no new requests")
            if self.max_queue is not None and self.num_waiting >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting (max_queue={self.max_queue})")
            self._in_inbox += 1
            self._unfinished += 1
            self.queued_tokens += request.prompt_len
            request = dataclasses.replace(request, arrival_time=self.now())
        self._inbox.put(("add", request, sink))
        return request

    def abort(self, request_id: str, finish_reason: str = "abort") -> None:
        """Ends ``request_id`` before the next step (its sink gets ``finish_reason``: "abort", or
        "stop" when the caller found a stop string in its text) and frees its blocks; a no-op for
        an unknown or ended request."""
        self._inbox.put(("abort", request_id, finish_reason))

    def stop_admitting(self) -> None:
        """From now on ``submit`` raises ``Draining`` (in-flight requests go on)."""
        with self._lock:
            self._draining = True

    def drain(self, timeout_s: Optional[float] = None) -> bool:
        """Stops admitting and waits until every submitted request has ended (or ``timeout_s``
        passed); True if all ended."""
        with self._lock:
            self._draining = True
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout=timeout_s)

    def stop(self, grace_s: float = 0.0) -> None:
        """``drain(grace_s)``, then aborts what is left and ends the thread (idempotent)."""
        self.drain(grace_s)
        self._stop.set()
        self._inbox.put(("wake", None, None))
        if self._thread is not None:
            self._thread.join()

    # -- the loop's thread: shared ------------------------------------------------------------------
    def _take_inbox(self, timeout: Optional[float]) -> None:
        """Applies everything queued for the loop (waiting up to ``timeout`` s for the first item)."""
        try:
            item = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload, extra = item  # ("add", request, sink) | ("abort", request id, finish reason) | ("wake", ...)
            if kind == "add":
                with self._lock:
                    self._in_inbox -= 1
                self._add(payload, extra)
            elif kind == "abort" and payload in self._streams:
                self._end(payload, extra, None)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _finish(self, request_id: str, tokens: tuple[int, ...], finish_reason: str, error: Optional[str]) -> None:
        s = self._streams.pop(request_id)
        if s.scheduled_s != s.scheduled_s:  # ended before it was ever scheduled
            self._dequeue(s.request.prompt_len)
        self._emit(s.sink, RequestOutput(request_id, tokens, finish_reason, error))
        if self.observer is not None:
            now = self.now()
            self.observer.on_finish(RequestTimes(
                request_id, s.arrival_s, s.scheduled_s, s.first_token_s, s.last_token_s, now,
                s.request.prompt_len, s.num_tokens, finish_reason,
            ))  # fmt: skip
        self._count_ended()

    def _dequeue(self, prompt_len: int) -> None:
        with self._lock:
            self.queued_tokens -= prompt_len

    def _count_ended(self) -> None:
        with self._lock:
            self._unfinished -= 1
            if self._unfinished == 0:
                self._idle.notify_all()

    def _emit(self, sink: Sink, out: RequestOutput) -> None:
        try:
            sink(out)
        except Exception:  # noqa: BLE001 (a broken consumer ends its own request only)
            log.exception("sink of request %r raised; aborting it", out.request_id)
            if not out.finished and out.request_id in self._streams:
                self._end(out.request_id, "abort", None)

    def _deliver(self, plan: BatchPlan, out: StepOutput, state) -> None:
        """Streams a step's tokens, ends the requests it finished (releasing them from
        ``self.executor``, the stepping engine's), reports the step to the observer."""
        now = self.now()
        streams, observer = self._streams, self.observer
        finished = {f.request_id: f for f in state.finished}
        new_prompt = gen = queries = hits = 0
        samples = plan.samples_token.tolist()
        computed = plan.num_computed_tokens.tolist()
        for rid, sampled, done in zip(plan.request_ids, samples, computed):
            s = streams.get(rid)
            if s is None:
                continue
            s.stepped = True
            if s.scheduled_s != s.scheduled_s:  # nan: scheduled for the first time
                s.scheduled_s = now
                self._dequeue(s.request.prompt_len)
                if self._caching:
                    queries += s.request.prompt_len
                    hits += done
            if not sampled:
                continue
            token = int(out.token_ids[rid])
            gen += 1
            if s.num_tokens == 0:
                s.first_token_s = now
                new_prompt += s.request.prompt_len
            elif observer is not None:
                observer.on_token(rid, now - s.last_token_s)
            s.last_token_s = now
            s.num_tokens += 1
            f = finished.pop(rid, None)
            if f is None:
                self._emit(s.sink, RequestOutput(rid, (token,)))
            else:
                self.executor.release(rid)
                self._finish(rid, (token,), f.finish_reason, None)
        for rid, f in finished.items():  # (finished without sampling this step: not expected)
            if rid in streams:
                self.executor.release(rid)
                self._finish(rid, (), f.finish_reason, None)
        if observer is not None:
            observer.on_step(StepStats(
                now, state.num_running, state.num_waiting + state.num_swapped, state.kv.usage, new_prompt, gen,
                len(plan.preempted) + len(plan.swapped_out), queries, hits, plan.num_tokens,
            ))  # fmt: skip


class EngineLoop(StreamingLoop):
    """A scheduler driving ``executor`` over ``kv`` in real time on a thread of its own.

    ``max_context`` rejects requests whose prompt + max_new_tokens exceed it (the runner's
    ``max_model_len``); ``max_queue`` bounds the requests waiting to be scheduled (``submit`` raises
    ``QueueFull`` past it; None: unbounded). ``observer`` gets step and request measurements.
    Times are seconds on ``clock`` since ``origin`` (default: when the loop is built; loops serving
    one cluster share it).
    """

    def __init__(
        self,
        scheduler,
        kv: KVConfig,
        executor: Executor,
        *,
        max_context: Optional[int] = None,
        max_queue: Optional[int] = None,
        observer: Optional[Observer] = None,
        clock: Callable[[], float] = time.monotonic,
        origin: Optional[float] = None,
    ):
        super().__init__(max_queue=max_queue, observer=observer, clock=clock, origin=origin)
        self.scheduler = scheduler
        self.kv = kv
        self.executor = executor
        self._plan: Optional[BatchPlan] = None  # the plan the executor was last given
        self.replica = Replica(
            scheduler, kv, _Recording(executor, self), limits=RunLimits(max_context=max_context, max_steps=_UNLIMITED_STEPS),
            admit=executor.register, on_step=self._deliver, fast_forward=False,
        )  # fmt: skip
        self._caching = bool(getattr(scheduler, "enable_prefix_caching", False))

    @property
    def log(self):
        """The replica's event log (``runtime.EventLog``): read it only once the loop has stopped."""
        return self.replica.log

    @classmethod
    def from_llm(cls, llm, **options) -> "EngineLoop":
        """The loop over a ``jaxserve.LLM``'s scheduler, KV cache and runner."""
        return cls(llm.scheduler, llm.kv, llm.runner, max_context=llm.max_model_len, **options)

    @classmethod
    def from_spec(cls, spec, **options) -> "EngineLoop":
        """The loop over a cluster replica's ``ReplicaSpec`` (e.g. ``cluster.engines.engine_replica``)."""
        return cls(spec.scheduler, spec.kv, spec.executor, max_context=spec.limits.max_context, **options)

    # -- the loop's thread ------------------------------------------------------------------------
    def _run(self) -> None:
        replica = self.replica
        try:
            while not self._stop.is_set():
                idle = not replica.has_unfinished or replica.is_blocked
                self._take_inbox(0.5 if idle else None)
                self._publish()
                if self._stop.is_set() or not replica.has_unfinished:
                    continue
                replica.wait_until(self.now())
                try:
                    taken = replica.step()
                except Exception as e:  # noqa: BLE001 (a step's failure ends its requests, not the loop)
                    self._step_failed(e)
                    continue
                if not taken and replica.state.num_running == 0 and self._inbox.empty():
                    # Nothing runs, nothing can start, and no request is on its way: a policy that
                    # would wait forever. Its queue ends with an error instead of hanging clients.
                    for rid in list(self._streams):
                        self._end(rid, "error", f"scheduler {type(self.scheduler).__name__} planned nothing for it")
                self._publish()
        finally:
            self._take_inbox(None)
            for rid in list(self._streams):
                self._end(rid, "abort", None)
            self._publish()

    def _add(self, request: Request, sink: Sink) -> None:
        rid = request.request_id
        if rid in self._streams:
            self._emit(sink, RequestOutput(rid, (), "rejected", f"request id {rid!r} is already being served"))
            self._dequeue(request.prompt_len)
            self._count_ended()
            return
        self._streams[rid] = _Stream(request, sink, request.arrival_time)
        try:
            added = self.replica.add(request)
        except Exception as e:  # noqa: BLE001 (a scheduler or executor bug met by this request ends it alone)
            log.exception("adding request %r raised", rid)
            self._end(rid, "error", f"the engine could not add it: {type(e).__name__}: {e}")
            return
        if not added:
            log_ = self.replica.log
            reason = log_.rejected.get(log_.index[rid], "rejected")
            self._end(rid, "rejected", reason)

    def _end(self, request_id: str, finish_reason: str, error: Optional[str]) -> None:
        """Ends a live request that did not finish by itself: out of the scheduler, executor released."""
        replica = self.replica
        replica.replace_state(self.scheduler.abort(replica.state, request_id, replica.now))
        self.executor.release(request_id)
        self._finish(request_id, (), finish_reason, error)

    def _step_failed(self, error: Exception) -> None:
        """A step raised (the replica kept its state from before it). The requests to blame are
        those of the failed plan that never got through a step (they joined it); when all of them
        had, the whole plan is. They end with the error; the loop goes on with the others."""
        plan, self._plan = self._plan, None
        ids = [rid for rid in (plan.request_ids if plan is not None else ()) if rid in self._streams]
        suspects = [rid for rid in ids if not self._streams[rid].stepped] or ids or list(self._streams)
        log.error("engine step failed (%s: %s); ending %d request(s)", type(error).__name__, error, len(suspects))
        for rid in suspects:
            self._end(rid, "error", f"engine step failed: {type(error).__name__}: {error}")
        self._publish()

    def _publish(self) -> None:
        state = self.replica.state
        with self._lock:
            self.snapshot = Snapshot(
                state.num_running, state.num_waiting + state.num_swapped, state.kv.device.num_used,
                state.kv.usage, self.replica.num_steps, self._unfinished,
            )  # fmt: skip


class _Recording(Executor):
    """Forwards to the loop's executor, remembering the plan of the step in progress (to blame a
    failed step on its requests)."""

    def __init__(self, executor: Executor, loop: EngineLoop):
        self._executor = executor
        self._loop = loop

    def register(self, request: Request) -> None:
        self._executor.register(request)

    def release(self, request_id: str) -> None:
        self._executor.release(request_id)

    def execute(self, plan: BatchPlan) -> StepOutput:
        self._loop._plan = plan
        return self._executor.execute(plan)
