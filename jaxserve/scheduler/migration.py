"""Moving a running request between two schedulers' states: the pure half of live migration.

Llumnix (Sun et al., OSDI'24) copies a decoding request's KV to another instance in stages while
it keeps decoding, pausing it only for the last stage. These functions are that protocol's moves on
scheduler states; the cluster (``jaxserve/cluster/migration.py``) sequences them in time and the
executors copy the KV contents.

* Destination: ``reserve_incoming`` takes free device blocks (and, the first time, a batch seat)
  for the request, stage by stage; they sit in ``state.incoming`` outside every block table.
  ``cancel_incoming`` gives them back (an aborted migration); ``attach`` turns them into the
  request's block table in the running batch (it decodes at the next step).
* Source: ``snapshot`` says what the request holds now; ``detach`` takes it out of the running batch
  for the last stage, its blocks kept in ``state.outgoing`` (nothing reads or frees them) until
  ``release_outgoing`` frees them once the copy is done — or ``attach(..., source=True)`` puts it
  back when the destination was lost mid-copy.

Only a decoding request moves (its prompt computed, one sampled token not yet fed back), between
states at a step boundary (no plan in flight), and only between pools of the same block size.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxserve.persistent import evolve
from jaxserve.request import Request
from jaxserve.scheduler.running import RunningBatch, row_from_seq
from jaxserve.scheduler.seq import SeqState


class MigrationRefused(ValueError):
    """The move is not possible now (no free blocks or seat, not a decoding request, ...)."""


class Snapshot(NamedTuple):
    """A running request on the source: tokens with KV, its block table, tokens generated."""

    num_computed: int
    block_table: tuple[int, ...]
    num_output: int
    is_decoding: bool  # all but the newest sampled token have KV


class MigratingRequest(NamedTuple):
    """A detached request: everything a destination needs to resume it."""

    request: Request
    outputs: tuple[int, ...]
    num_computed: int  # tokens whose KV the copied blocks hold (prompt + outputs - 1)
    block_hashes: tuple
    num_preemptions: int

    @property
    def request_id(self) -> str:
        return self.request.request_id


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _check_between_steps(state, what: str) -> None:
    if state.inflight is not None:
        raise MigrationRefused(f"{what} between a schedule() and its update(): migrate at a step boundary")


# -- source ---------------------------------------------------------------------------------------
def snapshot(state, request_id: str):
    """The request's KV holding now, or None when it is not in the running batch."""
    run = state.running
    r = run.row_index(request_id)
    if r is None:
        return None
    nc, nt = int(run.num_computed[r]), int(run.num_tokens[r])
    decoding = nt - nc == 1 and nc >= run.requests[r].prompt_len
    return Snapshot(nc, run.block_tables[r][: blocks_for(nc, state.kv.config.block_size)], int(run.num_output[r]), decoding)


def detach(sched, state, request_id: str) -> tuple[object, MigratingRequest]:
    """Takes a decoding request out of the running batch for the last copy; its blocks move to
    ``state.outgoing`` (held, not freed) and its token-buffer slot is released."""
    _check_between_steps(state, "detach")
    run = state.running
    r = run.row_index(request_id)
    snap = snapshot(state, request_id)
    if snap is None or not snap.is_decoding:
        raise MigrationRefused(f"request {request_id!r} is not a decoding request in the running batch")
    slot = int(run.slot[r])
    outputs = state.outputs.read(slot, snap.num_output)
    table = run.block_tables[r]
    keep, extra = table[: len(snap.block_table)], table[len(snap.block_table) :]
    pool = state.kv.device.free(reversed(extra)) if extra else state.kv.device
    moving = MigratingRequest(run.requests[r], outputs, snap.num_computed, run.block_hashes[r], int(run.num_preemptions[r]))
    new = evolve(
        state,
        kv=evolve(state.kv, device=pool),
        running=run.drop([r]),
        outputs=state.outputs.release([slot]),
        outgoing=state.outgoing.set(request_id, keep),
    )
    return new, moving


def release_outgoing(state, request_id: str):
    """Frees a detached request's blocks (its copy is done, or it finished elsewhere)."""
    return _free_held(state, "outgoing", request_id)


def _free_held(state, field: str, request_id: str):
    """Frees the blocks ``state.<field>`` holds for ``request_id`` (none: unchanged)."""
    held = getattr(state, field)
    blocks = held.get(request_id)
    if blocks is None:
        return state
    pool = state.kv.device.free(reversed(blocks))
    return evolve(state, kv=evolve(state.kv, device=pool), **{field: held.delete(request_id)})


# -- destination ----------------------------------------------------------------------------------
def reserve_incoming(sched, state, request_id: str, num_blocks: int):
    """``num_blocks`` more free blocks for ``request_id`` migrating in (the first call also takes a
    batch seat). ``MigrationRefused`` when the pool or the batch has no room; nothing changes then."""
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    held = state.incoming.get(request_id)
    if held is None:
        if sched.status(state, request_id) is not None:
            raise MigrationRefused(f"request {request_id!r} is already on this replica")
        if len(state.running) + len(state.incoming) >= sched.max_num_seqs:
            raise MigrationRefused(f"no batch seat for {request_id!r}: max_num_seqs={sched.max_num_seqs} taken")
        held = ()
    pool = state.kv.device
    if num_blocks > pool.num_free:
        raise MigrationRefused(f"{num_blocks} blocks asked for {request_id!r}, {pool.num_free} free")
    pool, blocks = pool.allocate(num_blocks) if num_blocks else (pool, ())
    return evolve(state, kv=evolve(state.kv, device=pool), incoming=state.incoming.set(request_id, held + blocks))


def cancel_incoming(state, request_id: str):
    """Gives back what ``reserve_incoming`` took for ``request_id`` (an aborted migration)."""
    return _free_held(state, "incoming", request_id)


def attach(sched, state, moving: MigratingRequest, *, source: bool = False):
    """The request joins the running batch on the blocks reserved for it (``state.incoming``; or,
    with ``source``, the blocks it left in ``state.outgoing``), which hold the KV of its first
    ``num_computed`` tokens; it decodes its next token at the next step. It arrives last in the
    batch's preemption order (a new ``seq_no``)."""
    _check_between_steps(state, "attach")
    rid = moving.request_id
    field = "outgoing" if source else "incoming"
    held = getattr(state, field).get(rid)
    bs = state.kv.config.block_size
    need = blocks_for(moving.num_computed, bs)
    if held is None or len(held) < need:
        raise MigrationRefused(f"request {rid!r} has {0 if held is None else len(held)} blocks {field}, needs {need}")
    table, extra = held[:need], held[need:]
    pool = state.kv.device.free(reversed(extra)) if extra else state.kv.device
    seq = SeqState(moving.request, state.next_seq_no, moving.outputs, len(moving.outputs),
                   moving.block_hashes if pool.enable_caching else (), moving.num_preemptions)  # fmt: skip
    outputs, (slot,) = state.outputs.take([moving.outputs])
    # The copied blocks are this request's own: never offered to the prefix cache (blocks filled
    # after the move are, with hashes chained over all its tokens).
    row = row_from_seq(seq, moving.num_computed, table, moving.num_computed // bs, sched.preempt_rank(moving.request), slot)
    running, _ = state.running.concat_sorted(RunningBatch.from_rows([row]))
    return evolve(
        state,
        kv=evolve(state.kv, device=pool),
        running=running,
        outputs=outputs,
        next_seq_no=state.next_seq_no + 1,
        **{field: getattr(state, field).delete(rid)},
    )
