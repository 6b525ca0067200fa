"""A cluster: replicas (each its own scheduler, KV pool and executor) driven from one event clock,
a router placing arrivals, and cluster events (add, drain, remove, fail) at given times.

The loop takes the earliest of: a cluster event, an arrival, a replica's next step (ties in that
order). An arrival is logged when it reaches the router (so time held there counts as queueing)
and submitted to it; after every event the router dispatches what it will. Replicas share one
event log (each step tagged with its replica), so metrics see the cluster as one service.

Clock: replica steps are atomic, as on one replica: the router sees a replica's state after the
step it is running, and a request placed on a replica mid-step is scheduled at the step's end.
A replica's fast path (closed-form decode runs) stops at the next arrival or cluster event, and,
while the router holds requests, at every other replica's next step (any step may free room).

Faults: a failed replica's unfinished requests are re-submitted to the router as continuations
(prompt + the tokens already delivered, the rest to generate), their KV recomputed elsewhere
(``EventLog.retry`` counts them and the lost tokens); a request that no replica can take when
nothing more can change is reported failed with the reason. Nothing is lost or served twice.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import heapq
import math
from collections.abc import Sequence
from typing import Optional

from jaxserve.cluster.faults import continuation, unfinished_outputs
from jaxserve.cluster.handoff import ROLES, Handoff, PoolSettings
from jaxserve.cluster.migration import MigrationSettings, Migrator
from jaxserve.cluster.view import ClusterView, ReplicaView, no_cache
from jaxserve.kv.config import KVConfig
from jaxserve.kv.prefix_hash import prompt_block_hashes
from jaxserve.persistent import EMPTY_MAP
from jaxserve.request import Request
from jaxserve.runtime.events import EventLog
from jaxserve.runtime.executor import Executor
from jaxserve.runtime.limits import RunLimits
from jaxserve.runtime.replica import Progress, ProgressHook, Replica

EVENT_KINDS = ("add", "drain", "remove", "fail")


@dataclasses.dataclass(frozen=True)
class ReplicaSpec:
    """What a replica is made of: a scheduler, its KV pool, an executor and its limits."""

    scheduler: object
    kv: KVConfig
    executor: Executor
    limits: RunLimits = RunLimits()
    name: str = ""
    kv_bytes_per_block: float = 0.0  # KV bytes one block holds on a device (a simulated migration's copy)
    role: str = "mixed"  # phase pools (handoff.py): "mixed" | "prefill" | "decode"
    num_layers: int = 1  # the model's layers (a layer-by-layer KV handoff's pipeline)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"replica {self.name!r}: role must be one of {ROLES}, got {self.role!r}")


@dataclasses.dataclass(frozen=True)
class ClusterEvent:
    """At ``time_s``: ``add`` a replica built from ``spec``; ``drain`` replica ``replica`` (it takes
    nothing new and finishes what it has); ``remove`` it (drain, then it is gone once empty); or
    ``fail`` it (it stops at once; its requests go on elsewhere)."""

    time_s: float
    kind: str
    replica: Optional[int] = None
    spec: Optional[ReplicaSpec] = None

    def __post_init__(self):
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"cluster event kind must be one of {EVENT_KINDS}, got {self.kind!r}")
        if not self.time_s >= 0:
            raise ValueError(f"cluster event time_s must be >= 0, got {self.time_s!r}")
        if (self.kind == "add") != (self.spec is not None) or (self.kind == "add") == (self.replica is not None):
            raise ValueError(f"a cluster event 'add' takes a spec and no replica; {self.kind!r} a replica and no spec")


class Member:
    """One replica of the cluster and what the cluster tracks about it."""

    def __init__(self, index: int, spec: ReplicaSpec, log: EventLog, fast_forward: bool, on_finished=None,
                 on_step=None):
        self.index = index
        self.spec = spec
        self.role = spec.role
        self.last_plan = None  # the last plan it ran step by step (a prefill replica's handoffs read it)
        # (end of its step in flight, requests that step prefilled and handed off): until that end
        # they are still its work, which a router must see (they left its state at the step's start).
        self.handed_off = (0.0, 0)
        self._on_finished = on_finished  # (request as placed here, FinishedRequest)
        self._view = self._view_state = self._view_key = None
        # The cached view also holds while nothing it was made from changed and the clock has not
        # passed the start of the pending run's next step (``_view_until``); a plain check first.
        self._view_until, self._view_check = -math.inf, None
        self.status = "up"  # up | draining | removing | removed | failed
        self.requests: dict[str, Request] = {}  # placed here and not finished
        self.not_started: dict[str, int] = {}  # placed, not yet scheduled: id -> prompt tokens
        self.queued_tokens = 0
        self.num_high_priority = 0
        self.replica = Replica(spec.scheduler, spec.kv, spec.executor, limits=spec.limits, log=log,
                               index=index, on_plan=self._started, on_finished=self._finished, fast_forward=fast_forward,
                               admit=_register_hook(spec.executor),
                               on_step=None if on_step is None else functools.partial(on_step, index))  # fmt: skip

    @property
    def accepting(self) -> bool:
        """Up: it takes new work (arrivals, migrations, handoffs)."""
        return self.status == "up"

    @property
    def takes_arrivals(self) -> bool:
        """Up and not a decode replica: the router may place arrivals on it."""
        return self.status == "up" and self.role != "decode"

    @property
    def live(self) -> bool:
        return self.status in ("up", "draining", "removing")

    def _started(self, plan) -> None:
        self.last_plan = plan
        if self.not_started:
            for rid in plan.request_ids:
                tokens = self.not_started.pop(rid, None)
                if tokens is not None:
                    self.queued_tokens -= tokens

    def _finished(self, finished) -> None:
        for f in finished:
            if self._on_finished is not None:
                self._on_finished(self.requests[f.request_id], f)
            self._forget(f.request_id)
            release(self.spec.executor, f.request_id)

    def _forget(self, rid: str) -> None:
        request = self.requests.pop(rid, None)
        if request is not None and request.priority < 0:
            self.num_high_priority -= 1
        tokens = self.not_started.pop(rid, None)
        if tokens is not None:
            self.queued_tokens -= tokens

    def place(self, request: Request, now: float) -> bool:
        replica = self.replica
        if replica.pending_last_start is None:  # (no run that arrivals may join: cut it at ``now``)
            replica.settle(now)
            replica.wait_until(now)
        if not replica.add(request, now):  # (else it joins the run, or cuts it at ``now`` itself)
            return False
        self.requests[request.request_id] = request
        self.not_started[request.request_id] = request.prompt_len
        self.queued_tokens += request.prompt_len
        self.num_high_priority += request.priority < 0
        return True

    def view(self, now: float) -> ReplicaView:
        """The router's view of this replica at ``now`` (cached until its state or placements
        change: a router reads every replica at every arrival). A replica with a decode run pending
        is seen as it is at ``now`` without cutting the run: queues are constant during a run, only
        its blocks in use grow."""
        replica, step = self.replica, 0
        check = self._view_check
        if (now <= self._view_until and check[0] is replica.state and check[1] is replica.pending_run
                and check[2] is self.handed_off and check[3] == (self.status, self.queued_tokens, self.num_high_priority)):
            return self._view
        if replica.has_pending_run:
            step = replica.steps_started_by(now)
            if step >= replica.pending_run_length:
                replica.settle(now)  # the run's last (finishing) step has started: apply it
                step = 0
        state = replica.state  # the state the pending run started from, if any
        in_flight = self.handed_off[1] if self.handed_off[0] > now else 0
        key = (self.status, self.queued_tokens, self.num_high_priority, step, in_flight)
        if self._view is None or self._view_state is not state or self._view_key != key:
            self._view_state, self._view_key = state, key
            self._view = self._make_view(state, replica.pending_view(now)[1] if step else None, in_flight)
        # Until when ``step`` and ``in_flight`` stay as they are (a handoff in flight: no shortcut).
        self._view_until = -math.inf if in_flight else replica.pending_step_start(step) if step else math.inf
        self._view_check = (state, replica.pending_run, self.handed_off,
                            (self.status, self.queued_tokens, self.num_high_priority))  # (objects compared by identity)
        return self._view

    def _make_view(self, state, used_blocks=None, in_flight: int = 0) -> ReplicaView:
        pool = state.kv.device
        cached = no_cache
        if pool.enable_caching:
            block_size = self.spec.kv.block_size

            def cached(request: Request) -> int:
                return len(pool.match_prefix(_block_hashes(request, block_size)))

        return ReplicaView(
            index=self.index, accepting=self.takes_arrivals, num_waiting=state.num_waiting + state.num_swapped,
            num_running=state.num_running + in_flight, queued_tokens=self.queued_tokens,
            used_blocks=pool.num_used if used_blocks is None else used_blocks,
            num_blocks=self.spec.kv.num_blocks, block_size=self.spec.kv.block_size,
            num_high_priority=self.num_high_priority, cached_prefix_blocks=cached,
            draining=self.status in ("draining", "removing"),
        )  # fmt: skip


def _register_hook(executor):
    """``executor.register`` unless it is the protocol's no-op (a simulator's): a replica with no
    hook lets arrivals join a pending run without cutting it."""
    hook = getattr(executor, "register", None)
    if hook is not None and getattr(type(executor), "register", None) is Executor.register:
        return None
    return hook


def release(executor, request_id: str) -> None:
    """Tells ``executor`` that ``request_id`` left its replica (executors without the hook: nothing)."""
    hook = getattr(executor, "release", None)
    if hook is not None:
        hook(request_id)


STEP_ERRORS = ("fail", "raise")


class Cluster:
    """Replicas from ``specs`` and ``router`` on one clock; ``run(requests, events)`` serves them.

    ``migration`` (``MigrationSettings``) moves running requests between replicas (Llumnix).
    Replicas whose spec has a ``role`` other than "mixed" form phase pools: prefill replicas hand
    requests to decode replicas after their prompts (``handoff.py``, with ``pools`` settings).
    ``step_errors``: what an exception from a replica's step means — ``"fail"`` (a real engine
    crashed: the replica fails, its requests go on elsewhere) or ``"raise"`` (a simulator bug)."""

    def __init__(self, specs: Sequence[ReplicaSpec], router, *, fast_forward: bool = True,
                 max_sim_time_s: float = math.inf, migration: Optional[MigrationSettings] = None,
                 step_errors: str = "fail", pools: Optional[PoolSettings] = None, on_step=None):
        if not specs:
            raise ValueError("a cluster needs at least one replica")
        roles = {spec.role for spec in specs}
        if roles in ({"prefill"}, {"decode"}):
            raise ValueError(f"phase pools: replicas {sorted(roles)} cannot serve both phases "
                             "(prefill replicas need decode or mixed ones, decode replicas prefill or mixed ones)")
        self.handoff = Handoff(self, pools or PoolSettings()) if roles != {"mixed"} else None
        if self.handoff is not None and migration is not None and migration.mode != "off":
            raise ValueError("phase pools and migration together are not supported: migrate between the replicas of "
                             "a colocated (mixed) cluster")
        if step_errors not in STEP_ERRORS:
            raise ValueError(f"step_errors must be one of {STEP_ERRORS}, got {step_errors!r}")
        self.step_errors = step_errors
        self.on_step = on_step  # (replica index, plan, StepOutput, state) after each step a replica runs
        self._cancelled: set[str] = set()  # aborted while held at the router: dropped when dispatched
        self._num_removing = 0  # members draining to be removed (checked after every loop event)
        self.replica_failures: list[tuple[float, int, str]] = []  # (time, replica, why)
        self.migrator = Migrator(self, migration) if migration is not None and migration.mode != "off" else None
        self.router = router
        self.log = EventLog()
        self.fast_forward = fast_forward
        self.max_sim_time_s = max_sim_time_s
        self.now = 0.0
        self.members: list[Member] = []
        self._next: list[float] = []  # each member's next step time (inf when not live), kept current
        for spec in specs:
            self._add(spec)
        self.router_state = router.init(len(self.members))
        self.served: dict[str, int] = {}
        self._token_cursor = 0
        self.num_steps = 0
        self.placements: list[tuple[float, str, int]] = []  # (time, request id, replica), in order
        self.prompt_lens: dict[str, int] = {}  # each request's own prompt length (continuations grow it)
        self.outputs: dict[str, tuple[int, ...]] = {}  # finished request -> every token it generated
        self._arrivals: list[Request] = []  # submitted, sorted by arrival time; those before _nxt have arrived
        self._nxt = 0
        self._num_submitted = 0
        self._advanced = False
        self._queued_ids: set[str] = set()  # ids submitted that have not arrived yet
        self._events: list = []  # heap of (time, order, ClusterEvent)
        self._num_events = 0

    # -- events ------------------------------------------------------------------------------------
    def _add(self, spec: ReplicaSpec) -> Member:
        # A prefill replica steps one step at a time: any step may finish prompts to hand off (and
        # it never decodes, so closed-form decode runs would not apply anyway).
        fast = self.fast_forward and spec.role != "prefill"
        member = Member(len(self.members), spec, self.log, fast, self._finished, self.on_step)
        # Runs are deferred (cut only when this replica is read or changed) unless the router
        # reads what a run changes besides blocks in use: served tokens, or prefix caches.
        member.replica.defer_runs = (fast and not self.router.accounts_service
                                     and not getattr(spec.scheduler, "enable_prefix_caching", False))  # fmt: skip
        # A deferred decode run may also go on through arrivals placed on the replica (they join it
        # when they queue behind a blocked head), as on a lone replica, unless something besides
        # placements would have to cut it at its own times: migrations and handoffs.
        member.replica.runs_span_arrivals = (member.replica.defer_runs and self.migrator is None
                                             and self.handoff is None)  # fmt: skip
        member.replica.wait_until(self.now)
        self.members.append(member)
        self._next.append(math.inf)
        self.refresh(member)
        return member

    def refresh(self, member: Member) -> None:
        """Re-reads ``member``'s next step time; called after anything that may change it."""
        self._next[member.index] = member.replica.next_event_time if member.live else math.inf

    def _refresh_all(self) -> None:
        for m in self.members:
            self.refresh(m)

    def _member(self, event: ClusterEvent) -> Member:
        if not isinstance(event.replica, int) or not 0 <= event.replica < len(self.members):
            raise ValueError(f"cluster event {event.kind!r} at {event.time_s} s: no replica {event.replica!r} "
                             f"(replicas 0..{len(self.members) - 1})")
        return self.members[event.replica]

    def apply(self, event: ClusterEvent) -> None:
        if event.kind == "add":
            self._add(event.spec)
            if self.handoff is not None:
                self.handoff.poke(self.now)
            return
        member = self._member(event)
        if not member.live:
            return  # already gone: nothing to drain or fail
        if event.kind == "drain":
            member.status = "draining"
        elif event.kind == "remove":
            if member.status != "removing":
                self._num_removing += 1
            member.status = "removing"
        else:
            self._fail(member)

    def _fail(self, member: Member, why: str = "failure event") -> None:
        """Fails ``member`` once its in-flight step is done (steps are atomic: what that step
        delivered stays delivered); its unfinished requests go back to the router."""
        member.status = "failed"
        self.replica_failures.append((self.now, member.index, why))
        outputs = unfinished_outputs(member.spec.scheduler, member.replica.state)
        computed = _computed_tokens(member.replica.state)
        for mover in (self.migrator, self.handoff):  # requests detached to move are still this replica's
            if mover is not None:
                for rid, moving in mover.replica_failed(member.index, self.now).items():
                    outputs[rid], computed[rid] = moving.outputs, moving.num_computed
        delivered = self.log.tokens_per_request()
        for rid, request in sorted(member.requests.items(), key=lambda kv: (kv[1].arrival_time, kv[0])):
            # ``request`` may itself be a continuation: its prompt holds what earlier replicas delivered
            delivered_here = int(delivered[self.log.index[rid]]) - (request.prompt_len - self.prompt_lens[rid])
            self.log.retry(rid, computed.get(rid, 0))
            self.router_state = self.router.submit(
                self.router_state, continuation(request, outputs.get(rid, ()), delivered_here, self.now))
        member.requests.clear()
        member.not_started.clear()
        member.queued_tokens = member.num_high_priority = 0

    def _finished(self, request: Request, finished) -> None:
        """Keeps the outputs of requests with real token ids (a simulator's placeholders are not kept)."""
        if request.has_real_tokens:
            # A continuation's prompt carries the tokens delivered before its replica failed.
            carried = tuple(request.prompt_token_ids[self.prompt_lens[request.request_id]:])
            self.outputs[request.request_id] = carried + tuple(finished.output_token_ids)

    # -- migration ---------------------------------------------------------------------------------
    def moved(self, request_id: str, source: Member, destination: Optional[Member]) -> None:
        """``request_id`` left ``source``; with a live migration it is now ``destination``'s (a
        recompute migration places its continuation with ``Member.place`` instead)."""
        request = source.requests[request_id]
        source._forget(request_id)
        if destination is not None:
            destination.requests[request_id] = request
            destination.num_high_priority += request.priority < 0
            self.placements.append((self.now, request_id, destination.index))

    # -- dispatch ----------------------------------------------------------------------------------
    def view(self) -> ClusterView:
        if self.router.accounts_service:
            self._count_served()
        served = EMPTY_MAP.update(self.served) if self.router.accounts_service else EMPTY_MAP
        now = self.now
        return ClusterView(now, tuple(m.view(now) for m in self.members), served)

    def _count_served(self) -> None:
        steps, self._token_cursor = self.log.token_rows_since(self._token_cursor)
        requests = self.log.requests
        for rows in steps:
            for i in rows.tolist():
                client = requests[i].client_id
                self.served[client] = self.served.get(client, 0) + 1

    def dispatch(self) -> None:
        self.router_state, placements = self.router.dispatch(self.router_state, self.view())
        seen = set()
        for request, index in placements:
            rid = request.request_id
            if self._cancelled and rid in self._cancelled:  # aborted while it was held
                self._cancelled.discard(rid)
                continue
            if rid in seen or not 0 <= index < len(self.members) or not self.members[index].takes_arrivals:
                raise RuntimeError(f"router {type(self.router).__name__} placed {rid!r} on replica {index!r}, "
                                   "which is not accepting or was already given it in this dispatch")
            seen.add(rid)
            self.placements.append((self.now, rid, index))
            self.members[index].place(request, self.now)
            self.refresh(self.members[index])

    # -- the loop ----------------------------------------------------------------------------------
    # ``run`` serves a whole arrival list; a driver that learns of arrivals as it goes (a real-time
    # server) uses the same loop in pieces: ``submit`` / ``add_event`` / ``abort`` between calls of
    # ``advance(until)``, and ``finish`` once nothing more will come.
    def submit(self, request: Request) -> None:
        """Queues ``request`` to reach the router at its ``arrival_time`` (which must not be
        before ``now``: the loop has already passed it). Its id must be new to the cluster."""
        rid = request.request_id
        if rid in self.prompt_lens or rid in self._queued_ids:
            raise ValueError(f"request id {rid!r} was already submitted to this cluster")
        if request.arrival_time < self.now:
            raise ValueError(f"request {rid!r} arrives at {request.arrival_time} s, before the cluster's clock "
                             f"({self.now} s)")
        arrivals, t = self._arrivals, request.arrival_time
        if len(arrivals) > self._nxt and arrivals[-1].arrival_time > t:  # (out of order: keep them sorted, stable)
            bisect.insort_right(arrivals, request, lo=self._nxt, key=_arrival_time)
        else:
            arrivals.append(request)
        self._queued_ids.add(rid)
        self._num_submitted += 1

    def add_event(self, event: ClusterEvent) -> None:
        """Applies ``event`` at its ``time_s`` (at ``now`` if that has passed)."""
        heapq.heappush(self._events, (event.time_s, self._num_events, event))
        self._num_events += 1

    def next_time(self) -> float:
        """When the loop next has something to do (an event, arrival, migration or handoff step,
        or a replica's step); infinity when nothing can change any more."""
        t_event = self._events[0][0] if self._events else math.inf
        t_arrival = self._arrivals[self._nxt].arrival_time if self._nxt < len(self._arrivals) else math.inf
        t_move = self.migrator.next_time() if self.migrator is not None else math.inf
        t_hand = self.handoff.next_time() if self.handoff is not None else math.inf
        return min(t_event, t_arrival, t_move, t_hand, min(self._next))

    def abort(self, request_id: str) -> bool:
        """Takes ``request_id`` out of the cluster (its blocks freed, its executor told), wherever it
        is: not yet arrived, held at the router (dropped when dispatched) or on a replica. False
        while it is between replicas (the last stage of a live migration, or a phase handoff): ask
        again after the next ``advance``. True for an unknown or ended request."""
        if request_id in self._queued_ids:
            self._queued_ids.discard(request_id)
            self._arrivals.remove(next(r for r in self._arrivals[self._nxt:] if r.request_id == request_id))
            self._num_submitted -= 1
            return True
        migrator, handoff = self.migrator, self.handoff
        if migrator is not None and request_id in migrator.active and migrator.active[request_id].moving is not None:
            return False
        if handoff is not None and (request_id in handoff.active
                                    or any(h.record.request_id == request_id for h in handoff.waiting)):
            return False
        for m in self.members:
            if m.live and request_id in m.requests:
                replica = m.replica
                replica.settle(self.now)
                replica.replace_state(m.spec.scheduler.abort(replica.state, request_id, replica.now))
                release(m.spec.executor, request_id)
                m._forget(request_id)
                self.refresh(m)
                return True
        if any(r.request_id == request_id for r in self.router.pending(self.router_state)):
            self._cancelled.add(request_id)
        return True

    def wait_until(self, t: float) -> None:
        """Real time: every replica ready to step before ``t`` starts its next step at ``t`` (the
        wall clock of a driver whose replicas really run), and the cluster's clock moves there."""
        for m in self.members:
            if self._next[m.index] < t:
                m.replica.settle(t)
                m.replica.wait_until(t)
                self.refresh(m)
        self.now = max(self.now, t)

    def run(self, requests: Sequence[Request], events: Sequence[ClusterEvent] = (),
            on_progress: Optional[ProgressHook] = None, progress_every: int = 2000) -> EventLog:
        """Serves ``requests`` with ``events`` applied at their times; returns the shared log. Every
        request ends in it served, rejected or failed with its reason, or unfinished at the time limit."""
        arrivals = sorted(requests, key=_arrival_time)
        ids = [r.request_id for r in arrivals]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within a run")
        for request in arrivals:
            self.submit(request)
        for event in events:
            self.add_event(event)
        self.advance(math.inf, on_progress, progress_every)
        return self.finish(on_progress)

    def finish(self, on_progress: Optional[ProgressHook] = None) -> EventLog:
        """Ends a run once nothing more will arrive (after ``advance(inf)``): pending runs are
        applied, and what no replica can take fails with the reason. Returns the shared log."""
        self.settle_all(math.inf)  # stopped by the time limit: runs end as computed
        self.give_up()
        for m in self.members if self.now < self.max_sim_time_s else ():
            if m.live and m.replica.is_blocked:
                raise RuntimeError(f"replica {m.index}'s scheduler planned an empty step with "
                                   f"{m.replica.state.num_waiting} waiting requests and nothing more to come")
        if on_progress is not None:
            on_progress(self.progress(self._num_submitted))
        return self.log

    def advance(self, until: float = math.inf, on_progress: Optional[ProgressHook] = None,
                progress_every: int = 2000) -> None:
        """Runs the loop through every happening at or before ``until`` (and before the time
        limit), earliest first: events, arrivals, migration and handoff steps, replica steps."""
        pending_events = self._events
        arrivals, nxt, n = self._arrivals, self._nxt, len(self._arrivals)
        times = self._next
        if not self._advanced:  # (once: between calls, whatever changes a member refreshes it)
            self._advanced = True
            self._refresh_all()
        while True:
            t_event = pending_events[0][0] if pending_events else math.inf
            t_arrival = arrivals[nxt].arrival_time if nxt < n else math.inf
            t_step = min(times)
            busy = self.members[times.index(t_step)] if t_step < math.inf else None  # ties: lowest index
            t_move = self.migrator.next_time() if self.migrator is not None else math.inf
            t_hand = self.handoff.next_time() if self.handoff is not None else math.inf
            t = min(t_event, t_arrival, t_move, t_hand, t_step)
            if t == math.inf or t >= self.max_sim_time_s or t > until:
                break
            if t_event == t:
                self.now = max(self.now, t)
                self.settle_all()
                self.apply(heapq.heappop(pending_events)[2])
                self._refresh_all()
            elif t_arrival == t:
                self.now = max(self.now, t)
                request = arrivals[nxt]
                nxt += 1
                self._queued_ids.discard(request.request_id)
                self.log.add_request(request, request.arrival_time)
                self.prompt_lens[request.request_id] = request.prompt_len
                self.router_state = self.router.submit(self.router_state, request)
            elif t_move == t:
                self.now = max(self.now, t)
                self.migrator.advance(self.now)  # settles the replicas it reads or changes
                self._refresh_all()
            elif t_hand == t:
                self.now = max(self.now, t)
                self.handoff.advance(self.now)  # settles the replicas it changes
                self._refresh_all()
            else:
                self.now = max(self.now, t)
                # a deferred run need not stop at arrivals: it is cut if one lands on its replica
                if busy.replica.defer_runs:  # a policy tick reads pending runs without cutting them
                    stage = self.migrator.next_stage_end() if self.migrator is not None else math.inf
                    horizon = min(t_event, stage)
                else:
                    horizon = min(t_event, t_arrival, t_move, t_hand)
                    if self.handoff is not None:  # any prefill step may start a handoff to this replica
                        horizon = min([horizon] + [times[m.index] for m in self.members if m.role == "prefill"])
                if self.router.has_pending(self.router_state):
                    horizon = min([horizon] + [t for i, t in enumerate(times) if i != busy.index])
                if self.handoff is not None and self.handoff.waiting:
                    horizon = self.now  # any step may make room for a waiting handoff: no runs meanwhile
                before, step_start = busy.replica.num_steps, busy.replica.now
                try:
                    busy.replica.step(horizon)
                except Exception as e:  # a real replica crashed mid-step: it fails, its requests go on
                    if self.step_errors == "raise":
                        raise
                    self._fail(busy, f"step raised {type(e).__name__}: {e}")
                    self._refresh_all()
                if self.handoff is not None and busy.live:
                    if busy.role == "prefill":
                        self.handoff.after_prefill_step(busy, step_start, busy.last_plan)
                    if self.handoff.poke(self.now):  # a step may have freed room for waiting handoffs
                        self._refresh_all()
                self.refresh(busy)
                self.num_steps += busy.replica.num_steps - before
                if on_progress is not None and before // progress_every != busy.replica.num_steps // progress_every:
                    on_progress(self.progress(self._num_submitted))
            if self._num_removing:
                self._retire_empty()
            if self.router.has_pending(self.router_state):
                self.dispatch()
        if nxt > 4096 and 2 * nxt > n:  # (a long-running driver: drop what the loop has passed)
            del arrivals[:nxt]
            nxt = 0
        self._nxt = nxt

    def settle_all(self, until: Optional[float] = None) -> None:
        """Applies every replica's pending decode run up to ``until`` (default: now) — before
        reading or changing replicas wholesale: events, migrations, the end."""
        t = self.now if until is None else until
        for m in self.members:
            if m.replica.has_pending_run:
                m.replica.settle(t)

    def _retire_empty(self) -> None:
        for m in self.members:
            if m.status == "removing" and not m.replica.has_unfinished:
                m.status = "removed"
                self.refresh(m)
        self._num_removing = sum(m.status == "removing" for m in self.members)

    def give_up(self) -> None:
        """What is still held at the router or waiting for a handoff when nothing more can change
        (``next_time()`` is infinite): failed, with why."""
        if self.now >= self.max_sim_time_s:
            return  # stopped by the time limit: unfinished, not failed
        if self.handoff is not None:
            self.handoff.give_up()
        for request in self.router.pending(self.router_state):
            accepting = sum(m.accepting for m in self.members)
            why = "no replica is accepting requests" if not accepting else f"router {type(self.router).__name__} never placed it"
            if request.request_id not in self._cancelled:
                self.log.fail(request.request_id, why)
                self._cancelled.add(request.request_id)  # (a driver that goes on must not place it later)

    def progress(self, num_requests: int) -> Progress:
        log = self.log
        done = len(log.rejected) + len(log.finish_reasons) + len(log.failed)
        return Progress(self.now, self.num_steps, done, num_requests)


def _arrival_time(request: Request) -> float:
    return request.arrival_time


_HASHES: dict = {}  # (request, block size) -> its prompt's block keys: a router asks every replica


def _block_hashes(request: Request, block_size: int) -> tuple:
    """``prompt_block_hashes`` of the request being routed, computed once for all replicas."""
    key = (request.request_id, block_size)
    entry = _HASHES.get(key)
    if entry is None or entry[0] is not request:  # the same object, not an equal-id continuation
        if len(_HASHES) > 64:
            _HASHES.clear()
        entry = _HASHES[key] = (request, prompt_block_hashes(request, block_size))
    return entry[1]


def _computed_tokens(state) -> dict[str, int]:
    """Tokens with KV on the replica per request (running rows and swapped requests)."""
    run = state.running
    out = dict(zip(run.ids, run.num_computed.tolist()))
    for seq in state.swapped.sorted_items():
        out[seq.request_id] = seq.num_computed
    return out


def run_cluster(specs: Sequence[ReplicaSpec], router, requests: Sequence[Request], events: Sequence[ClusterEvent] = (),
                *, fast_forward: bool = True, max_sim_time_s: float = math.inf,
                on_progress: Optional[ProgressHook] = None) -> EventLog:
    """``Cluster(specs, router).run(requests, events)``: the shared event log."""
    cluster = Cluster(specs, router, fast_forward=fast_forward, max_sim_time_s=max_sim_time_s)
    return cluster.run(requests, events, on_progress=on_progress)
