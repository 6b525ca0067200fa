"""Phase pools: prefill replicas hand each request to a decode replica once its prompt is computed
(DistServe, OSDI'24; Splitwise, ISCA'24).

Roles (``ReplicaSpec.role``): a ``prefill`` replica takes arrivals from the router and computes their
prompts (and first tokens); a ``decode`` replica takes no arrivals, only handed-off requests; a
``mixed`` replica does both phases of what the router gives it, and is where a handoff goes when no
decode replica has room (Splitwise's mixed pool absorbing bursts).

A handoff, per request, right after the prefill step that sampled its first token:

1. The request leaves the prefill replica's batch (``detach``); its blocks stay there, held in
   ``state.outgoing`` — the prefill replica is its buffer until the decode side has room.
2. Handoffs wait in arrival order (first come, first served: a large request is never overtaken
   for ever) for a destination: the decode replica picked by ``decode_pick`` among those whose pool
   and batch have room now (``reserve_incoming`` takes the blocks and a seat); else a mixed one.
3. The copy then runs on the link (``kv_transfer.transfer_end``): links carry one transfer at a time,
   in order, one link per prefill replica (``link_scope="source"``) or one for the whole cluster
   (``"cluster"``); layer by layer (``overlap="layer"``) it overlaps the prefill step when the
   destination was reserved at once, otherwise it is sent whole. Real executors copy the contents
   and the copy takes its measured time.
4. When the copy ends the request joins the destination's batch (``attach``; it decodes at its next
   step), the prefill replica frees the blocks. Decode admission thus waits for both the transfer
   and free blocks.

Failures: a failed source's detached requests are the cluster's to carry on (``replica_failed``
returns them); a failed destination sends its in-flight handoffs back to the front of the queue (the
source still holds their KV). A request no decode replica will ever hold is failed with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jaxserve.cluster.kv_transfer import OVERLAPS, KVLink, copy_blocks, transfer_end
from jaxserve.scheduler import migration as moves

ROLES = ("mixed", "prefill", "decode")
DECODE_PICKS = ("least_kv", "shortest_queue")
LINK_SCOPES = ("source", "cluster")


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """How prefill replicas hand requests to decode replicas (module docstring)."""

    link: KVLink = KVLink()
    link_scope: str = "source"
    overlap: str = "none"
    decode_pick: str = "least_kv"

    def __post_init__(self):
        for name, allowed in (("link_scope", LINK_SCOPES), ("overlap", OVERLAPS), ("decode_pick", DECODE_PICKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"phase pools: {name} must be one of {allowed}, got {getattr(self, name)!r}")


@dataclasses.dataclass
class TransferRecord:
    """One handoff as it happened. ``ready_s``: its prefill step ended; ``start_s``: a destination
    took it (its blocks reserved); ``end_s``: the copy ended. ``outcome``: "waiting", "in flight",
    "done", or "aborted: <why>" / "failed: <why>"."""

    request_id: str
    source: int
    ready_s: float
    num_blocks: int
    destination: Optional[int] = None
    start_s: Optional[float] = None
    end_s: Optional[float] = None
    num_bytes: float = 0.0  # per device (kv_transfer: the busier end's share)
    copy_s: float = 0.0  # the copy's own duration (measured on real executors), without queueing
    overlapped: bool = False
    outcome: str = "waiting"


@dataclasses.dataclass
class _Handoff:
    record: TransferRecord
    moving: moves.MigratingRequest
    step_start_s: float  # its last prefill step's start (layer overlap)
    step_fraction: float  # share of its KV that step computed


class Handoff:
    """Moves requests from ``cluster``'s prefill replicas to its decode (or mixed) replicas; the
    cluster calls ``after_prefill_step``, ``next_time`` / ``advance``, ``poke`` when room may have
    appeared, ``replica_failed`` and ``give_up``."""

    def __init__(self, cluster, settings: PoolSettings):
        self.cluster = cluster
        self.settings = settings
        self.records: list[TransferRecord] = []
        self.waiting: list[_Handoff] = []  # in order: the head is served first
        self.active: dict[str, _Handoff] = {}
        self._link_free: dict[object, float] = {}

    # -- timeline ----------------------------------------------------------------------------------
    def next_time(self) -> float:
        """When the next copy ends (infinity when none is in flight)."""
        return min((h.record.end_s for h in self.active.values()), default=float("inf"))

    def advance(self, now: float) -> None:
        """Completes the copies that ended by ``now``: each request joins its destination's batch."""
        for rid in sorted(self.active, key=lambda r: (self.active[r].record.end_s, r)):
            h = self.active[rid]
            if h.record.end_s <= now:
                self._complete(h, now)
        self.poke(now)

    def poke(self, now: float) -> bool:
        """Starts waiting handoffs, in order, while a destination has room; whether any started."""
        started = False
        while self.waiting:
            h = self.waiting[0]
            why = self._why_nowhere(h)
            if why is not None:
                self._fail(h, why)
            elif not self._start(h, now):
                break
            self.waiting.pop(0)
            started = True
        return started

    # -- the prefill side --------------------------------------------------------------------------
    def after_prefill_step(self, member, step_start_s: float, plan) -> None:
        """Detaches every request whose prompt ``member`` (a prefill replica) has just computed, in
        batch order, and queues their handoffs (``plan``: the step just run)."""
        state = member.replica.state
        run = state.running
        ready = [rid for rid, req, nc, nt in zip(run.ids, run.requests, run.num_computed.tolist(), run.num_tokens.tolist())
                 if nt - nc == 1 and nc >= req.prompt_len]  # fmt: skip
        if not ready:
            return
        new_tokens = dict(zip(plan.request_ids, plan.num_new_tokens.tolist())) if plan is not None else {}
        bs = member.spec.kv.block_size
        for rid in ready:
            state, moving = moves.detach(member.spec.scheduler, state, rid)
            record = TransferRecord(rid, member.index, member.replica.now, moves.blocks_for(moving.num_computed, bs))
            self.records.append(record)
            fraction = new_tokens.get(rid, 0) / moving.num_computed if moving.num_computed else 0.0
            self.waiting.append(_Handoff(record, moving, step_start_s, min(fraction, 1.0)))
        member.replica.replace_state(state)
        member.handed_off = (member.replica.now, len(ready))

    # -- one handoff ---------------------------------------------------------------------------------
    def _destinations(self, now: float) -> list:
        """Members that may take a handoff at ``now``, best first: decode replicas by
        ``decode_pick``, then mixed ones. A replica in a pending decode run is read as of ``now``
        without cutting it (its queues are constant, only its blocks in use grow)."""
        members = [m for m in self.cluster.members if m.status == "up" and m.role != "prefill"]
        least_kv = self.settings.decode_pick == "least_kv"

        def key(m):
            pending = m.replica.pending_view(now)
            if pending is None and m.replica.has_pending_run:  # its run's last step has started: apply it
                m.replica.settle(now)
            state = m.replica.state if pending is None else pending[0]
            if least_kv:
                used = state.kv.device.num_used if pending is None else pending[1]
                return used / m.spec.kv.num_blocks
            return state.num_running + state.num_waiting + len(state.incoming)

        return sorted(members, key=lambda m: (m.role != "decode", key(m), m.index))

    def _why_nowhere(self, h: _Handoff) -> Optional[str]:
        """Why no up decode or mixed replica could ever finish ``h``'s request (None: some could, or
        none is up now — one may be added later). As a replica admits an arrival: its whole prompt +
        max_new_tokens must fit the pool (else a preemption could never be recomputed there), the
        context limit and the scheduler's own admission rule."""
        request = self.cluster.members[h.record.source].requests[h.record.request_id]
        why = []
        for m in self.cluster.members:
            if m.status == "up" and m.role != "prefill":
                reason = _cannot_hold(m, request)
                if reason is None:
                    return None
                why.append(reason)
        return (f"no decode or mixed replica can hold it (prompt + max_new_tokens = {request.max_total_tokens} "
                f"tokens; {'; '.join(why)})") if why else None

    def _start(self, h: _Handoff, now: float) -> bool:
        """Reserves a destination for ``h`` and starts its copy; False when none has room now."""
        record, rid = h.record, h.record.request_id
        src = self.cluster.members[record.source]
        request = src.requests[rid]
        for dst in self._destinations(now):
            if dst.spec.kv.block_size != src.spec.kv.block_size or _cannot_hold(dst, request) is not None:
                continue
            dst.replica.settle(now)
            try:
                state = moves.reserve_incoming(dst.spec.scheduler, dst.replica.state, rid, record.num_blocks)
            except moves.MigrationRefused:
                continue
            try:
                dst.spec.executor.register(request)
            except ValueError:
                continue  # this engine cannot serve it (e.g. over its context): try another
            dst.replica.replace_state(state)
            # The blocks are free once the destination's step in flight (whose state we read) ends.
            self._copy(h, src, dst, max(now, dst.replica.now))
            return True
        return False

    def _copy(self, h: _Handoff, src, dst, now: float) -> None:
        """Copies ``h``'s KV from ``src`` to ``dst``, whose blocks are reserved from ``now`` on."""
        record, settings = h.record, self.settings
        table = src.replica.state.outgoing[record.request_id]
        dst_blocks = dst.replica.state.incoming[record.request_id]
        copy = copy_blocks(src.spec, dst.spec, table, dst_blocks, settings.link)
        key = "cluster" if settings.link_scope == "cluster" else record.source
        free = self._link_free.get(key, 0.0)
        at_once = now <= record.ready_s  # reserved before the prefill step ended: layers may overlap it
        if copy.measured:
            end = max(now, record.ready_s, free) + copy.duration_s
        elif settings.overlap == "layer" and at_once:
            end = transfer_end(settings.link, copy.num_bytes, ready_s=record.ready_s, link_free_s=free,
                               step_start_s=h.step_start_s, num_layers=src.spec.num_layers,
                               step_bytes=copy.num_bytes * h.step_fraction)  # fmt: skip
            record.overlapped = True
        else:
            end = transfer_end(settings.link, copy.num_bytes, ready_s=max(now, record.ready_s), link_free_s=free)
        self._link_free[key] = end
        record.destination, record.start_s, record.end_s = dst.index, max(now, record.ready_s), end
        record.num_bytes, record.copy_s, record.outcome = copy.num_bytes, copy.duration_s, "in flight"
        self.active[record.request_id] = h

    def _complete(self, h: _Handoff, now: float) -> None:
        record, rid = h.record, h.record.request_id
        src, dst = self.cluster.members[record.source], self.cluster.members[record.destination]
        dst.replica.settle(now)
        dst.replica.wait_until(now)
        dst.replica.replace_state(moves.attach(dst.spec.scheduler, dst.replica.state, h.moving))
        self._release_source(src, rid)
        self.cluster.moved(rid, src, dst)
        self.cluster.refresh(dst)
        del self.active[rid]
        record.outcome = "done"

    def _release_source(self, src, rid: str) -> None:
        if src.live:
            src.replica.replace_state(moves.release_outgoing(src.replica.state, rid))
        release = getattr(src.spec.executor, "release", None)
        if release is not None:
            release(rid)

    # -- what the cluster tells it -----------------------------------------------------------------
    def replica_failed(self, index: int, now: float) -> dict[str, moves.MigratingRequest]:
        """Handoffs from replica ``index`` end (returned: the cluster carries their requests on, as
        the failed replica's); those into it go back to the front of the queue."""
        lost, requeue = {}, []
        for h in list(self.waiting) + sorted(self.active.values(), key=lambda h: h.record.request_id):
            record = h.record
            if record.source == index:
                lost[record.request_id] = h.moving
                if record.destination is not None and record.destination != index:
                    self._cancel(h)
                record.outcome = "aborted: source replica failed"
            elif record.destination == index:
                record.outcome = "aborted: destination replica failed"
                again = dataclasses.replace(record, destination=None, start_s=None, end_s=None, num_bytes=0.0,
                                            copy_s=0.0, overlapped=False, outcome="waiting")  # fmt: skip
                self.records.append(again)
                requeue.append(dataclasses.replace(h, record=again))
            else:
                continue
            self.active.pop(record.request_id, None)
        self.waiting = requeue + [h for h in self.waiting if h.record.source != index]
        return lost

    def _cancel(self, h: _Handoff) -> None:
        dst = self.cluster.members[h.record.destination]
        if dst.live:
            dst.replica.settle()
            dst.replica.replace_state(moves.cancel_incoming(dst.replica.state, h.record.request_id))
        release = getattr(dst.spec.executor, "release", None)
        if release is not None:
            release(h.record.request_id)

    def give_up(self) -> None:
        """Fails the handoffs still waiting when nothing more can change (no destination will ever
        have room), freeing their blocks on the source."""
        for h in self.waiting:
            self._fail(h, f"no decode or mixed replica took its KV ({h.record.num_blocks} blocks) after its prefill "
                          f"on replica {h.record.source}")
        self.waiting = []

    def _fail(self, h: _Handoff, why: str) -> None:
        record = h.record
        src = self.cluster.members[record.source]
        self.cluster.log.fail(record.request_id, why)
        self._release_source(src, record.request_id)
        src._forget(record.request_id)
        record.outcome = f"failed: {why}"


def _cannot_hold(member, request) -> Optional[str]:
    """Why ``member`` could never finish ``request`` (None: it could), as it would judge an arrival."""
    limit = member.spec.limits.max_context
    if request.max_total_tokens > member.spec.kv.capacity_tokens:
        return f"replica {member.index}'s pool holds {member.spec.kv.capacity_tokens} tokens"
    if limit is not None and request.max_total_tokens > limit:
        return f"replica {member.index}'s context is {limit}"
    try:
        member.spec.scheduler.check_admissible(request)
    except ValueError as e:
        return f"replica {member.index}: {e}"
    return None


def handoff_metrics(records: list[TransferRecord]) -> dict:
    """``num_kv_transfers`` (done), their bytes (per device), and per transfer: ``kv_transfer_s``
    (prefill end to the copy's end: what the request's second token waits, beyond a decode step),
    ``kv_transfer_wait_s`` (prefill end until a decode replica took it) and ``kv_copy_s`` (the copy
    alone); distributions are mean/p50/p99 (None without a transfer). Failed handoffs by count."""
    done = [r for r in records if r.outcome == "done"]

    def dist(values):
        if not values:
            return None
        a = np.asarray(values, np.float64)
        return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}

    return {
        "num_kv_transfers": len(done),
        "num_kv_transfers_failed": sum(r.outcome.startswith("failed") for r in records),
        "kv_transfer_bytes": float(sum(r.num_bytes for r in done)),
        "kv_transfer_s": dist([r.end_s - r.ready_s for r in done]),
        "kv_transfer_wait_s": dist([r.start_s - r.ready_s for r in done]),
        "kv_copy_s": dist([r.copy_s for r in done]),
        "kv_transfers_overlapped": sum(r.overlapped for r in done),
    }
