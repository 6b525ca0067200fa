"""A cluster of simulated replicas on the simulator's fast loop (``jaxserve.sim.fast_loop``).

``Cluster`` drives ``runtime.Replica``s whatever they are made of, with events, faults, migration
and phase pools. For the common case, ``FastCluster`` runs the same loop over ``FastReplica``s:
every replica mixed and eligible for the fast loop (``why_not_fast``), no cluster events, no
migration, a router that reads no served tokens, no time limit. Its loop is ``Cluster.advance``'s:
the earliest of an arrival (logged when it reaches the router, then submitted to it) and a
replica's next step (ties: the arrival, then the lowest replica index), with a dispatch after
each when the router holds requests; the router reads the replicas' counts as ``ReplicaView``s.
Steps are taken one at a time, so the router sees every replica as of the steps started before
now, as ``Cluster``'s deferred runs show them. The event log equals ``Cluster.run``'s
(tests/cluster/test_fast_cluster.py).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Optional

from jaxserve.cluster.cluster import ReplicaSpec
from jaxserve.cluster.view import ClusterView, ReplicaView, no_cache
from jaxserve.persistent import EMPTY_MAP
from jaxserve.request import Request
from jaxserve.runtime.events import EventLog
from jaxserve.runtime.replica import Progress, ProgressHook
from jaxserve.sim.executor import SimExecutor
from jaxserve.sim.fast_loop import FastReplica, StepRecorder, gc_paused, why_not_fast


def why_not_fast_cluster(specs: Sequence[ReplicaSpec], router, *, events=(), migration=None, pools=None,
                         max_sim_time_s: float = math.inf, requests: Optional[Sequence[Request]] = None) -> Optional[str]:
    """None when ``FastCluster`` runs this exactly as ``Cluster`` would; else why not (one line)."""
    if events:
        return "cluster events (add, drain, remove, fail): the fast loop's replicas are fixed"
    if migration is not None and migration.mode != "off":
        return "migration: the fast loop moves no requests between replicas"
    if any(spec.role != "mixed" for spec in specs):
        return "phase pools: the fast loop's replicas serve both phases"
    if router.accounts_service:
        return f"router {type(router).__name__} reads served tokens, which the fast loop does not count"
    if max_sim_time_s != math.inf:
        return "sim.max_time_s: the fast loop runs until every request is served"
    for i, spec in enumerate(specs):
        if type(spec.executor) is not SimExecutor:
            return f"replica {i}: executor {type(spec.executor).__name__} is not the simulator's"
        reason = why_not_fast(spec.scheduler, spec.kv, spec.executor.cost_model, spec.limits)
        if reason is not None:
            return f"replica {i}: {reason}"
    if requests is not None and len({r.request_id for r in requests}) != len(requests):
        return "duplicate request ids"
    return None


class FastMember:
    """A replica of a ``FastCluster``, with what ``run_cluster_sim`` reads of ``Cluster.members``."""

    status = "up"
    role = "mixed"

    def __init__(self, index: int, spec: ReplicaSpec, replica: FastReplica):
        self.index, self.spec, self.replica = index, spec, replica

    def view(self) -> ReplicaView:
        """The router's view of the replica now."""
        r, kv = self.replica, self.spec.kv
        return ReplicaView(self.index, True, len(r.queue), len(r.rows), r.queued_tokens, r.num_blocks - r.free,
                           kv.num_blocks, kv.block_size, r.num_high_priority, no_cache)  # fmt: skip


class FastCluster:
    """``Cluster(specs, router).run(requests)`` on fast replicas (``why_not_fast_cluster`` must
    allow it). After ``run``: ``members``, ``placements`` (time, request id, replica) and
    ``log``, as ``Cluster`` has them; no migrator, no handoff."""

    migrator = None
    handoff = None

    def __init__(self, specs: Sequence[ReplicaSpec], router):
        reason = why_not_fast_cluster(specs, router)
        if reason is not None:
            raise ValueError(f"FastCluster: {reason}")
        self.router = router
        self.log = EventLog()
        self._recorder = StepRecorder()
        self.members = [
            FastMember(i, spec, FastReplica(spec.scheduler, spec.kv, spec.executor.cost_model, spec.limits, self.log,
                                            self._recorder, index=i))
            for i, spec in enumerate(specs)
        ]  # fmt: skip
        self.placements: list[tuple[float, str, int]] = []
        self.now = 0.0
        self.num_steps = 0

    def run(self, requests: Sequence[Request], on_progress: Optional[ProgressHook] = None,
            progress_every: int = 2000) -> EventLog:
        """Serves ``requests``; returns the shared log (every request served or rejected)."""
        arrivals = sorted(requests, key=lambda r: r.arrival_time)
        if len({r.request_id for r in arrivals}) != len(arrivals):
            raise ValueError("request ids must be unique within a run")
        with gc_paused():
            return self._run(arrivals, on_progress, progress_every)

    def _run(self, arrivals: list, on_progress, progress_every: int) -> EventLog:
        router, log, members = self.router, self.log, self.members
        replicas = [m.replica for m in members]
        state = router.init(len(members))
        # Each replica's next step time, and a heap of (time, replica) of them: an entry whose time
        # is no longer its replica's is skipped when it surfaces. Ties: the lowest replica first.
        self._times, self._heap = [math.inf] * len(members), []
        self._views, self._changed = [m.view() for m in members], set()  # the router's views, those to rebuild
        heap, times, changed = self._heap, self._times, self._changed
        n, nxt = len(arrivals), 0
        pending = router.has_pending(state)  # (the router's state changes only by submit and dispatch)
        while True:
            t_arrival = arrivals[nxt].arrival_time if nxt < n else math.inf
            while heap and heap[0][0] != times[heap[0][1]]:
                heapq.heappop(heap)
            if heap and heap[0][0] < t_arrival:  # (ties: the arrival first)
                t_step, busy = heapq.heappop(heap)
                self.now = max(self.now, t_step)
                replica = replicas[busy]
                if replica.step():
                    self.num_steps += 1
                    if on_progress is not None and self.num_steps % progress_every == 0:
                        on_progress(self._progress(n))
                changed.add(busy)
                self._reschedule(busy)
            else:
                if t_arrival == math.inf:
                    break
                self.now = max(self.now, t_arrival)
                request = arrivals[nxt]
                nxt += 1
                log.add_request(request, request.arrival_time)
                state = router.submit(state, request)
                pending = True
            if pending:
                state = self._dispatch(state)
                pending = router.has_pending(state)
        for m in members:
            if m.replica.has_unfinished:
                raise RuntimeError(f"replica {m.index}'s scheduler planned an empty step with "
                                   f"{m.replica.num_waiting} waiting requests and nothing more to come")
        for request in router.pending(state):  # (routers that hold work back: nothing more can change)
            log.fail(request.request_id, f"router {type(router).__name__} never placed it")
        self._recorder.flush(log)
        if on_progress is not None:
            on_progress(self._progress(n))
        return log

    def _reschedule(self, index: int) -> None:
        t = self._times[index] = self.members[index].replica.next_step_time
        if t != math.inf:
            heapq.heappush(self._heap, (t, index))

    def _dispatch(self, state):
        now, members, views = self.now, self.members, self._views
        for i in self._changed:
            views[i] = members[i].view()
        self._changed.clear()
        view = ClusterView(now, tuple(views), EMPTY_MAP)
        state, placements = self.router.dispatch(state, view)
        seen = set()
        for request, index in placements:
            rid = request.request_id
            if rid in seen or not 0 <= index < len(members):
                raise RuntimeError(f"router {type(self.router).__name__} placed {rid!r} on replica {index!r}, "
                                   "which is not accepting or was already given it in this dispatch")
            seen.add(rid)
            self.placements.append((now, rid, index))
            replica = members[index].replica
            replica.add(request, now)
            self._changed.add(index)
            if replica.next_step_time != self._times[index]:
                self._reschedule(index)
        return state

    def _progress(self, num_requests: int) -> Progress:
        log = self.log
        return Progress(self.now, self.num_steps, len(log.rejected) + len(log.finish_reasons) + len(log.failed),
                        num_requests)  # fmt: skip
