"""Invariant checks shared by the scheduler tests (property and scenario tests).

``Checker`` watches a run step by step (plug ``checker.on_step`` into ``driver.drive``, or use
``run_checked``) and asserts the contracts of DESIGN.md:

* KV accounting: refcounts equal block-table occupancy, no over-commit, sharing only of cached
  prefix blocks, host blocks owned by exactly one swapped request (``check_kv``);
* freed-page hygiene: a block new to a table was free or is a cache hit / copy / swap-in target;
* exclusive writes: every block a step writes into belongs to that row alone and caches nothing;
* KV contents (``KVContents``): every position a row's attention reads holds the KV of exactly the
  right token prefix, after the plan's swap-outs, swap-ins and copies are applied as an executor
  would: this is what catches a swap-in to the wrong blocks or a bad cache hit;
* exactly-once computation of every token per (re)computation, budgets, purity of schedule/update;
* aborts (``aborts`` of the run): the target left the scheduler, its device blocks lost exactly its
  references, its host blocks were freed, nobody else changed, the pending plan rows still line
  up; an abort of a finished or unknown id changes nothing.

Each checker counts the paths it saw verified in ``paths`` (see ``PATHS``), so tests can assert
that their workloads exercised what they claim to.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

# The paths a Checker counts (in Checker.paths), each only once its invariants were verified.
PATHS = (
    "preempt-recompute",  # a running request lost its blocks and went back to the waiting queue
    "preempt-swap",  # a running request's KV went to host blocks
    "swap-in",  # a swapped request's KV came back from host blocks
    "copy-on-write",  # a fully cached prompt's last block, shared with another request, was copied
    "prefix-hit",  # an admitted request started after a prefix of cached blocks
    "abort-waiting",  # abort of a request waiting for its first admission
    "abort-preempted",  # abort of a request waiting again after a recompute preemption
    "abort-swapped",  # abort of a swapped-out request (holding host blocks)
    "abort-running",  # abort of a running request (holding device blocks)
    "abort-finished",  # abort of a finished (or already aborted) id: a no-op
    "abort-unknown",  # abort of an id the scheduler never saw (yet): a no-op
)
REAL_ABORTS = ("waiting", "preempted", "swapped", "running")  # request states an abort can hit
NOOP_ABORTS = ("finished", "unknown")


def plan_key(plan):
    """Everything observable in a plan, as a comparable value."""
    return (
        plan.step,
        plan.request_ids,
        tuple(plan.num_computed_tokens.tolist()),
        tuple(plan.num_new_tokens.tolist()),
        tuple(plan.samples_token.tolist()),
        plan.block_tables,
        tuple(plan.token_ids.tolist()),
        plan.preempted,
        plan.swapped_out,
        plan.swapped_in,
        plan.copy_blocks,
        plan.swap_out_blocks,
        plan.swap_in_blocks,
    )


def state_key(sched, state):
    """The observable content of a scheduler state, as a comparable value."""
    run = state.running
    outputs = state.running_outputs()
    return (
        run.ids,
        run.nums.tobytes(),
        outputs,
        run.block_tables,
        run.block_hashes,
        tuple((q.request_id, q.outputs[: q.num_output]) for q in sched.waiting_requests(state)),
        tuple((q.request_id, q.outputs[: q.num_output], q.host_blocks) for q in state.swapped.sorted_items()),
        state.finished,
        tuple(sorted(state.kv.device.refcounts.items())),
        tuple(sorted(state.kv.host.refcounts.items())),
    )


def live_tables(state):
    return dict(zip(state.running.ids, state.running.block_tables))


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def check_kv(state):
    """Pool invariants, refcounts == table occupancy, sharing only of cached prefix blocks, each
    host block owned by one swapped request, running rows sorted by (rank, arrival)."""
    pool = state.kv.device
    pool.check()
    state.kv.host.check()
    occupancy = collections.Counter()
    positions = collections.defaultdict(set)
    for rid, table in live_tables(state).items():
        assert len(set(table)) == len(table), f"{rid} holds a block twice: {table}"
        for k, b in enumerate(table):
            occupancy[b] += 1
            positions[b].add(k)
    assert dict(occupancy) == dict(pool.refcounts.items()), "refcounts differ from block-table occupancy"
    assert pool.num_used + pool.num_free <= pool.num_blocks, "KV over-committed"
    for b, count in occupancy.items():
        if count > 1:
            assert b in pool.block_hash, f"block {b} shared by {count} tables but not a cached prefix block"
            assert len(positions[b]) == 1, f"shared block {b} at different table positions"
    host_owned = collections.Counter(b for seq in state.swapped.sorted_items() for b in seq.host_blocks)
    assert all(c == 1 for c in host_owned.values()), "host block shared"
    assert dict(host_owned) == dict(state.kv.host.refcounts.items()), "host blocks leaked or lost"
    keys = list(zip(state.running.rank.tolist(), state.running.seq_no.tolist()))
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "running batch not sorted by (rank, arrival)"


def request_state(sched, state, request_id):
    """Where the scheduler holds ``request_id``: "running", "waiting" (never admitted or swapped),
    "preempted" (waiting again after a recompute preemption), "swapped", or None."""
    if state.running.row_index(request_id) is not None:
        return "running"
    if request_id in state.swapped:
        return "swapped"
    for seq in sched.waiting_requests(state):
        if seq.request_id == request_id:
            return "preempted" if seq.num_preemptions else "waiting"
    return None


def requests_by_state(sched, state):
    """``{state: [request ids]}`` for the states of ``request_state`` (every key present)."""
    out = {kind: [] for kind in REAL_ABORTS}
    out["running"] = list(state.running.ids)
    out["swapped"] = [seq.request_id for seq in state.swapped.sorted_items()]
    for seq in sched.waiting_requests(state):
        out["preempted" if seq.num_preemptions else "waiting"].append(seq.request_id)
    return out


class KVContents:
    """A model of what the KV cache holds: for each slot of each device and host block, the id of
    the token prefix whose KV it stores (-1: nothing valid). ``apply(plan)`` does what an executor
    does (swap-outs, swap-ins, copies, then the rows' writes) and then checks that every position
    each row reads, ``[0, num_computed + num_new)``, holds the KV of that row's own prefix."""

    def __init__(self, kv_config, truth: dict):
        self.bs = kv_config.block_size
        self.device = np.full((kv_config.num_blocks, self.bs), -1, np.int64)
        self.host = np.full((max(kv_config.num_host_blocks, 1), self.bs), -1, np.int64)
        intern: dict = {}
        self.prefix_ids = {}  # request id -> id of tokens[: p + 1] for each position p
        for rid, tokens in truth.items():
            ids, prev = [], -1
            for t in tokens:
                prev = intern.setdefault((prev, t), len(intern))
                ids.append(prev)
            self.prefix_ids[rid] = np.array(ids, np.int64)

    def apply(self, plan) -> None:
        bs = self.bs
        for pairs, src, dst in (
            (plan.swap_out_blocks, self.device, self.host),
            (plan.swap_in_blocks, self.host, self.device),
            (plan.copy_blocks, self.device, self.device),
        ):
            for a, b in pairs:
                dst[b] = src[a]
        rows = []
        for i, rid in enumerate(plan.request_ids):
            nc, n = int(plan.num_computed_tokens[i]), int(plan.num_new_tokens[i])
            table = np.asarray(plan.block_tables[i], np.int64)
            assert len(table) >= blocks_for(nc + n, bs), f"{rid}: table too short for {nc + n} tokens"
            pos = np.arange(nc + n)
            where = (table[pos // bs], pos % bs)
            self.device[where[0][nc:], where[1][nc:]] = self.prefix_ids[rid][nc : nc + n]
            rows.append((rid, where, nc + n))
        for rid, (blocks, slots), end in rows:  # after every write: nobody clobbered what a row reads
            got, want = self.device[blocks, slots], self.prefix_ids[rid][:end]
            if not np.array_equal(got, want):
                p = int(np.flatnonzero(got != want)[0])
                raise AssertionError(
                    f"step {plan.step}: {rid} reads block {int(blocks[p])} slot {int(slots[p])} for position {p}, "
                    f"which does not hold that position's KV"
                )


@dataclasses.dataclass
class Checker:
    """Watches a run step by step (``on_step``) and asserts the invariants of this module; counts
    in ``paths`` each path it saw and verified (see PATHS), and keeps the ids it saw aborted."""

    scheduler: object
    token_budget: int | None = None  # max tokens per step (None: unchecked)
    check_purity: bool = True
    requests: dict | None = None  # request id -> Request: check token ids and KV contents
    token_fn: object = None  # the driver's token function (request id, index) -> token
    aborts: dict = dataclasses.field(default_factory=dict)  # the driver's aborts {step: [ids]}
    kv_config: object = None  # needed for the KV-content model (with ``requests``)
    paths: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    aborted: set = dataclasses.field(default_factory=set)  # ids removed by a (real) abort
    finished: set = dataclasses.field(default_factory=set)  # ids finished so far
    # per request: next token position it must compute (None: not running / must restart)
    position: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.truth = {}
        if self.requests is not None:
            for rid, req in self.requests.items():
                gen = [self.token_fn(rid, j) for j in range(req.sampling.max_new_tokens)]
                self.truth[rid] = list(req.prompt_token_ids) + gen
        self.contents = KVContents(self.kv_config, self.truth) if self.requests and self.kv_config else None

    def on_step(self, rec):
        before, scheduled, plan, after = rec.before, rec.scheduled, rec.plan, rec.after
        plan.validate()
        sched = self.scheduler
        if self.check_purity:
            # The same state gives the same plan, and scheduling did not touch `before`.
            again_state, again = sched.schedule(before, float(plan.step))
            assert plan_key(again) == plan_key(plan), "schedule() is not deterministic"
            assert again_state.step == scheduled.step
            # Updating an older state again (a fork) neither differs nor disturbs the newer one.
            snapshot = state_key(sched, after)
            redo = sched.update(rec.pre_update, plan, rec.out, float(plan.step))
            assert state_key(sched, redo) == snapshot, "update() is not deterministic"
            assert state_key(sched, after) == snapshot, "update() of an old state changed a newer state"
        check_kv(scheduled)
        check_kv(after)
        self._check_plan(before, scheduled, plan)
        if self.contents is not None:
            self.contents.apply(plan)
        self._check_aborts(rec, self.aborts.get(plan.step, ()))
        for f in after.finished:
            assert f.request_id not in self.aborted, f"{f.request_id} finished after it was aborted"
            self.finished.add(f.request_id)
        if plan.is_empty and before.has_unfinished:
            raise AssertionError(f"step {plan.step}: empty plan while requests are pending (deadlock)")

    # -- the plan --------------------------------------------------------------------------------
    def _check_plan(self, before, scheduled, plan):
        bs = plan.block_size
        assert plan.num_seqs <= self.scheduler.max_num_seqs
        if self.token_budget is not None:
            assert plan.num_tokens <= self.token_budget, f"{plan.num_tokens} tokens > budget {self.token_budget}"
        prev_tables = live_tables(before)
        prev_pool = before.kv.device
        prev_rows = {rid: i for i, rid in enumerate(before.running.ids)}
        prev_referenced = set(prev_pool.refcounts.keys())
        for rid in plan.preempted + plan.swapped_out:  # victims' blocks may be reused at once
            prev_referenced -= set(prev_tables.get(rid, ()))
        cow_dst = {dst for _, dst in plan.copy_blocks}
        swap_in_dst = {dst for _, dst in plan.swap_in_blocks}
        self._check_victims(scheduled, plan, prev_tables)
        for i, rid in enumerate(plan.request_ids):
            nc = int(plan.num_computed_tokens[i])
            n = int(plan.num_new_tokens[i])
            table = plan.block_tables[i]
            row = scheduled.running.ids.index(rid)
            total_known = int(scheduled.running.num_tokens[row])
            assert nc + n <= total_known, f"{rid} computes tokens that are not known yet"
            assert bool(plan.samples_token[i]) == (nc + n == total_known), f"{rid}: samples_token wrong"
            # Exactly once: continue where the last step stopped, or (re)start at a cached prefix.
            expected = self.position.get(rid)
            if rid in prev_rows and rid not in plan.swapped_in:
                if expected is not None:
                    assert nc == expected, f"{rid}: computes from {nc}, expected {expected} (gap or overlap)"
                old = prev_tables[rid]
                assert table[: len(old)] == old, f"{rid}: block table shrank or changed"
            elif rid in plan.swapped_in:
                assert expected is not None and nc == expected, f"{rid}: swap-in resumed at {nc}, expected {expected}"
                self.paths["swap-in"] += 1
            else:
                # admission: start at 0, at a block-aligned cache hit, or one token before a full hit
                assert nc == 0 or nc % bs == 0 or (nc + 1) % bs == 0 and nc + 1 == total_known, (
                    f"{rid}: admitted at {nc}"
                )
                assert nc < total_known
                if nc > 0:
                    self.paths["prefix-hit"] += 1
            self.position[rid] = nc + n
            if self.requests is not None:
                got = plan.token_ids[plan.cu_q_lens[i] : plan.cu_q_lens[i + 1]].tolist()
                assert got == self.truth[rid][nc : nc + n], f"{rid}: wrong token ids for [{nc}, {nc + n})"
            # Exclusive writes: the blocks this step writes into are this row's alone and uncached.
            for b in table[nc // bs : blocks_for(nc + n, bs)]:
                assert scheduled.kv.device.refcount(b) == 1, f"{rid} writes into block {b}, which others hold"
                assert b not in scheduled.kv.device.block_hash, f"{rid} writes into cached block {b}"
            # Freed-page hygiene: a block new to this table was free or is a cache hit.
            old_len = len(prev_tables.get(rid, ())) if rid not in plan.swapped_in else 0
            for k in range(old_len, len(table)):
                b = table[k]
                written_here = k * bs >= nc  # every token of block k is (re)written by this or later steps
                if b in prev_referenced and b not in before.kv.device.block_hash:
                    raise AssertionError(f"{rid}: got block {b}, which another request still held")
                if not written_here and b not in cow_dst and b not in swap_in_dst:
                    cached_hash = prev_pool.block_hash.get(b)
                    chain = scheduled.running.block_hashes[row]
                    assert cached_hash is not None and k < len(chain) and chain[k] == cached_hash, (
                        f"{rid}: reads block {b} at position {k} without writing it and it is no cache hit"
                    )
        self._check_copies(before, scheduled, plan)

    def _check_victims(self, scheduled, plan, prev_tables):
        """Preempted requests wait (and will restart from a cached prefix or 0); swapped-out ones
        hold host copies of exactly their computed blocks and resume where they stopped."""
        bs = plan.block_size
        out_pairs = list(plan.swap_out_blocks)  # the victims' pairs, one victim after the other
        for rid in plan.preempted:
            assert rid not in plan.request_ids, f"{rid} preempted and scheduled in one step"
            assert request_state(self.scheduler, scheduled, rid) == "preempted", f"{rid} preempted but not waiting"
            self.position[rid] = None
            self.paths["preempt-recompute"] += 1
        for rid in plan.swapped_out:
            assert rid not in plan.request_ids, f"{rid} swapped out and scheduled in one step"
            seq = scheduled.swapped.get(rid)
            assert seq is not None, f"{rid} swapped out but not in the swapped queue"
            assert seq.num_computed == self.position[rid], f"{rid}: swapped out at {seq.num_computed}, computed {self.position[rid]}"
            kept = prev_tables[rid][: blocks_for(seq.num_computed, bs)]
            assert len(seq.host_blocks) == len(kept) > 0, f"{rid}: {len(seq.host_blocks)} host blocks for {len(kept)}"
            mine, out_pairs = out_pairs[: len(kept)], out_pairs[len(kept) :]
            assert mine == list(zip(kept, seq.host_blocks)), f"{rid}: swap-out pairs {mine} disagree"
            self.paths["preempt-swap"] += 1
        assert not out_pairs, f"swap-out pairs {out_pairs} of no swapped-out request"

    def _check_copies(self, before, scheduled, plan):
        """Copy-on-write: the source is a cached block another running request holds at the same
        position; the copy is a block of the admitted request alone, in the source's place."""
        tables = live_tables(scheduled)
        for src, dst in plan.copy_blocks:
            owners = [rid for rid, t in tables.items() if dst in t]
            assert len(owners) == 1, f"copy target {dst} held by {owners}"
            (rid,) = owners
            k = tables[rid].index(dst)
            assert src not in tables[rid], f"{rid} keeps copy source {src}"
            sharers = [r for r, t in tables.items() if k < len(t) and t[k] == src]
            assert sharers, f"{rid} copied block {src}, which nobody else holds (no need to copy)"
            cached = before.kv.device.block_hash.get(src)
            chain = scheduled.running.block_hashes[scheduled.running.ids.index(rid)]
            assert cached is not None and k < len(chain) and chain[k] == cached, f"{rid} copied {src}, no cache hit"
            self.paths["copy-on-write"] += 1

    # -- aborts ------------------------------------------------------------------------------------
    def _abort_kinds(self, state, rids) -> dict:
        """What each aborted id was when the step's aborts began: a state of REAL_ABORTS, or
        "finished" (finished, aborted before, or listed twice) or "unknown"."""
        kinds = {}
        for rid in rids:
            if rid in kinds:
                continue  # the second abort of an id in one step finds it gone
            kind = request_state(self.scheduler, state, rid)
            if kind is None:
                kind = "finished" if rid in self.finished or rid in self.aborted else "unknown"
            kinds[rid] = kind
        return kinds

    def _check_aborts(self, rec, rids):
        """The aborts of this step took exactly their targets out and freed exactly their blocks;
        aborts of finished or unknown ids changed nothing."""
        if not rids:
            return
        sched, S, A = self.scheduler, rec.scheduled, rec.pre_update
        kinds = self._abort_kinds(S, rids)
        real = {rid for rid, kind in kinds.items() if kind in REAL_ABORTS}
        check_kv(A)
        if not real:
            assert state_key(sched, A) == state_key(sched, S), f"no-op abort of {sorted(kinds)} changed the state"
            assert _inflight_key(A) == _inflight_key(S), f"no-op abort of {sorted(kinds)} changed the pending plan"
        for rid in real:
            assert sched.status(A, rid) is None, f"abort({rid!r}) left it {request_state(sched, A, rid)}"
        _check_only_targets_left(sched, S, A, real)
        _check_blocks_freed(S, A, real)
        self._check_inflight(rec, real)
        for rid in real:
            assert sched.status(rec.after, rid) is None, f"{rid} came back after its abort"
        held = {**{r: bool(t) for r, t in live_tables(S).items()},
                **{q.request_id: bool(q.host_blocks) for q in S.swapped.sorted_items()}}
        for rid, kind in kinds.items():
            if kind == "running":
                assert held[rid], f"running {rid} held no blocks"
            if kind == "swapped" and not held[rid]:
                continue  # nothing on the host to free: not the path we want to count
            self.paths[f"abort-{kind}"] += 1
        self.aborted |= real

    def _check_inflight(self, rec, real):
        """After aborts, the pending plan's rows still name the same requests as its entries."""
        A, plan = rec.pre_update, rec.plan
        if rec.scheduled.inflight is None:
            return
        inflight = A.inflight
        assert inflight is not None, "abort dropped the pending plan"
        got = [A.running.ids[r] for r in inflight.rows.tolist()]
        assert got == [plan.request_ids[e] for e in inflight.entries.tolist()], "abort broke the pending plan rows"
        assert set(got) == set(plan.request_ids) - real, "abort left rows of the pending plan out (or in)"


def _check_only_targets_left(sched, S, A, real):
    """Between states S and A (before and after aborts of ``real``), every other running,
    waiting and swapped request stayed as it was, in its place."""
    S_tables = live_tables(S)
    assert live_tables(A) == {r: t for r, t in S_tables.items() if r not in real}, "abort changed other running requests"
    assert A.running.ids == tuple(r for r in S.running.ids if r not in real), "abort reordered the running batch"
    assert [q.request_id for q in sched.waiting_requests(A)] == [
        q.request_id for q in sched.waiting_requests(S) if q.request_id not in real
    ], "abort changed the waiting queue beyond its targets"
    assert [(q.request_id, q.host_blocks) for q in A.swapped.sorted_items()] == [
        (q.request_id, q.host_blocks) for q in S.swapped.sorted_items() if q.request_id not in real
    ], "abort changed the swapped queue beyond its targets"


def _check_blocks_freed(S, A, real):
    """Device blocks lost exactly the aborted tables' references (shared prefix blocks keep the
    others'); the aborted swapped requests' host blocks are free."""
    S_tables = live_tables(S)
    want = collections.Counter(dict(S.kv.device.refcounts.items()))
    want.subtract(b for r in real if r in S_tables for b in S_tables[r])
    assert dict(A.kv.device.refcounts.items()) == {b: c for b, c in want.items() if c}, "abort: device refcounts"
    freed = {b for q in S.swapped.sorted_items() if q.request_id in real for b in q.host_blocks}
    assert not freed & set(A.kv.host.refcounts), "abort: host blocks not freed"
    assert dict(A.kv.host.refcounts.items()) == {b: c for b, c in S.kv.host.refcounts.items() if b not in freed}
    assert A.kv.host.num_used == S.kv.host.num_used - len(freed), "abort: host blocks not freed"


def _inflight_key(state):
    f = state.inflight
    return None if f is None else (f.step, f.rows.tolist(), f.entries.tolist())


def run_checked(scheduler, kv, requests, *, token_budget=None, check_purity=True, check_tokens=True, **drive_kwargs):
    from jaxserve.scheduler.driver import constant_token, drive

    token_fn = drive_kwargs.setdefault("token_fn", constant_token())
    checker = Checker(
        scheduler,
        token_budget=token_budget,
        check_purity=check_purity,
        requests={r.request_id: r for r in requests} if check_tokens else None,
        token_fn=token_fn,
        aborts=drive_kwargs.get("aborts") or {},
        kv_config=kv,
    )
    drive_kwargs.setdefault("output_form", "alternate")  # both ways update() takes tokens
    result = drive(scheduler, kv, requests, on_step=checker.on_step, **drive_kwargs)
    return result, checker


# -- aiming aborts at requests in a given state -------------------------------------------------------


class _Found(Exception):
    pass


# The order aim_aborts places picks in: rare states first, before other aborts relieve the
# memory pressure that leads to them.
PLACING_ORDER = ("swapped", "preempted", "running", "waiting", "finished", "unknown")


def aim_aborts(scheduler, kv, requests, picks, *, ghost="ghost", **drive_kwargs):
    """Turns abort picks into the driver's ``aborts`` {step: [ids]}, each aimed at a real request.

    A pick ``(kind, nth, index)`` aborts, at the ``nth`` step after whose ``schedule`` some request
    is in state ``kind`` (or the last such step, when there are fewer), the ``index``-th such
    request (modulo their number). ``kind`` is one of REAL_ABORTS, "finished" (an id that finished
    or was aborted before) or "unknown" (``ghost`` or a request that has not arrived yet). Picks
    are placed one at a time in PLACING_ORDER, each counting steps from the previous one's (an
    abort changes the future, not the past); runs are deterministic, so replaying the run with the
    aborts so far shows the states the next pick sees. A pick whose state never occurs is dropped.
    """
    from jaxserve.scheduler.driver import drive

    aborts: dict = {}
    arrival = dict(zip((r.request_id for r in requests), drive_kwargs.get("arrival_steps") or [0] * len(requests)))
    start = 0
    for kind, nth, index in sorted(picks, key=lambda p: PLACING_ORDER.index(p[0])):
        hits = []  # (step, target) for each step from ``start`` where some request is in ``kind``
        gone = {rid for ids in aborts.values() for rid in ids}

        def look(rec):
            step = rec.plan.step
            if step >= start:
                if kind in REAL_ABORTS:
                    cands = requests_by_state(scheduler, rec.pre_update)[kind]
                elif kind == "finished":
                    cands = sorted(gone)
                else:
                    cands = [ghost] + [r for r, a in arrival.items() if a > step]
                if cands:
                    hits.append((step, cands[index % len(cands)]))
                    if len(hits) > nth:
                        raise _Found
            gone.update(f.request_id for f in rec.after.finished)

        try:
            drive(scheduler, kv, requests, aborts=aborts, on_step=look, keep_plans=False, **drive_kwargs)
        except _Found:
            pass
        if hits:
            step, rid = hits[-1]
            aborts.setdefault(step, []).append(rid)
            start = step
    return aborts
