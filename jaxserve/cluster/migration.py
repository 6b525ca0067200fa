"""Moving running requests between replicas: Llumnix's live migration and the recompute baseline.

**Live** (Llumnix, OSDI'24 §4.2): the request's KV is copied to the destination in stages while it
keeps decoding on the source. Each stage copies the full blocks computed since the last one (full
blocks never change again); when what is left is at most ``final_stage_blocks`` blocks or
``max_stages`` stages have run, the last stage pauses the request (``detach``), copies the rest
including the partly filled block, and the request resumes on the destination (``attach``). Before
every stage a handshake reserves the destination's blocks (and, the first time, a batch seat); if
they are gone the migration aborts and the source keeps the request, untouched. It also aborts when
the request leaves the source's running batch (finished, preempted) or either replica fails.

**Recompute** (the baseline): the request is aborted on the source and handed to the destination
as a continuation (prompt + generated tokens), whose KV the destination recomputes.

A stage's copy time is modelled from the bytes it moves over ``KVLink`` when the executors hold no
KV contents (the simulator), and measured (the wall time of ``read_kv`` + ``write_kv``) when they
do (real engines). **Downtime** is the request's own pause: from the moment it stops decoding on
the source to the end of its first step that samples a token on the destination.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from typing import Optional

from jaxserve.cluster.faults import continuation
from jaxserve.cluster.kv_transfer import KVLink, copy_blocks
from jaxserve.scheduler import migration as moves

MODES = ("off", "live", "recompute")

@dataclasses.dataclass(frozen=True)
class MigrationSettings:
    """How a cluster migrates: ``mode`` (off | live | recompute), the policy that picks
    ``(request, source, destination)`` every ``interval_s`` (``migration_policy``), the link, and
    when a live migration's last stage starts."""

    mode: str = "live"
    policy: object = None  # migration_policy.LlumnixPolicy() when None
    interval_s: float = 0.25
    link: KVLink = KVLink()
    max_stages: int = 8
    final_stage_blocks: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"migration mode must be one of {MODES}, got {self.mode!r}")
        if not self.interval_s > 0:
            raise ValueError(f"migration interval_s must be > 0, got {self.interval_s!r}")
        for name in ("max_stages", "final_stage_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"migration {name} must be an int >= 1, got {value!r}")


@dataclasses.dataclass
class MigrationRecord:
    """One migration, as it happened. ``outcome``: "done", or "aborted: <why>"; ``downtime_s`` is
    set once the request sampled on the destination (None until then, or if it never did)."""

    request_id: str
    source: int
    destination: int
    mode: str
    start_s: float
    num_tokens: int  # tokens with KV on the source when it started
    end_s: Optional[float] = None
    pause_s: Optional[float] = None
    downtime_s: Optional[float] = None
    num_stages: int = 0
    num_blocks: int = 0  # blocks copied (live)
    num_bytes: float = 0.0
    copy_s: float = 0.0  # time spent copying, all stages
    outcome: str = "in progress"


@dataclasses.dataclass
class _Move:
    """A live migration in progress: what is copied and when the stage in flight ends."""

    record: MigrationRecord
    request: object
    ends_s: float = 0.0
    copied: int = 0  # blocks of the request's table copied to the destination so far
    moving: Optional[moves.MigratingRequest] = None  # set once detached (the last stage)


class Migrator:
    """Runs migrations between ``cluster.members``: starts the policy's picks, advances stages,
    aborts and completes them. The cluster calls ``next_time()`` / ``advance(now)`` in its loop."""

    def __init__(self, cluster, settings: MigrationSettings):
        from jaxserve.cluster.migration_policy import LlumnixPolicy

        self.cluster = cluster
        self.settings = settings
        self.policy = settings.policy if settings.policy is not None else LlumnixPolicy()
        self.records: list[MigrationRecord] = []
        self.active: dict[str, _Move] = {}
        self.next_tick = 0.0

    # -- timeline ----------------------------------------------------------------------------------
    def next_stage_end(self) -> float:
        """When the next copy stage ends (infinity when none is in flight)."""
        return min((m.ends_s for m in self.active.values()), default=float("inf"))

    def next_time(self) -> float:
        ends = self.next_stage_end()
        # ticks only while some replica will step (a cluster that cannot move is not kept alive)
        busy = any(m.live and m.replica.next_event_time < float("inf") for m in self.cluster.members)
        return min(ends, self.next_tick if busy and self.settings.mode != "off" else float("inf"))

    def advance(self, now: float) -> None:
        """Finishes the stages due by ``now``, then, at a policy tick, starts new migrations."""
        for rid in sorted(self.active, key=lambda r: (self.active[r].ends_s, r)):
            move = self.active.get(rid)
            if move is not None and move.ends_s <= now:
                self._settle(now, move.record.source, move.record.destination)
                self._stage_done(move, now)
        if now >= self.next_tick:
            self.next_tick = now + self.settings.interval_s
            self._tick(now)

    def _tick(self, now: float) -> None:
        cluster = self.cluster
        busy = frozenset(i for m in self.active.values() for i in (m.record.source, m.record.destination))
        view = cluster.view()  # replicas in a pending decode run are seen as of now, not cut
        picks = self.policy.plan(view, self.candidates(now), busy)
        for rid, src, dst in picks:
            self._settle(now, src, dst)
            self.start(rid, src, dst, now)

    def _settle(self, now: float, *indices: int) -> None:
        for i in indices:
            self.cluster.members[i].replica.settle(now)

    def candidates(self, now: float) -> "Candidates":
        """Per live replica, its decoding requests not already moving (computed when the policy
        asks: it asks only about replicas it would take requests from)."""
        return Candidates(self, now)


    # -- one migration -----------------------------------------------------------------------------
    def start(self, request_id: str, source: int, destination: int, now: float) -> Optional[MigrationRecord]:
        """Starts moving ``request_id`` from replica ``source`` to ``destination`` (a decoding request
        there); returns its record (aborted at once when the handshake fails)."""
        members = self.cluster.members
        src, dst = members[source], members[destination]
        snap = moves.snapshot(src.replica.state, request_id)
        if snap is None or not snap.is_decoding or request_id in self.active or source == destination:
            raise ValueError(f"cannot migrate {request_id!r} from replica {source} to {destination}: "
                             "it must be a decoding request on the source, not already moving")
        record = MigrationRecord(request_id, source, destination, self.settings.mode, now, snap.num_computed)
        self.records.append(record)
        request = src.requests[request_id]
        if not dst.accepting:
            return self._abort_record(record, now, "destination not accepting")
        if self.settings.mode == "recompute":
            return self._recompute(record, request, now)
        if src.spec.kv.block_size != dst.spec.kv.block_size:
            return self._abort_record(record, now, "block sizes differ")
        try:
            dst.spec.executor.register(request)
        except ValueError as e:
            return self._abort_record(record, now, f"destination refused it: {e}")
        move = _Move(record, request)
        self.active[request_id] = move
        self._next_stage(move, now)
        return record

    def _next_stage(self, move: _Move, now: float) -> None:
        record = move.record
        src, dst = self.cluster.members[record.source], self.cluster.members[record.destination]
        bs = src.spec.kv.block_size
        snap = moves.snapshot(src.replica.state, record.request_id)
        if snap is None or not snap.is_decoding:
            return self._abort(move, now, "request left the source's running batch")
        full = snap.num_computed // bs
        final = (full - move.copied <= self.settings.final_stage_blocks or record.num_stages + 1 >= self.settings.max_stages)
        upto = moves.blocks_for(snap.num_computed, bs) if final else full
        try:
            dst.replica.replace_state(moves.reserve_incoming(dst.spec.scheduler, dst.replica.state, record.request_id,
                                                             upto - move.copied))  # fmt: skip
        except moves.MigrationRefused as e:
            return self._abort(move, now, f"handshake refused: {e}")
        src_blocks = snap.block_table[move.copied : upto]
        if final:
            # The source's state already holds its step in flight (if any): the request pauses
            # when that step ends, and the last copy starts then.
            now = max(now, src.replica.now)
            state, move.moving = moves.detach(src.spec.scheduler, src.replica.state, record.request_id)
            src.replica.replace_state(state)
            record.pause_s = now
        dst_blocks = dst.replica.state.incoming[record.request_id][move.copied : upto]
        move.ends_s = now + self._copy(src, dst, src_blocks, dst_blocks, record)
        move.copied = upto
        record.num_stages += 1

    def _copy(self, src, dst, src_blocks, dst_blocks, record: MigrationRecord) -> float:
        """Copies the blocks' KV; returns the stage's duration (measured for real KV, else modelled)."""
        copy = copy_blocks(src.spec, dst.spec, src_blocks, dst_blocks, self.settings.link)
        record.num_blocks += len(src_blocks)
        record.num_bytes += copy.num_bytes
        record.copy_s += copy.duration_s
        return copy.duration_s

    def _stage_done(self, move: _Move, now: float) -> None:
        if move.moving is None:
            return self._next_stage(move, now)
        record = move.record
        src, dst = self.cluster.members[record.source], self.cluster.members[record.destination]
        dst.replica.wait_until(now)
        dst.replica.replace_state(moves.attach(dst.spec.scheduler, dst.replica.state, move.moving))
        src.replica.replace_state(moves.release_outgoing(src.replica.state, record.request_id))
        src.spec.executor.release(record.request_id)
        self.cluster.moved(record.request_id, src, dst)
        del self.active[record.request_id]
        record.end_s, record.outcome = now, "done"

    def _abort(self, move: _Move, now: float, why: str, *, source_failed: bool = False) -> None:
        """Cancels a live migration: the destination's reservation goes, the source keeps (or, when
        detached, gets back) the request — unless the source failed, whose requests the cluster
        carries on as continuations."""
        record = move.record
        src, dst = self.cluster.members[record.source], self.cluster.members[record.destination]
        if dst.live:
            dst.replica.replace_state(moves.cancel_incoming(dst.replica.state, record.request_id))
        dst.spec.executor.release(record.request_id)
        if move.moving is not None and not source_failed:
            src.replica.replace_state(moves.attach(src.spec.scheduler, src.replica.state, move.moving, source=True))
        del self.active[record.request_id]
        self._abort_record(record, now, why)

    def _abort_record(self, record: MigrationRecord, now: float, why: str) -> MigrationRecord:
        record.end_s, record.outcome = now, f"aborted: {why}"
        return record

    def _recompute(self, record: MigrationRecord, request, now: float) -> MigrationRecord:
        """The baseline: abort on the source, continue on the destination from the prompt and the
        tokens generated so far (its KV recomputed there)."""
        cluster = self.cluster
        src, dst = cluster.members[record.source], cluster.members[record.destination]
        state = src.replica.state
        r = state.running.row_index(record.request_id)
        outputs = state.outputs.read(int(state.running.slot[r]), int(state.running.num_output[r]))
        src.replica.replace_state(src.spec.scheduler.abort(state, record.request_id, now))
        src.spec.executor.release(record.request_id)
        now = max(now, src.replica.now)  # it pauses when the source's step in flight ends
        cont = continuation(request, outputs, len(outputs), now)
        cluster.moved(record.request_id, src, None)
        record.pause_s = now
        if not dst.place(cont, now):
            record.end_s, record.outcome = now, "aborted: destination rejected the continuation"
            return record  # the log has the rejection; nothing is lost silently
        record.end_s, record.outcome = now, "done"
        return record

    # -- what the cluster tells it -----------------------------------------------------------------
    def replica_failed(self, index: int, now: float) -> dict[str, moves.MigratingRequest]:
        """Aborts every migration touching replica ``index``; returns the requests detached from it
        (in their last stage), which the cluster must carry on as the failed replica's."""
        lost = {}
        for rid in sorted(self.active):
            move = self.active[rid]
            if index == move.record.source:
                if move.moving is not None:
                    lost[rid] = move.moving
                self._abort(move, now, "source replica failed", source_failed=True)
            elif index == move.record.destination:
                self._abort(move, now, "destination replica failed")
        return lost

    def is_moving(self, request_id: str) -> bool:
        return request_id in self.active


class Candidates(Mapping):
    """Replica index -> its migratable ``Candidate`` requests as of ``now`` (lazily, cached). A
    replica in a pending decode run holds the same requests, each ``steps_started_by(now)``
    tokens further on."""

    def __init__(self, migrator: "Migrator", now: float):
        self._migrator, self._now, self._cache = migrator, now, {}
        self._live = [m.index for m in migrator.cluster.members if m.live]

    def __getitem__(self, index: int) -> tuple:
        if index not in self._cache:
            from jaxserve.cluster.migration_policy import Candidate

            replica, active = self._migrator.cluster.members[index].replica, self._migrator.active
            ahead = replica.steps_started_by(self._now)
            run = replica.state.running
            remaining = run.num_tokens - run.num_computed
            self._cache[index] = tuple(
                Candidate(rid, int(nc) + ahead, req.priority)
                for rid, req, nc, left in zip(run.ids, run.requests, run.num_computed.tolist(), remaining.tolist())
                if left == 1 and nc >= req.prompt_len and rid not in active
            )  # fmt: skip
        return self._cache[index]

    def __contains__(self, index) -> bool:
        return index in self._live

    def __iter__(self):
        return iter(self._live)

    def __len__(self) -> int:
        return len(self._live)


def fill_downtimes(records: list[MigrationRecord], log) -> None:
    """Sets each done migration's ``downtime_s`` from a ``FrozenLog``: its first token at or after
    the pause, minus the pause (None when it sampled nothing more)."""
    done = [r for r in records if r.outcome == "done" and r.pause_s is not None]
    if not done:
        return  # (no token sort for nothing: most runs migrate nothing)
    index = {info.request_id: i for i, info in enumerate(log.requests)}
    req, times = log.request_tokens()
    for r in done:
        i = index[r.request_id]
        lo, hi = np.searchsorted(req, i, "left"), np.searchsorted(req, i, "right")
        k = lo + np.searchsorted(times[lo:hi], r.pause_s, "right")
        r.downtime_s = float(times[k] - r.pause_s) if k < hi else None


def migration_metrics(records: list[MigrationRecord]) -> dict:
    """``num_migrations`` (done), aborts by reason, downtime mean/p50/p99 (s), bytes and copy time
    (downtimes from ``fill_downtimes``)."""
    done = [r for r in records if r.outcome == "done"]
    down = np.array([r.downtime_s for r in done if r.downtime_s is not None], np.float64)
    aborted: dict[str, int] = {}
    for r in records:
        if r.outcome.startswith("aborted"):
            why = r.outcome.split(": ", 1)[1].split(":")[0]
            aborted[why] = aborted.get(why, 0) + 1
    stats = None
    if len(down):
        stats = {"mean": float(down.mean()), "p50": float(np.percentile(down, 50)), "p99": float(np.percentile(down, 99))}
    return {
        "num_migrations": len(done),
        "num_migration_aborts": sum(aborted.values()),
        "migration_aborts": aborted,
        "migration_downtime_s": stats,
        "migrated_bytes": float(sum(r.num_bytes for r in done)),
        "migration_copy_s": float(sum(r.copy_s for r in done)),
    }
