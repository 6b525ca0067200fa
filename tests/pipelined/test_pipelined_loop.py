"""The asynchronous loop (runtime/pipelined.py + scheduler/deferred_output.py) against the
synchronous one, model-free: ``ContextHashExecutor`` tokens depend on every KV id a row reads, so
equal outputs mean equal inputs in equal blocks. Every policy; stop tokens mid-batch, aborts while a
step is in flight, preemption (recompute and swap) in a tiny pool, prefix caching; no leaks."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipelined_testing import ContextHashExecutor, PipelinedReplica, Replica, assert_no_leaks, drive

from jaxserve import scheduler as schedulers
from jaxserve.kv.config import KVConfig
from jaxserve.request import Request, SamplingParams
from jaxserve.scheduler import deferred_output

POLICIES = {
    "vllm": {"max_num_batched_tokens": 64},
    "sarathi": {"chunk_size": 8},
    "orca": {"max_num_batched_tokens": 64},
    "static": {"max_num_batched_tokens": 64},
    "vtc": {"base": "sarathi", "chunk_size": 8},
}
STOP = 3  # a stop token of every request that has stops (1 in 16 tokens)


def requests_of(specs, stops=(STOP,)):
    """``specs``: (prompt length, max_new_tokens, has stop tokens, seed) per request."""
    out = []
    for i, (n, m, has_stop, seed) in enumerate(specs):
        ids = np.random.default_rng(seed).integers(0, 16, size=n).tolist()
        sp = SamplingParams(max_new_tokens=m, temperature=0.0, stop_token_ids=tuple(stops) if has_stop else ())
        out.append(Request(f"r{i}", prompt_token_ids=ids, sampling=sp, client_id=f"c{i % 2}"))
    return out


def both(name, options, kv, requests, arrival_steps, aborts=(), inputs="device"):
    """``(sync finishes, async finishes, async replica)`` of one workload (``inputs``: where the
    async loop puts a step's tokens into the next step's inputs)."""
    results = []
    for cls in (Replica, PipelinedReplica):
        sched = schedulers.make(name, **options)
        ex = ContextHashExecutor(kv.num_blocks, kv.block_size, kv.num_host_blocks)
        replica = cls(sched, kv, ex, fast_forward=False) if cls is Replica else cls(sched, kv, ex, inputs=inputs)
        finished = drive(replica, requests, arrival_steps, aborts)
        assert_no_leaks(replica.state)
        results.append((finished, replica))
    (sync, sync_replica), (asyn, replica) = results
    # A request gets a token time per token in both logs (a dropped row's is nobody's).
    counts = [r.log.tokens_per_request() for r in (sync_replica, replica)]
    index = {rid: i for i, rid in enumerate(r.request_id for r in sync_replica.log.requests)}
    aindex = replica.log.index
    for rid in set(sync) & set(asyn):
        assert counts[1][aindex[rid]] == counts[0][index[rid]] == len(asyn[rid].output_token_ids), rid
    return sync, asyn, replica


def assert_same(sync, asyn, aborted=()):
    live = set(sync) - set(aborted)
    assert live <= set(asyn), f"unfinished in the async run: {live - set(asyn)}"
    for rid in live:
        assert asyn[rid].output_token_ids == sync[rid].output_token_ids, rid
        assert asyn[rid].finish_reason == sync[rid].finish_reason, rid


SPECS = [(5, 9, True, 1), (9, 12, True, 2), (3, 7, False, 3), (12, 10, True, 4), (6, 12, True, 5), (2, 11, True, 6)]


@pytest.mark.parametrize("inputs", ["device", "host"])
@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_the_same_tokens_as_the_synchronous_loop(name, caching, inputs):
    kv = KVConfig(num_blocks=64, block_size=4)
    options = {**POLICIES[name], "enable_prefix_caching": caching, "max_num_seqs": 4}
    reqs = requests_of(SPECS)
    sync, asyn, replica = both(name, options, kv, reqs, [0, 0, 1, 2, 4, 6], inputs=inputs)
    assert_same(sync, asyn)
    assert {f.finish_reason for f in sync.values()} == {"stop", "length"}  # both kinds mid-batch
    assert replica.num_dropped > 0  # a stop found after the next step was dispatched


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_in_a_tiny_pool(mode):
    kv = KVConfig(num_blocks=10, block_size=4, num_host_blocks=16)
    options = {"max_num_batched_tokens": 64, "preemption_mode": mode, "enable_prefix_caching": True}
    reqs = requests_of([(6, 10, True, 11), (7, 12, True, 12), (5, 12, False, 13), (8, 9, True, 14)])
    sync, asyn, replica = both("vllm", options, kv, reqs, [0, 0, 0, 0])
    assert_same(sync, asyn)
    assert replica.log.preemptions


def test_an_abort_while_a_step_is_in_flight():
    kv = KVConfig(num_blocks=64, block_size=4)
    reqs = requests_of(SPECS)
    sync, asyn, replica = both("sarathi", {"chunk_size": 8}, kv, reqs, [0] * 6, aborts=[(3, "r1"), (5, "r4")])
    assert_same(sync, asyn, aborted={"r1", "r4"})
    assert "r1" not in asyn and "r4" not in asyn and replica.aborted_running_in_flight == 2


def test_reconcile_finishes_a_stop_and_drops_its_row_from_the_next_step():
    """One request, by hand: its step-0 token is a stop; step 1 (already scheduled) loses its row.
    Step 1's write fills block 0 (3 prompt ids + the stop token), but as in the synchronous update
    nothing past the 3 computed tokens is offered to the prefix cache."""
    sched = schedulers.make("sarathi", chunk_size=8, enable_prefix_caching=True)
    kv = KVConfig(num_blocks=8, block_size=4)
    req = Request("a", prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=5, stop_token_ids=(STOP,)))
    state = sched.add_request(sched.init(kv), req, 0.0)
    state, plan0 = sched.schedule(state, 0.0)
    state, pending = deferred_output.provisional_update(sched, state, plan0)
    assert state.running.num_output.tolist() == [1] and not state.finished
    state, plan1 = sched.schedule(state, 0.0)
    assert plan1.request_ids == ("a",) and plan1.token_ids.tolist() == [deferred_output.PENDING_TOKEN]
    state, rec = deferred_output.reconcile(sched, state, pending, np.array([STOP]))
    assert [(f.request_id, f.output_token_ids, f.finish_reason) for f in rec.finished] == [("a", (STOP,), "stop")]
    assert rec.dropped == ("a",) and state.num_running == 0 and state.kv.device.num_used == 0
    assert state.kv.device.num_evictable == 0  # no block hashed over the dropped row's write
    state, pending1 = deferred_output.provisional_update(sched, state, plan1)  # its token is ignored
    assert pending1.requests == () and not state.has_unfinished


def test_reconcile_writes_real_tokens_where_requests_went():
    sched = schedulers.make("sarathi", chunk_size=8)
    kv = KVConfig(num_blocks=8, block_size=4)
    req = Request("a", prompt_token_ids=[5, 6], sampling=SamplingParams(max_new_tokens=5, stop_token_ids=(STOP,)))
    state = sched.add_request(sched.init(kv), req, 0.0)
    state, plan0 = sched.schedule(state, 0.0)
    state, pending = deferred_output.provisional_update(sched, state, plan0)
    state, rec = deferred_output.reconcile(sched, state, pending, np.array([7]))
    assert not rec.finished and state.running_outputs() == ((7,),) and state.running.last_token.tolist() == [7]
    with pytest.raises(ValueError, match="sampling rows"):
        deferred_output.reconcile(sched, state, pending, np.array([7, 8]))


_SEEN = collections.Counter()


@st.composite
def workloads(draw):
    n = draw(st.integers(3, 7))
    specs = [(draw(st.integers(1, 10)), draw(st.integers(2, 20)), draw(st.booleans()), draw(st.integers(0, 99)))
             for _ in range(n)]  # fmt: skip
    arrivals = [draw(st.integers(0, 6)) for _ in range(n)]
    name = draw(st.sampled_from(sorted(POLICIES)))
    options = {**POLICIES[name], "enable_prefix_caching": draw(st.booleans()), "max_num_seqs": draw(st.integers(2, 5))}
    if name in ("vllm", "sarathi", "vtc"):
        options["preemption_mode"] = draw(st.sampled_from(["recompute", "swap"]))
    num_blocks = draw(st.integers(8, 14))
    aborts = []
    if draw(st.booleans()):
        aborts.append((draw(st.integers(1, 8)), f"r{draw(st.integers(0, n - 1))}"))
    inputs = draw(st.sampled_from(["device", "host"]))
    return name, options, KVConfig(num_blocks, 4, num_host_blocks=8), specs, arrivals, aborts, inputs


def test_random_workloads_match_the_synchronous_loop():
    """Random policies, workloads, pool sizes and aborts; the examples must reach the reconcile-
    with-stop (a dispatched row dropped), abort-in-flight and preemption paths."""

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(workloads())
    def check(w):
        name, options, kv, specs, arrivals, aborts, inputs = w
        reqs = requests_of(specs)
        options = dict(options)
        if name in ("static", "orca") or name == "vllm":
            options["max_num_batched_tokens"] = 64
        try:
            schedulers.make(name, **options)
        except ValueError:
            return
        if any(r.max_total_tokens > kv.num_blocks * kv.block_size for r in reqs):
            return
        sync, asyn, replica = both(name, options, kv, reqs, arrivals, aborts, inputs)
        assert_same(sync, asyn, aborted={rid for _, rid in aborts})
        _SEEN["dropped"] += replica.num_dropped > 0
        _SEEN["abort"] += replica.aborted_running_in_flight
        _SEEN["preempted"] += bool(replica.log.preemptions)

    check()
    assert _SEEN["dropped"] and _SEEN["abort"] and _SEEN["preempted"], dict(_SEEN)
