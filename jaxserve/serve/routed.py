"""A colocated cluster of engines served in real time: one ``EngineLoop`` per replica (each on a
thread of its own, so engines on different devices step at the same time) and a router from
``jaxserve.cluster.routers`` placing every request as it arrives.

    loops = RoutedLoops([engine_replica(runner, make("sarathi")) for runner in runners], routers.make("least_kv"))
    build_app(llm, loop=loops)   # the server takes it in place of a single EngineLoop

The replicas are the ``ReplicaSpec``s a ``cluster.Cluster`` takes (``cluster.engines``), the router
sees them as ``ReplicaView``s built from each loop's state after its last step, and a router that
holds requests back (fair dispatch) is asked again after every step of any replica. Phase pools,
migration, failures and cluster events are ``serve.cluster_loop.ClusterLoop``'s (the offline
``Cluster`` in real time, its replicas stepping one after another on one thread): here replicas
must be "mixed", and each steps on a thread of its own.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Optional

from jaxserve.cluster.view import ClusterView, ReplicaView, no_cache
from jaxserve.persistent import EMPTY_MAP
from jaxserve.request import Request
from jaxserve.serve.engine_loop import Draining, EngineLoop, QueueFull, RequestOutput, Sink, Snapshot


class RoutedLoops:
    """``EngineLoop``'s interface (``submit``, ``abort``, ``start``, ``stop``, ``snapshot``, ...) over
    one loop per replica of ``specs`` and ``router``. ``max_queue`` bounds the requests waiting in
    all replicas and at the router together."""

    def __init__(self, specs: Sequence, router, *, max_queue: Optional[int] = None, observer=None):
        if not specs:
            raise ValueError("RoutedLoops needs at least one replica")
        roles = sorted({getattr(spec, "role", "mixed") for spec in specs} - {"mixed"})
        if roles:
            raise ValueError(f"real-time serving drives colocated replicas only; got roles {roles}")
        origin = time.monotonic()
        self._fanout = _Fanout(self, observer)
        self.loops = [EngineLoop.from_spec(spec, observer=self._fanout, origin=origin) for spec in specs]
        self.router = router
        self.max_queue = max_queue
        self._state = router.init(len(self.loops))
        self._lock = threading.RLock()  # guards the router state, the held requests and the counters
        self._held: dict[str, Sink] = {}  # at the router, not placed yet
        self._cancelled: set[str] = set()  # aborted while held
        self._placed: dict[str, int] = {}  # request id -> its loop (until it ends)
        self._draining = False
        self._served: dict[str, int] = {}  # client -> output tokens streamed (for routers that account service)

    # -- EngineLoop's interface ---------------------------------------------------------------------
    @property
    def observer(self):
        return self._fanout.observer

    @observer.setter
    def observer(self, observer) -> None:
        self._fanout.observer = observer

    def now(self) -> float:
        return self.loops[0].now()

    @property
    def running(self) -> bool:
        return all(loop.running for loop in self.loops)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def num_waiting(self) -> int:
        return len(self._held) + sum(loop.num_waiting for loop in self.loops)

    @property
    def snapshot(self) -> Snapshot:
        """Every replica's last snapshot summed (KV usage over all their blocks), plus the held requests."""
        snaps = [loop.snapshot for loop in self.loops]
        blocks = sum(loop.kv.num_blocks for loop in self.loops)
        used = sum(s.kv_blocks_used for s in snaps)
        return Snapshot(
            sum(s.num_running for s in snaps), sum(s.num_waiting for s in snaps) + len(self._held), used,
            used / blocks, sum(s.num_steps for s in snaps), sum(s.num_unfinished for s in snaps) + len(self._held),
        )  # fmt: skip

    def start(self) -> "RoutedLoops":
        for loop in self.loops:
            loop.start()
        return self

    def submit(self, request: Request, sink: Sink) -> Request:
        """Hands ``request`` to the router (stamped with its arrival on the loops' shared clock);
        it is placed now, or after a later step if the router holds it back."""
        with self._lock:
            if self._draining:
                raise Draining("the server is shutting down and admits no new requests")
            if self.max_queue is not None and self.num_waiting >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting (max_queue={self.max_queue})")
            request = dataclasses.replace(request, arrival_time=self.now())
            self._held[request.request_id] = sink
            self._state = self.router.submit(self._state, request)
            self._dispatch()
        return request

    def abort(self, request_id: str, finish_reason: str = "abort") -> None:
        with self._lock:
            if request_id in self._held:
                self._cancelled.add(request_id)
                return
            index = self._placed.get(request_id)
        if index is not None:
            self.loops[index].abort(request_id, finish_reason)

    def stop_admitting(self) -> None:
        with self._lock:
            self._draining = True
        for loop in self.loops:
            loop.stop_admitting()

    def drain(self, timeout_s: Optional[float] = None) -> bool:
        self.stop_admitting()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        ok = True
        for loop in self.loops:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = loop.drain(left) and ok
        return ok

    def stop(self, grace_s: float = 0.0) -> None:
        self.drain(grace_s)
        with self._lock:  # what the router still holds never started: it ends aborted
            held, self._held = self._held, {}
        for rid, sink in held.items():
            sink(RequestOutput(rid, (), "abort"))
        for loop in self.loops:
            loop.stop()

    # -- routing ------------------------------------------------------------------------------------
    def view(self) -> ClusterView:
        replicas = []
        for i, loop in enumerate(self.loops):
            s = loop.snapshot
            replicas.append(ReplicaView(
                index=i, accepting=not loop.draining, num_waiting=loop.num_waiting, num_running=s.num_running,
                queued_tokens=loop.queued_tokens, used_blocks=s.kv_blocks_used, num_blocks=loop.kv.num_blocks,
                block_size=loop.kv.block_size, num_high_priority=0, cached_prefix_blocks=no_cache,
            ))  # fmt: skip
        served = EMPTY_MAP.update(self._served) if self.router.accounts_service else EMPTY_MAP
        return ClusterView(self.now(), tuple(replicas), served)

    def _dispatch(self) -> None:
        """Places what the router will place now (under ``_lock``)."""
        if not self.router.has_pending(self._state):
            return
        self._state, placements = self.router.dispatch(self._state, self.view())
        for request, index in placements:
            rid = request.request_id
            sink = self._held.pop(rid)
            if rid in self._cancelled:
                self._cancelled.discard(rid)
                sink(RequestOutput(rid, (), "abort"))
                continue
            self._placed[rid] = index
            try:
                self.loops[index].submit(request, _Forget(self, request, sink))
            except (Draining, QueueFull) as e:  # the replica stopped meanwhile: the request ends
                self._placed.pop(rid, None)
                sink(RequestOutput(rid, (), "abort", str(e)))

    def _after_step(self) -> None:
        if self._held:
            with self._lock:
                self._dispatch()


class _Forget:
    """A placed request's sink: counts its client's service, passes outputs on, and forgets the
    placement at the last one."""

    def __init__(self, owner: RoutedLoops, request: Request, sink: Sink):
        self.owner, self.request, self.sink = owner, request, sink

    def __call__(self, out: RequestOutput) -> None:
        owner = self.owner
        if out.token_ids or out.finished:
            with owner._lock:
                client = self.request.client_id
                owner._served[client] = owner._served.get(client, 0) + len(out.token_ids)
                if out.finished:
                    owner._placed.pop(self.request.request_id, None)
        self.sink(out)


class _Fanout:
    """Every loop's observer: passes measurements to the server's observer and lets the router
    place held requests after each step (a step may have freed room)."""

    def __init__(self, owner: RoutedLoops, observer):
        self.owner, self.observer = owner, observer

    def on_step(self, stats) -> None:
        if self.observer is not None:
            self.observer.on_step(stats)
        self.owner._after_step()

    def on_token(self, request_id: str, gap_s: float) -> None:
        if self.observer is not None:
            self.observer.on_token(request_id, gap_s)

    def on_finish(self, times) -> None:
        if self.observer is not None:
            self.observer.on_finish(times)
