"""StepBuilder: the shared mechanics of one ``schedule`` call.

Policies compose a step from these moves, in the order their paper prescribes:

* ``run_running(chunk)`` — give running requests their next tokens (decodes first, then ongoing
  prefill chunks), allocating blocks on demand and preempting the latest-arrived running request
  when blocks run out (by recompute or swap);
* ``admit_new(chunk, reserve)`` — admit waiting requests in queue order while the token
  budget, ``max_num_seqs`` and free blocks (less the watermark) allow; prefix-cache hits reuse
  blocks, and a fully cached prompt copy-on-writes its last block;
* ``swap_in(chunk)`` — bring swapped-out requests back;
* ``admit_waiting(chunk, reserve)`` — ``swap_in`` then ``admit_new``, never letting a new request
  overtake a swapped one (what most policies want);
* ``build()`` — the new state and the BatchPlan.

A builder is a local scratchpad inside one pure ``schedule`` call: it reads the input state, never
writes into it, and everything it produces is a fresh value. Running rows are sorted by arrival and
only ever preempted from the tail, so the rows that remain are always a prefix ``[0, live)``. Rows are
sorted by (preemption rank, arrival), so the tail is the latest arrival of the most preemptible rank.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxserve.persistent import evolve, pick
from jaxserve.kv.state import KVState
from jaxserve.plan import BatchPlan
from jaxserve.request import PLACEHOLDER_TOKEN_ID
from jaxserve.scheduler.caching import offer_generated_blocks
from jaxserve.scheduler.running import RunningBatch, _frozen, row_from_seq
from jaxserve.scheduler.seq import seq_tokens

ChunkFn = Callable[[int, int], int]


@dataclasses.dataclass(frozen=True)
class Inflight:
    """Which running rows the last plan scheduled: ``rows[i]`` ran as plan row ``entries[i]``."""

    step: int
    rows: np.ndarray
    entries: np.ndarray


class StepBuilder:
    def __init__(self, sched, state, token_budget: int):
        if state.inflight is not None:
            raise ValueError(
                f"schedule() called again before update() of step {state.inflight.step}: "
                "every schedule must be followed by exactly one update with its plan"
            )
        self.sched = sched
        self.state = state
        self.cfg = state.kv.config
        self.bs = self.cfg.block_size
        self.pool = state.kv.device
        self.host = state.kv.host
        self.waiting = state.waiting
        self.swapped = state.swapped
        self.outputs = state.outputs  # TokenBuffer
        self.run: RunningBatch = state.running
        self.num_incoming = len(state.incoming)  # seats reserved for requests migrating in
        self.live = len(self.run)  # rows [0, live) remain; the rest were preempted
        self.num_new = np.zeros(self.live, np.int64)
        self.tables: list | None = None  # copied on first change
        self.num_blocks: np.ndarray | None = None  # len(tables[r]), copied with tables
        self.budget = token_budget
        self.new_rows: list[dict] = []
        self.preempted: list[str] = []
        self.swapped_out: list[str] = []
        self.swapped_in: list[str] = []
        self.copy_blocks: list[tuple[int, int]] = []
        self.swap_out_blocks: list[tuple[int, int]] = []
        self.swap_in_blocks: list[tuple[int, int]] = []
        self.held = 0  # blocks a dry run_running set aside (``decodes_only``), not yet allocated

    # -- helpers -------------------------------------------------------------------------------
    @property
    def num_seqs(self) -> int:
        return self.live + len(self.new_rows) + self.num_incoming

    @property
    def has_room(self) -> bool:
        return self.budget > 0 and self.num_seqs < self.sched.max_num_seqs

    def _blocks_for(self, tokens):
        return -(-tokens // self.bs)

    def _table(self, r: int) -> tuple[int, ...]:
        return self.tables[r] if self.tables is not None else self.run.block_tables[r]

    def _set_table(self, r: int, table: tuple[int, ...]) -> None:
        if self.tables is None:
            self.tables = list(self.run.block_tables)
            self.num_blocks = self.run.num_blocks.copy()
        self.tables[r] = table
        self.num_blocks[r] = len(table)

    def _reserve(self) -> int:
        """Blocks admission must leave free (vLLM's watermark); none when nothing else runs, so a
        request that fits the cache alone can always start."""
        return int(self.sched.watermark * self.cfg.num_blocks) if self.num_seqs > 0 else 0

    # -- running requests ----------------------------------------------------------------------
    def run_running(self, chunk: ChunkFn) -> None:
        """Decodes of every running request first (never stalled by prefills), then the running
        prefills' next chunks in arrival order, within the token budget."""
        run = self.run
        if not self.live:
            return
        remaining = run.num_tokens[: self.live] - run.num_computed[: self.live]
        decodes = (remaining == 1).nonzero()[0]
        if len(decodes):
            self._run_decodes(decodes[: max(self.budget, 0)])
        for r in (remaining > 1).nonzero()[0].tolist():
            if r >= self.live or self.budget <= 0:
                break
            n = chunk(int(remaining[r]), self.budget)
            if n <= 0:
                break
            self._run_row(r, n)

    def _run_decodes(self, rows: np.ndarray) -> None:
        run = self.run
        # ``rows`` is sorted; when it is every live row, whole columns (slices) replace gathers.
        at = slice(0, len(rows)) if len(rows) == self.live else rows
        need = (run.num_computed[at] + self.bs) // self.bs - run.num_blocks[at]  # blocks for nc + 1 tokens
        grow = (need > 0).nonzero()[0]
        counts = need[grow]
        total = int(np.add.reduce(counts))  # (ufunc reduce: cheaper than .sum() on small arrays)
        if total > self.pool.num_free:  # someone must be preempted: go row by row
            for r in rows.tolist():
                if r < self.live:
                    self._run_row(r, 1)
            return
        if total:
            self.pool, blocks = self.pool.allocate(total)
            self._grow_tables(rows[grow], counts, blocks)
        self.num_new[at] = 1
        self.budget -= len(rows)

    def _grow_tables(self, rows: np.ndarray, counts: np.ndarray, blocks: tuple[int, ...]) -> None:
        """Appends ``blocks`` to the tables of ``rows`` (distinct), ``counts[i]`` to row i, in order."""
        if self.tables is None:
            self.tables = list(self.run.block_tables)
            self.num_blocks = self.run.num_blocks.copy()
        tables, k = self.tables, 0
        for r, m in zip(rows.tolist(), counts.tolist()):
            tables[r] = tables[r] + blocks[k : k + m]
            k += m
        self.num_blocks[rows] += counts

    def _run_row(self, r: int, n: int) -> bool:
        """Schedules ``n`` tokens for running row ``r``, preempting the rows after it (later
        arrivals, or higher preemption rank), or ``r`` itself when it is last, until its blocks
        fit. Returns whether ``r`` runs."""
        need = self._blocks_for(int(self.run.num_computed[r]) + n) - len(self._table(r))
        while need > self.pool.num_free:
            if self.live - 1 == r:
                self._preempt(r)
                return False
            self._preempt(self.live - 1)
        if need > 0:
            self.pool, blocks = self.pool.allocate(need)
            self._set_table(r, self._table(r) + blocks)
        self.num_new[r] = n
        self.budget -= n
        return True

    def _preempt(self, r: int) -> None:
        """Takes the tail row ``r`` (latest arrival of the highest preemption rank) out of the batch: swap it out when asked and the host has room,
        else free its blocks and requeue it for recompute."""
        assert r == self.live - 1, "only the latest-arrived live row is preempted"
        run, table = self.run, self._table(r)
        self.budget += int(self.num_new[r])
        self.num_new[r] = 0
        self.live -= 1
        num_computed = int(run.num_computed[r])
        slot = int(run.slot[r])
        generated = self.outputs.read(slot, int(run.num_output[r]))
        self.outputs = self.outputs.release([slot])
        self.pool, chain = offer_generated_blocks(run, self.pool, r, self.bs, generated)  # for its own recompute
        seq = run.seq_state(r, generated, num_preemptions=int(run.num_preemptions[r]) + 1, block_hashes=chain)
        keep = self._blocks_for(num_computed)
        if self.sched.preemption_mode == "swap" and self.host.can_allocate(keep):
            self.host, host_blocks = self.host.allocate(keep)
            self.swap_out_blocks.extend(zip(table[:keep], host_blocks))
            self.pool = self.pool.free(reversed(table))
            seq = seq._replace(num_computed=num_computed, host_blocks=host_blocks)
            self.swapped = self.swapped.push((seq.seq_no,), seq.request_id, seq)
            self.swapped_out.append(seq.request_id)
            return
        self.pool = self.pool.free(reversed(table))
        self.waiting = self.sched.order.push(self.waiting, seq, is_arrival=False)
        self.preempted.append(seq.request_id)

    # -- new requests --------------------------------------------------------------------------
    def admit_waiting(self, chunk: ChunkFn, *, reserve: str = "prompt") -> None:
        """Swapped-out requests come back first (unless this step just preempted); new requests are
        admitted only once none is left swapped out, so a swapped request is never overtaken."""
        if self.swapped and not (self.preempted or self.swapped_out):
            self.swap_in(chunk)
        if not self.swapped:
            self.admit_new(chunk, reserve=reserve)

    def admit_new(self, chunk: ChunkFn, *, reserve: str = "prompt") -> None:
        """Admits waiting requests in queue order until one does not fit (no skipping ahead);
        nothing when this step preempted.

        ``reserve`` is what admission allocates blocks for: "prompt" (every pending prompt token,
        even when only a first chunk runs now, as vLLM's block manager does) or "full" (prompt +
        max_new_tokens up front: Orca, static batching).
        """
        if reserve not in ("prompt", "full"):
            raise ValueError(f"admit_new: reserve must be 'prompt' or 'full', got {reserve!r}")
        if self.preempted or self.swapped_out:
            return  # memory just ran out: admitting more would only thrash (as vLLM does)
        order = self.sched.order
        while self.has_room:
            seq = order.peek(self.waiting)
            if seq is None:
                return
            fit = self._admission(seq, chunk, reserve)
            if fit is None:
                return
            hits, kept, num_computed, n, need, copy, fully_cached = fit
            pool = self.pool.acquire(hits)
            pool, blocks = pool.allocate(need)
            if copy:
                self.copy_blocks.append((hits[-1], blocks[0]))
                pool = pool.free([hits[-1]])
            elif fully_cached:
                pool = pool.uncache(hits[-1])
            self.pool = pool
            self.waiting = order.on_admit(order.pop(self.waiting), seq)
            self.outputs, (slot,) = self.outputs.take([seq.outputs])
            row = row_from_seq(
                seq, num_computed, kept + blocks, len(hits) - fully_cached, self.sched.preempt_rank(seq.request), slot
            )
            row["num_new"] = n
            self.new_rows.append(row)
            self.budget -= n

    def _admission(self, seq, chunk: ChunkFn, reserve: str):
        """How ``admit_new`` would admit the waiting ``seq`` now: ``(hits, kept, num_computed, n,
        need, copy, fully_cached)`` (prefix-cache hits, the hits it keeps, tokens already computed,
        tokens to compute now, blocks to allocate, whether the last hit is copied, whether every
        token was cached); None when it does not fit (budget, or free blocks less the watermark)."""
        total = seq.num_tokens
        hits = self.pool.match_prefix(seq.block_hashes)
        num_computed = len(hits) * self.bs
        # A fully cached sequence still computes its last token, which writes into the last
        # hit block: take that block over when nobody else uses it, else copy it (CoW).
        fully_cached = num_computed == total
        copy = fully_cached and not self.pool.is_evictable(hits[-1])
        if fully_cached:
            num_computed -= 1
        n = chunk(total - num_computed, self.budget)
        if n <= 0:
            return None
        kept = hits[:-1] if copy else hits
        target = total if reserve == "prompt" else seq.request.max_total_tokens
        need = self._blocks_for(target) - len(kept)
        available = self.pool.num_free - self.held
        if kept:  # (prefix-cache hits only: acquiring an evictable hit takes it off the free list)
            available -= self.pool.num_evictable_in(kept)
        if need + self._reserve() > available:
            return None
        return hits, kept, num_computed, n, need, copy, fully_cached

    def swap_in(self, chunk: ChunkFn) -> None:
        """Brings swapped-out requests back in arrival order while their blocks fit."""
        while self.has_room and self.swapped:
            seq = self.swapped.peek()
            fit = self._swap_fit(seq, chunk)
            if fit is None:
                return
            n, need = fit
            self.pool, blocks = self.pool.allocate(need)
            self.swap_in_blocks.extend(zip(seq.host_blocks, blocks))
            self.host = self.host.free(seq.host_blocks)
            self.swapped = self.swapped.pop()
            self.outputs, (slot,) = self.outputs.take([seq.outputs])
            row = row_from_seq(seq, seq.num_computed, blocks, 0, self.sched.preempt_rank(seq.request), slot)
            row["num_new"] = n
            self.new_rows.append(row)
            self.swapped_in.append(seq.request_id)
            self.budget -= n

    def _swap_fit(self, seq, chunk: ChunkFn):
        """``(tokens to compute now, blocks to allocate)`` to swap ``seq`` back in now, or None
        when it does not fit (budget, or free blocks less the watermark)."""
        n = chunk(seq.num_tokens - seq.num_computed, self.budget)
        need = self._blocks_for(seq.num_computed + n)
        if n <= 0 or need + self._reserve() > self.pool.num_free - self.held:
            return None
        return n, need

    # -- dry runs: would a move do only decodes? (the fast path asks, instead of scheduling) ----
    def decodes_only(self) -> bool:
        """A dry ``run_running``: whether it would give every running row its next token and do
        nothing else (each row has exactly one token pending, the budget covers them all and their
        new blocks are free, so nobody is preempted). If so, the budget is charged as it would be
        and the blocks set aside (``held``: fit tests count them as taken; allocated only when a
        prefix cache makes ``would_admit`` look at the pool's content)."""
        run, live = self.run, self.live
        if not live or live > self.budget:
            return False
        nc = run.num_computed
        if np.count_nonzero(run.num_tokens - nc - 1):  # a row with a prefill chunk pending
            return False
        need = (nc + self.bs) // self.bs - run.num_blocks  # blocks for nc + 1 tokens, as _run_decodes
        total = int(np.add.reduce(np.maximum(need, 0)))
        if total > self.pool.num_free:
            return False
        self.budget -= live
        self.held = total
        return True

    def would_admit(self, chunk: ChunkFn, *, reserve: str = "prompt") -> bool:
        """A dry ``admit_new``: whether it would admit the queue head now. Nothing is admitted;
        blocks ``held`` by ``decodes_only`` are allocated first when the head must be checked (so
        prefix hits and free blocks are those ``admit_new`` would see after ``run_running``)."""
        if self.preempted or self.swapped_out or not self.has_room:
            return False
        seq = self.sched.order.peek(self.waiting)
        if seq is None:
            return False
        self._take_held()
        return self._admission(seq, chunk, reserve) is not None

    def would_swap_in(self, chunk: ChunkFn) -> bool:
        """A dry ``swap_in``: whether it would bring the first swapped-out request back now."""
        if not (self.has_room and self.swapped):
            return False
        self._take_held()
        return self._swap_fit(self.swapped.peek(), chunk) is not None

    def _take_held(self) -> None:
        # Without a prefix cache, free blocks less ``held`` is all a fit test reads: no allocation
        # (which would fork the pool's versions and cost a reroot when the real step allocates).
        # With one, allocating may evict cached blocks that prefix matching must no longer see.
        if self.held and self.pool.enable_caching:
            self.pool, _ = self.pool.allocate(self.held)
            self.held = 0

    # -- result --------------------------------------------------------------------------------
    def build(self):
        """Returns ``(new_state, plan)``."""
        run, live, state = self.run, self.live, self.state
        run = run.head(live)
        nc_before = run.num_computed
        num_new = self.num_new[:live]
        if self.tables is None:
            run = run.advance(num_new)
        else:
            tables = self.tables if live == len(self.tables) else self.tables[:live]
            run = run.advance(num_new, tuple(tables), self.num_blocks[:live])
        if self.new_rows:
            new = RunningBatch.from_rows(
                [dict(r, num_computed=r["num_computed"] + r["num_new"]) for r in self.new_rows]
            )
            run, perm = run.concat_sorted(new)
            new_n = np.array([r["num_new"] for r in self.new_rows], np.int64)
            num_new = np.concatenate([num_new, new_n])
            if perm is not None:
                num_new = num_new[perm]
            nc_before = run.num_computed - num_new
        rows = num_new.nonzero()[0]
        if len(rows) == len(run):  # every row runs (the usual decode step): no gathers
            plan = self._plan(run, rows, slice(None), np.ascontiguousarray(nc_before), num_new)
        else:
            plan = self._plan(run, rows, rows, nc_before[rows], num_new[rows])
        new_state = evolve(
            state,
            kv=KVState(self.cfg, self.pool, self.host),
            waiting=self.waiting,
            swapped=self.swapped,
            running=run,
            outputs=self.outputs,
            step=state.step + 1,
            inflight=Inflight(plan.step, rows, np.arange(len(rows))),
            finished=(),
        )
        return new_state, plan

    def _plan(self, run: RunningBatch, rows: np.ndarray, at, nc: np.ndarray, n: np.ndarray) -> BatchPlan:
        """The plan of ``rows`` of ``run``; ``at`` indexes those rows' columns (``rows`` itself, or a
        slice when ``rows`` is every row) and ``nc``, ``n`` are their columns before this step."""
        everyone = len(rows) == len(run)
        row_list = rows.tolist()
        ids = run.ids if everyone else pick(run.ids, row_list)
        tables = run.block_tables if everyone else pick(run.block_tables, row_list)
        samples = nc + n == run.num_tokens[at]
        newest = samples & (n == 1)  # decodes: the input is the newest known token
        num_decodes = np.count_nonzero(newest)
        if num_decodes == len(newest):
            token_ids = run.last_token[at].astype(np.int32)
        else:
            # Each decode row's newest token, with the other rows' segments spliced in (a step has
            # few of those: the prefill chunks).
            newest_ids = run.last_token[at].astype(np.int32)
            pieces, done = [], 0
            for i in (~newest).nonzero()[0].tolist():
                r = row_list[i]
                segment = segment_ids(run, r, self.outputs, nc.item(i), nc.item(i) + n.item(i))
                pieces += (newest_ids[done:i], segment)
                done = i + 1
            pieces.append(newest_ids[done:])
            token_ids = np.concatenate(pieces)
        # Built as BatchPlan(...) would be, with what the plan would derive (its decode rows are
        # ``newest``) known here already.
        return BatchPlan.built(
            request_ids=ids,
            num_computed_tokens=nc,
            num_new_tokens=n,
            samples_token=samples,
            block_tables=tables,
            token_ids=token_ids,
            block_size=self.bs,
            step=self.state.step,
            preempted=tuple(self.preempted),
            swapped_out=tuple(self.swapped_out),
            swapped_in=tuple(self.swapped_in),
            copy_blocks=tuple(self.copy_blocks),
            swap_out_blocks=tuple(self.swap_out_blocks),
            swap_in_blocks=tuple(self.swap_in_blocks),
            is_decode=_frozen(newest),
            num_decode_tokens=int(num_decodes),
        )


def segment_ids(run: RunningBatch, r: int, outputs, start: int, stop: int) -> np.ndarray:
    """int32 ids of tokens ``[start, stop)`` of running row ``r`` (its generated ids in TokenBuffer
    ``outputs``): prompt ids (placeholders for a length-only prompt), then generated ids, which
    only a recompute after a preemption reaches."""
    req = run.requests[r]
    if stop > req.prompt_len:
        num_output = run.num_output.item(r)
        generated = outputs.read(run.slot.item(r), num_output)
        return np.array(seq_tokens(req, generated, num_output, start, stop), np.int32)
    if req.has_real_tokens:
        return req.prompt_array[start:stop]
    return np.full(stop - start, PLACEHOLDER_TOKEN_ID, np.int32)
