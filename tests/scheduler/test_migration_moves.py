"""The pure half of live migration (scheduler/migration.py) on random workloads.

Two schedulers A and B step in lockstep; at random steps a decoding request on one is migrated to
the other in stages (blocks reserved stage by stage on the destination, detach for the last stage,
attach there), or the migration is cancelled midway, or refused. After every step both states pass
the KV invariants (held blocks counted as occupied), and in the end every request finished exactly
once with the tokens it would have had without migrating, and both pools are empty.
"""

from __future__ import annotations

import collections

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from jaxserve.kv.config import KVConfig
from jaxserve.request import Request, SamplingParams
from jaxserve.scheduler import migration as mig
from jaxserve.scheduler.driver import step_output
from jaxserve.scheduler.registry import make
from sched_checks import check_kv

REACHED = collections.Counter()


def token_of(rid: str, index: int) -> int:
    return 3 + (sum(map(ord, rid)) * 7 + index * 13) % 90


def held_blocks(state) -> list[int]:
    return [b for t in list(state.incoming.values()) + list(state.outgoing.values()) for b in t]


def check_with_holdings(state) -> None:
    """check_kv, with the migration holdings counted as one more table each."""
    running = dict(zip(state.running.ids, state.running.block_tables))
    held = held_blocks(state)
    assert len(set(held)) == len(held), "a held block is held twice"
    assert not set(held) & {b for t in running.values() for b in t}, "a held block is also in a table"
    refs = dict(state.kv.device.refcounts.items())
    for b in held:
        assert refs.get(b) == 1, f"held block {b} has refcount {refs.get(b)}"
        del refs[b]
    pool = state.kv.device
    # the rest is what check_kv checks on the tables alone
    from collections import Counter

    occ = Counter(b for t in running.values() for b in t)
    assert dict(occ) == refs, "refcounts differ from tables + holdings"
    if not held:
        check_kv(state)
    assert pool.num_used + pool.num_free <= pool.num_blocks


class Pair:
    """Schedulers A (index 0) and B (1) driven in lockstep, with at most one migration at a time."""

    def __init__(self, sched, kv):
        self.sched = sched
        self.states = [sched.init(kv), sched.init(kv)]
        self.generated: dict[str, int] = {}
        self.finished: dict[str, tuple[int, ...]] = {}
        self.moving = None  # (rid, src, dst, copied blocks, MigratingRequest or None)

    def step(self) -> None:
        for i, state in enumerate(self.states):
            if not state.has_unfinished:
                continue
            state, plan = self.sched.schedule(state, 0.0)
            out = step_output(plan, token_of, self.generated)
            state = self.sched.update(state, plan, out, 0.0)
            for rid in out.token_ids:
                self.generated[rid] = self.generated.get(rid, 0) + 1
            for f in state.finished:
                assert f.request_id not in self.finished, f"{f.request_id} finished twice"
                self.finished[f.request_id] = f.output_token_ids
            self.states[i] = state
        if self.moving is not None and self.moving[4] is None:
            rid, src = self.moving[0], self.moving[1]
            snap = mig.snapshot(self.states[src], rid)
            if snap is None or not snap.is_decoding:  # finished or preempted on the source: abort
                self.cancel("source_lost")
        for state in self.states:
            check_with_holdings(state)

    def start(self, src: int, pick: int) -> None:
        state = self.states[src]
        decoding = [rid for rid in state.running.ids if mig.snapshot(state, rid).is_decoding]
        if not decoding or self.moving is not None:
            return
        rid = decoding[pick % len(decoding)]
        self.moving = (rid, src, 1 - src, 0, None)
        REACHED["start"] += 1
        self.stage(final=False)

    def stage(self, final: bool) -> None:
        rid, src, dst, copied, moving = self.moving
        bs = self.states[src].kv.config.block_size
        snap = mig.snapshot(self.states[src], rid)
        upto = mig.blocks_for(snap.num_computed, bs) if final else snap.num_computed // bs
        try:
            self.states[dst] = mig.reserve_incoming(self.sched, self.states[dst], rid, upto - copied)
        except mig.MigrationRefused:
            REACHED["refused"] += 1
            self.cancel("refused")
            return
        if final:
            self.states[src], moving = mig.detach(self.sched, self.states[src], rid)
            REACHED["detach"] += 1
        self.moving = (rid, src, dst, upto, moving)

    def finish(self) -> None:
        rid, src, dst, copied, moving = self.moving
        self.states[dst] = mig.attach(self.sched, self.states[dst], moving)
        self.states[src] = mig.release_outgoing(self.states[src], rid)
        self.moving = None
        REACHED["attach"] += 1

    def cancel(self, why: str) -> None:
        rid, src, dst, copied, moving = self.moving
        self.states[dst] = mig.cancel_incoming(self.states[dst], rid)
        if moving is not None:  # the last stage failed: the request goes back where it was
            self.states[src] = mig.attach(self.sched, self.states[src], moving, source=True)
            REACHED["reattach"] += 1
        self.moving = None
        REACHED["cancel"] += 1


workloads = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 30), st.integers(0, 1)),  # prompt, max_new, replica
    min_size=1, max_size=10,
)
actions = st.lists(st.tuples(st.sampled_from(["start", "stage", "final", "finish", "cancel", "none"]),
                             st.integers(0, 1), st.integers(0, 50)), min_size=1, max_size=80)  # fmt: skip


@pytest.mark.parametrize("name,options", [("vllm", {}), ("sarathi", {"chunk_size": 16}),
                                          ("vllm", {"enable_prefix_caching": True, "max_num_seqs": 3})])
@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads, plan=actions, num_blocks=st.integers(8, 40))
def test_migrations_keep_every_request_and_block(name, options, workload, plan, num_blocks):
    sched = make(name, **options)
    kv = KVConfig(num_blocks=num_blocks, block_size=4)
    pair = Pair(sched, kv)
    requests = []
    for i, (p, n, where) in enumerate(workload):
        if p + n > kv.capacity_tokens:
            continue
        prompt = [3 + (i * 5 + k) % 7 for k in range(p)]  # repeated prefixes: prefix-cache hits
        r = Request(f"r{i}", prompt_token_ids=prompt, sampling=SamplingParams(max_new_tokens=n))
        requests.append(r)
        pair.states[where] = sched.add_request(pair.states[where], r, 0.0)
    for action, src, pick in plan:
        if action == "start":
            pair.start(src, pick)
        elif pair.moving is not None and action == "stage" and pair.moving[4] is None:
            pair.stage(final=False)
        elif pair.moving is not None and action == "final" and pair.moving[4] is None:
            pair.stage(final=True)
        elif pair.moving is not None and action == "finish" and pair.moving[4] is not None:
            pair.finish()
        elif pair.moving is not None and action == "cancel":
            pair.cancel("asked")
        pair.step()
    if pair.moving is not None and pair.moving[4] is not None:
        pair.finish()
    elif pair.moving is not None:
        pair.cancel("end")
    for _ in range(2000):
        if not any(s.has_unfinished for s in pair.states):
            break
        pair.step()
    assert set(pair.finished) == {r.request_id for r in requests}, "a request was lost"
    for r in requests:
        want = tuple(token_of(r.request_id, k) for k in range(r.sampling.max_new_tokens))
        assert pair.finished[r.request_id] == want, f"{r.request_id}: tokens changed by migration"
    for state in pair.states:
        assert state.kv.device.num_used == 0 or state.kv.device.enable_caching, "blocks leaked"
        assert not state.incoming and not state.outgoing
        assert not state.kv.device.refcounts, "blocks still referenced after every request finished"


def test_examples_reached_every_migration_path():
    """Runs after the property test in this module: its examples must have reached each path."""
    for path in ("start", "refused", "detach", "attach", "cancel", "reattach"):
        assert REACHED[path] > 0, f"no example reached {path!r}: {dict(REACHED)}"


def test_reserved_seat_holds_admission_back():
    sched = make("vllm", max_num_seqs=2)
    kv = KVConfig(num_blocks=16, block_size=4)
    state = sched.init(kv)
    state = mig.reserve_incoming(sched, state, "moving", 2)
    for i in range(2):
        state = sched.add_request(state, Request(f"w{i}", prompt_token_ids=[5, 6], sampling=SamplingParams(max_new_tokens=2)), 0.0)
    state, plan = sched.schedule(state, 0.0)
    assert plan.request_ids == ("w0",), "the migrating request's seat was given away"
    with pytest.raises(mig.MigrationRefused, match="no batch seat"):
        mig.reserve_incoming(sched, state, "other", 1)
    with pytest.raises(mig.MigrationRefused, match="between a schedule"):
        mig.attach(sched, state, mig.MigratingRequest(Request("moving", prompt_token_ids=[1], sampling=SamplingParams(max_new_tokens=3)), (2,), 1, (), 0))


def test_detach_refuses_a_request_still_in_prefill():
    sched = make("sarathi", chunk_size=4)
    state = sched.init(KVConfig(num_blocks=16, block_size=4))
    state = sched.add_request(state, Request("p", prompt_token_ids=list(range(3, 15)), sampling=SamplingParams(max_new_tokens=3)), 0.0)
    state, plan = sched.schedule(state, 0.0)
    state = sched.update(state, plan, step_output(plan, token_of, {}), 0.0)
    assert not mig.snapshot(state, "p").is_decoding
    with pytest.raises(mig.MigrationRefused, match="not a decoding request"):
        mig.detach(sched, state, "p")
