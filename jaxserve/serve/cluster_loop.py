"""A whole cluster served in real time: one thread owns a ``cluster.Cluster`` of engine replicas
(phase pools with KV handoff, Llumnix migration, failures and cluster events included) and moves
its clock with the wall clock, while requests arrive from other threads at any time.

    loop = ClusterLoop(specs, routers.make("least_kv"), migration=MigrationSettings("live")).start()
    loop.submit(request, sink)   # sink(RequestOutput) on the loop's thread, as with EngineLoop
    loop.abort(request_id)
    loop.stop(grace_s=5.0)

It has ``EngineLoop``'s interface and contract (the server takes either): between two turns of the
cluster's loop it takes arrivals and aborts from a thread-safe inbox, hands arrivals to the cluster
(``Cluster.submit``, stamped on the loop's clock: seconds since it was built), moves every replica
that is ready to step to the wall time (``Cluster.wait_until``) and runs the cluster's loop up to
it (``Cluster.advance``): routing, handoffs, migration stages and ticks, cluster events and one
step of each ready replica. Replicas step one after another on this thread (the cluster's clock
treats them as parallel machines, as offline). A request's sink gets each step's tokens from
whichever replica ran it (a handed-off or migrated request keeps streaming from its new replica),
then one last output with the finish reason: ``stop`` / ``length``; ``abort``; ``rejected`` (a
replica refused it: bad input found late); ``error`` (the cluster failed it: no replica can take
it, e.g. all failed, or a scheduler planned nothing for it). A replica whose step raises fails
(``Cluster(step_errors="fail")``): its requests go on elsewhere from the tokens already streamed.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Optional

from jaxserve.cluster.cluster import Cluster, ClusterEvent
from jaxserve.request import Request
from jaxserve.serve.engine_loop import Observer, RequestOutput, Sink, Snapshot, StreamingLoop, _Stream

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how long the thread sleeps on an empty inbox when nothing is due (a stop wakes it)


class ClusterLoop(StreamingLoop):
    """``EngineLoop``'s interface (``submit``, ``abort``, ``start``, ``stop``, ``snapshot``, ...)
    over a ``Cluster(specs, router, migration=..., pools=...)`` driven in real time. ``events``
    happen at their ``time_s`` on the loop's clock. ``max_queue`` bounds the requests waiting at
    the router and in every replica's queue (``QueueFull``); ``observer`` gets every replica's
    steps and every request's times."""

    def __init__(self, specs: Sequence, router, *, migration=None, pools=None, events: Sequence[ClusterEvent] = (),
                 max_queue: Optional[int] = None, observer: Optional[Observer] = None,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        super().__init__(max_queue=max_queue, observer=observer, clock=clock)
        # fast_forward=False: a real model runs every step (no closed-form runs).
        self.cluster = Cluster(specs, router, fast_forward=False, migration=migration, pools=pools,
                               step_errors="fail", on_step=self._after_step)  # fmt: skip
        for event in events:
            self.cluster.add_event(event)
        self._to_abort: set[str] = set()  # ended for their clients, still moving between replicas
        self._ended = (0, 0)  # the log's rejected / failed entries already turned into endings

    @property
    def log(self):
        """The cluster's shared event log: read it only once the loop has stopped."""
        return self.cluster.log

    # -- the loop's thread ------------------------------------------------------------------------
    def _run(self) -> None:
        cluster = self.cluster
        try:
            while not self._stop.is_set():
                due = cluster.next_time() - self.now()
                self._take_inbox(timeout=IDLE_WAIT_S if due == math.inf else min(max(due, 0.0), IDLE_WAIT_S))
                if self._stop.is_set():
                    break
                if self._to_abort:
                    self._to_abort = {rid for rid in self._to_abort if not cluster.abort(rid)}
                now = self.now()
                cluster.wait_until(now)
                cluster.advance(now)
                self._end_refused()
                if cluster.next_time() == math.inf and self._streams and self._inbox.empty():
                    self._give_up()
                self._publish()
        except Exception:  # noqa: BLE001 (a bug in the cluster's loop: end every request rather than hang)
            log.exception("the cluster loop failed; ending every request")
            for rid in list(self._streams):
                self._finish(rid, (), "error", "the cluster loop failed (see the server log)")
        finally:
            self._take_inbox(timeout=None)
            for rid in list(self._streams):
                self._end(rid, "abort", None)
            self._publish()

    def _add(self, request: Request, sink: Sink) -> None:
        rid, cluster = request.request_id, self.cluster
        if rid in self._streams or rid in cluster.prompt_lens:
            self._emit(sink, RequestOutput(rid, (), "rejected", f"request id {rid!r} was already served by this server"))
            self._dequeue(request.prompt_len)
            self._count_ended()
            return
        # (stamped by the caller: the cluster's clock may have passed it while it sat in the inbox)
        request = dataclasses.replace(request, arrival_time=max(request.arrival_time, cluster.now))
        self._streams[rid] = _Stream(request, sink, request.arrival_time)
        cluster.submit(request)

    def _end(self, request_id: str, finish_reason: str, error: Optional[str]) -> None:
        """Ends a live request that did not finish by itself and takes it out of the cluster."""
        self._finish(request_id, (), finish_reason, error)
        if not self.cluster.abort(request_id):
            self._to_abort.add(request_id)  # between replicas: out once it lands

    def _end_refused(self) -> None:
        """Ends the requests the cluster refused (a replica's rejection) or failed since last time."""
        log_, (num_rejected, num_failed) = self.cluster.log, self._ended
        for entries, seen, reason in ((log_.rejected, num_rejected, "rejected"), (log_.failed, num_failed, "error")):
            for i, why in itertools.islice(entries.items(), seen, None):
                rid = log_.requests[i].request_id
                if rid in self._streams:
                    self._finish(rid, (), reason, why)
        self._ended = (len(log_.rejected), len(log_.failed))

    def _give_up(self) -> None:
        """Nothing more can happen, yet requests are live: the cluster fails what it holds; what a
        blocked scheduler keeps ends with an error instead of hanging its client."""
        self.cluster.give_up()
        self._end_refused()
        for rid in list(self._streams):
            self._end(rid, "error", "the cluster can do nothing more for it (its replica's scheduler planned "
                                    "nothing, or no replica can take it)")  # fmt: skip

    def _after_step(self, replica: int, plan, out, state) -> None:
        """The cluster's hook after replica ``replica``'s step: delivered as one engine's loop does."""
        spec = self.cluster.members[replica].spec
        # The delivery reads the stepping engine's executor (it releases finished requests: the
        # cluster did already, and release is idempotent) and whether it caches prefixes.
        self.executor, self._caching = spec.executor, bool(getattr(spec.scheduler, "enable_prefix_caching", False))
        self._deliver(plan, out, state)

    def _publish(self) -> None:
        cluster = self.cluster
        running = waiting = used = blocks = 0
        for m in cluster.members:
            if m.live:
                state = m.replica.state
                blocks += m.spec.kv.num_blocks
                running += state.num_running
                waiting += state.num_waiting + state.num_swapped
                used += state.kv.device.num_used
        waiting += len(cluster.router.pending(cluster.router_state))
        with self._lock:
            self.snapshot = Snapshot(running, waiting, used, used / max(blocks, 1), cluster.num_steps, self._unfinished)
