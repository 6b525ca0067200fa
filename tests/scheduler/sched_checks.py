"""Invariant checks shared by the scheduler tests (property and scenario tests).

``Checker`` watches a run step by step (plug ``checker.on_step`` into ``driver.drive``) and asserts
the contracts of DESIGN.md: no KV over-commit, disjoint block tables except shared cached prefixes,
freed-page hygiene, exactly-once computation of every token per (re)computation, budgets, purity.
"""

from __future__ import annotations

import collections
import dataclasses



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
        tuple((q.request_id, q.outputs[: q.num_output]) for q in state.swapped.sorted_items()),
        state.finished,
        tuple(sorted(state.kv.device.refcounts.items())),
    )


def live_tables(state):
    return dict(zip(state.running.ids, state.running.block_tables))


def check_kv(state):
    """Pool invariants, refcounts == table occupancy, sharing only of cached prefix blocks."""
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
    assert sum(occupancy.values()) >= len(occupancy)
    assert len(occupancy) <= pool.num_blocks, "KV over-committed"
    for b, count in occupancy.items():
        if count > 1:
            assert b in pool.block_hash, f"block {b} shared by {count} tables but not a cached prefix block"
            assert len(positions[b]) == 1, f"shared block {b} at different table positions"
    # host blocks: each swapped request owns its own
    host_owned = collections.Counter()
    for seq in state.swapped._live_items():
        for b in seq[1].host_blocks:
            host_owned[b] += 1
    assert all(c == 1 for c in host_owned.values()), "host block shared"
    assert set(host_owned) == set(state.kv.host.refcounts.keys()), "host blocks leaked or lost"
    # running rows are sorted by (preemption rank, arrival)
    keys = list(zip(state.running.rank.tolist(), state.running.seq_no.tolist()))
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "running batch not sorted by (rank, arrival)"


@dataclasses.dataclass
class Checker:
    scheduler: object
    token_budget: int | None = None  # max tokens per step (None: unchecked)
    check_purity: bool = True
    requests: dict | None = None  # request id -> Request, to check the plan's token ids
    token_fn: object = None  # the driver's token function (request id, index) -> token
    steps: int = 0
    # per request: next token position it must compute (None: not running / must restart)
    position: dict = dataclasses.field(default_factory=dict)
    known_tokens: dict = dataclasses.field(default_factory=dict)
    computed_ranges: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    empty_plans_with_work: int = 0

    def on_step(self, rec):
        before, scheduled, plan, after = rec.before, rec.scheduled, rec.plan, rec.after
        self.steps += 1
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
        if plan.is_empty and before.has_unfinished:
            self.empty_plans_with_work += 1
            raise AssertionError(f"step {plan.step}: empty plan while requests are pending (deadlock)")

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
        for rid in plan.preempted:
            self.position[rid] = None
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
            else:
                # admission: start at 0, at a block-aligned cache hit, or one token before a full hit
                assert nc == 0 or nc % bs == 0 or (nc + 1) % bs == 0 and nc + 1 == total_known, (
                    f"{rid}: admitted at {nc}"
                )
                assert nc < total_known
            self.position[rid] = nc + n
            if self.requests is not None:
                req = self.requests[rid]
                truth = list(req.prompt_token_ids) + [
                    self.token_fn(rid, j) for j in range(total_known - req.prompt_len)
                ]
                got = plan.token_ids[plan.cu_q_lens[i] : plan.cu_q_lens[i + 1]].tolist()
                assert got == truth[nc : nc + n], f"{rid}: wrong token ids for [{nc}, {nc + n})"
            self.computed_ranges[rid].append((nc, nc + n))
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
        for rid in plan.swapped_out:
            pass  # position kept: a swap-in resumes there


def run_checked(scheduler, kv, requests, *, token_budget=None, check_purity=True, check_tokens=True, **drive_kwargs):
    from jaxserve.scheduler.driver import constant_token, drive

    token_fn = drive_kwargs.setdefault("token_fn", constant_token())
    checker = Checker(
        scheduler,
        token_budget=token_budget,
        check_purity=check_purity,
        requests={r.request_id: r for r in requests} if check_tokens else None,
        token_fn=token_fn,
    )
    drive_kwargs.setdefault("output_form", "alternate")  # both ways update() takes tokens
    result = drive(scheduler, kv, requests, on_step=checker.on_step, **drive_kwargs)
    return result, checker
