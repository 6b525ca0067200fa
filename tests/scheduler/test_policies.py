"""Hand-built scenarios that show each paper's behaviour (Orca, vLLM, Sarathi-Serve, VTC)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jaxserve
from jaxserve import Request, SamplingParams, StepOutput
from jaxserve.kv import KVConfig
from jaxserve.scheduler.driver import drive
from sched_checks import run_checked


def token_fn(rid, index):
    return 1 + (sum(map(ord, rid)) + 7 * index) % 50


def req(rid, prompt_len, max_new, client="default", prefix=(), first=100):
    prompt = list(prefix) + list(range(first, first + prompt_len - len(prefix)))
    return Request(rid, prompt_token_ids=prompt, sampling=SamplingParams(max_new), client_id=client)


def first_plan_with(result, rid):
    return next(i for i, p in enumerate(result.plans) if rid in p.request_ids)


# -- Orca -------------------------------------------------------------------------------------


def test_orca_waits_until_the_full_reservation_fits():
    kv = KVConfig(num_blocks=10, block_size=4)  # 40 tokens
    requests = [req("a", 8, 20), req("b", 8, 20)]  # each reserves (8 + 20) / 4 = 7 blocks
    orca, _ = run_checked(jaxserve.scheduler.make("orca"), kv, requests, token_fn=token_fn)
    vllm, _ = run_checked(jaxserve.scheduler.make("vllm"), kv, requests, token_fn=token_fn)
    # Orca: b's prompt would fit on demand, but its reservation does not: it starts after a is done.
    a_last = max(i for i, p in enumerate(orca.plans) if "a" in p.request_ids)
    assert first_plan_with(orca, "b") == a_last + 1
    assert len(orca.plans[0].block_tables[0]) == 7  # reserved up front
    assert not any(p.preempted for p in orca.plans)
    # vLLM admits b at once and allocates on demand.
    assert first_plan_with(vllm, "b") <= 1
    assert len(vllm.plans[0].block_tables[0]) == 2


def test_orca_mixes_whole_prefills_with_decodes():
    kv = KVConfig(num_blocks=64, block_size=4)
    requests = [req("a", 8, 6), req("b", 12, 4)]
    result = drive(jaxserve.scheduler.make("orca"), kv, requests, arrival_steps=[0, 2], token_fn=token_fn)
    mixed = result.plans[2]
    assert set(mixed.request_ids) == {"a", "b"}
    assert mixed.num_decode_tokens == 1 and mixed.num_prefill_tokens == 12  # b's whole prompt


# -- static batching --------------------------------------------------------------------------


def test_static_batching_waits_for_the_whole_batch():
    kv = KVConfig(num_blocks=64, block_size=4)
    requests = [req("a", 8, 2), req("b", 8, 10), req("c", 8, 2)]
    sched = dataclasses.replace(jaxserve.scheduler.make("static"), max_num_seqs=2)
    result, _ = run_checked(sched, kv, requests, token_fn=token_fn)
    # a finishes early, but c only starts when b (the batch's longest) is done.
    b_last = max(i for i, p in enumerate(result.plans) if "b" in p.request_ids)
    assert first_plan_with(result, "c") == b_last + 1


# -- vLLM -------------------------------------------------------------------------------------


def _pressure_workload():
    # Three requests whose prompts fit together but whose outputs do not.
    return [req("a", 8, 24, first=100), req("b", 8, 24, first=200), req("c", 8, 24, first=300)]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_vllm_preempts_the_latest_arrival_and_resumes_it(mode):
    kv = KVConfig(num_blocks=12, block_size=4, num_host_blocks=16)  # 48 tokens for 3 x 32
    sched = jaxserve.scheduler.make("vllm", preemption_mode=mode)
    tails = []

    def latest_running(rec):
        for rid in rec.plan.preempted + rec.plan.swapped_out:
            tails.append((rid, rec.before.running.ids[-1]))

    result = drive(sched, kv, _pressure_workload(), token_fn=token_fn, on_step=latest_running)
    assert tails and tails[0][0] == "c"
    assert all(victim == latest for victim, latest in tails)  # always the latest-arrived running one
    plan_i = next(i for i, p in enumerate(result.plans) if p.preempted or p.swapped_out)
    assert "c" not in result.plans[plan_i].request_ids
    back = next(p for p in result.plans[plan_i + 1 :] if "c" in p.request_ids)
    row = back.request_ids.index("c")
    if mode == "recompute":
        # recomputes prompt + generated tokens from scratch and samples at the end
        assert back.num_computed_tokens[row] == 0
        assert back.num_new_tokens[row] > 8 and back.samples_token[row]
    else:
        assert "c" in back.swapped_in
        assert back.num_computed_tokens[row] > 8  # resumes where it stopped
        out_pairs = dict(next(p for p in result.plans if p.swapped_out).swap_out_blocks)
        host_to_device = dict(back.swap_in_blocks)
        assert set(out_pairs.values()) <= set(host_to_device)  # c's host copies come back
    # and every request still produced exactly the tokens it would have without pressure
    for r in _pressure_workload():
        expected = tuple(token_fn(r.request_id, j) for j in range(r.sampling.max_new_tokens))
        assert result.finished[r.request_id].output_token_ids == expected
    assert result.finished["c"].num_preemptions >= 1


def test_vllm_recompute_restarts_from_its_own_cached_blocks():
    kv = KVConfig(num_blocks=12, block_size=4)
    sched = jaxserve.scheduler.make("vllm", enable_prefix_caching=True)
    state = sched.init(kv)
    for r in _pressure_workload():
        state = sched.add_request(state, r, 0.0)
    for step in range(100):
        state, plan = sched.schedule(state, float(step))
        out = StepOutput({r: token_fn(r, 0) for r, s in zip(plan.request_ids, plan.samples_token.tolist()) if s})
        state = sched.update(state, plan, out, float(step))
        if plan.preempted:
            break
    assert plan.preempted == ("c",)
    state = sched.abort(state, "a", 0.0)  # room again, before anything evicts c's cached blocks
    state, plan = sched.schedule(state, 0.0)
    row = plan.request_ids.index("c")
    assert plan.num_computed_tokens[row] > 0 and plan.num_computed_tokens[row] % kv.block_size == 0
    assert plan.samples_token[row]


def test_vllm_runs_prefill_only_steps_while_prompts_fit():
    kv = KVConfig(num_blocks=256, block_size=4)
    requests = [req("a", 8, 8), req("b", 40, 4)]
    result = drive(jaxserve.scheduler.make("vllm"), kv, requests, arrival_steps=[0, 3], token_fn=token_fn)
    step3 = result.plans[3]
    assert step3.request_ids == ("b",)  # a's decode stalls for b's prefill


def test_prefix_cache_hit_shares_blocks_and_copies_on_write():
    kv = KVConfig(num_blocks=64, block_size=4)
    shared = list(range(500, 512))  # 3 full blocks
    requests = [
        Request("a", prompt_token_ids=shared + [1, 2], sampling=SamplingParams(3)),
        Request("b", prompt_token_ids=shared + [3], sampling=SamplingParams(3)),
        Request("c", prompt_token_ids=shared, sampling=SamplingParams(3)),  # entirely cached
    ]
    sched = jaxserve.scheduler.make("vllm", enable_prefix_caching=True)
    result, _ = run_checked(sched, kv, requests, arrival_steps=[0, 2, 2], token_fn=token_fn)
    a_table = result.plans[0].block_tables[0]
    plan = result.plans[2]
    b = plan.request_ids.index("b")
    assert plan.num_computed_tokens[b] == 12 and plan.block_tables[b][:3] == a_table[:3]
    c = plan.request_ids.index("c")
    # c shares a's first two blocks, recomputes its last token into a copy of the third
    assert plan.num_computed_tokens[c] == 11 and plan.num_new_tokens[c] == 1
    assert plan.block_tables[c][:2] == a_table[:2]
    assert plan.copy_blocks == ((a_table[2], plan.block_tables[c][2]),)


# -- Sarathi-Serve ----------------------------------------------------------------------------


def test_sarathi_budget_and_stall_free_decodes():
    kv = KVConfig(num_blocks=512, block_size=16)
    requests = [req(f"short{i}", 20, 60) for i in range(6)] + [req("long", 1000, 4, first=2000)]
    sched = jaxserve.scheduler.make("sarathi", chunk_size=256)
    result, checker = run_checked(sched, kv, requests, arrival_steps=[0] * 6 + [5], token_fn=token_fn, token_budget=256)

    def decoding(state):  # running requests whose prompt is done
        run = state.running
        return {rid for rid, n in zip(run.ids, (run.num_tokens - run.num_computed).tolist()) if n == 1}

    # Re-run step by step to compare each plan with the state it was made from.
    state = sched.init(kv)
    for i, r in enumerate(requests):
        state = sched.add_request(state, r, 0.0) if i < 6 else state
    chunks = []
    for step in range(40):
        if step == 5:
            state = sched.add_request(state, requests[6], 5.0)
        expect = decoding(state)
        state, plan = sched.schedule(state, float(step))
        assert plan.num_tokens <= 256
        assert expect <= set(plan.request_ids), f"step {step}: a running decode was left out"
        if "long" in plan.request_ids and int(plan.num_computed_tokens[plan.request_ids.index("long")]) < 1000:
            chunks.append(int(plan.num_new_tokens[plan.request_ids.index("long")]))
            assert plan.num_decode_tokens > 0 or not expect  # the prefill rides along with decodes
        out = StepOutput({r: 1 for r, s in zip(plan.request_ids, plan.samples_token.tolist()) if s})
        state = sched.update(state, plan, out, float(step))
    assert len(chunks) >= 4 and sum(chunks) == 1000  # split into budget-sized chunks
    assert all(c <= 256 - 6 for c in chunks[:2])  # each chunk leaves room for the 6 decodes


def test_sarathi_chunks_are_aligned():
    kv = KVConfig(num_blocks=512, block_size=16)
    requests = [req("d", 10, 40), req("long", 700, 2, first=2000)]
    sched = jaxserve.scheduler.make("sarathi", chunk_size=256, chunk_align=64)
    result, _ = run_checked(sched, kv, requests, arrival_steps=[0, 2], token_fn=token_fn, token_budget=256)
    chunks = [int(p.num_new_tokens[p.request_ids.index("long")]) for p in result.plans if "long" in p.request_ids]
    assert sum(chunks[:-1]) + chunks[-1] >= 700
    prefill_chunks = chunks[: next(i for i, p in enumerate(chunks) if sum(chunks[: i + 1]) >= 700)]
    assert all(c % 64 == 0 for c in prefill_chunks), chunks


def test_sarathi_generation_has_no_prefill_stalls_but_vllm_has():
    kv = KVConfig(num_blocks=1024, block_size=16)
    requests = [req("d", 16, 200)] + [req(f"p{i}", 900, 4, first=3000 + 1000 * i) for i in range(5)]
    arrivals = [0] + [10 + 20 * i for i in range(5)]

    def stalls(name, **opts):
        result = drive(jaxserve.scheduler.make(name, **opts), kv, requests, arrival_steps=arrivals, token_fn=token_fn)
        first = first_plan_with(result, "d")
        last = max(i for i, p in enumerate(result.plans) if "d" in p.request_ids)
        return sum("d" not in p.request_ids for p in result.plans[first : last + 1])

    assert stalls("sarathi", chunk_size=256) == 0
    assert stalls("vllm") == 5  # one prefill-only step per arriving prompt


# -- VTC --------------------------------------------------------------------------------------


def test_vtc_counter_lift_for_a_newly_backlogged_client():
    sched = jaxserve.scheduler.make("vtc", base="vllm", max_num_seqs=1)
    order = sched.order
    state = sched.init(KVConfig(num_blocks=256, block_size=4))
    for i in range(10):
        state = sched.add_request(state, req(f"a{i}", 40, 4, client="A"), 0.0)
    for step in range(12):  # A is served alone for a while: its counter grows
        state, plan = sched.schedule(state, float(step))
        state = sched.update(state, plan, StepOutput({r: 1 for r in plan.request_ids}), float(step))
    served_a = order.counter(state.waiting, "A")
    assert served_a >= 40  # w_p * 40 input tokens at least
    state = sched.add_request(state, req("b0", 40, 4, client="B"), 12.0)
    assert order.counter(state.waiting, "B") == served_a  # lifted to the other backlogged client's
    # a client that was idle cannot bank service: B does not monopolise the server afterwards
    state = sched.add_request(state, req("b1", 40, 4, client="B"), 12.0)
    assert order.counter(state.waiting, "B") == served_a  # already backlogged: no second lift


def test_vtc_counts_weighted_service():
    sched = jaxserve.scheduler.make("vtc", w_p=1.0, w_q=2.0, weights={"gold": 2.0})
    state = sched.init(KVConfig(num_blocks=256, block_size=4))
    state = sched.add_request(state, req("g", 10, 3, client="gold"), 0.0)
    state = sched.add_request(state, req("s", 10, 3, client="silver"), 0.0)
    for step in range(6):
        state, plan = sched.schedule(state, float(step))
        state = sched.update(state, plan, StepOutput({r: 1 for r in plan.request_ids}), float(step))
    assert sched.order.counter(state.waiting, "silver") == 10 * 1.0 + 3 * 2.0
    assert sched.order.counter(state.waiting, "gold") == (10 * 1.0 + 3 * 2.0) / 2.0


def _service_gap(name, steps=600, **opts):
    """Two clients overloading a server, A sending twice B's rate (32 in / 32 out each).

    Service counts each prompt once (w_p = 1 per token, a recompute after preemption is not
    service) and every generated token (w_q = 2). Returns the gap in service gained since the
    start of the window in which both clients stay backlogged, step by step, and the totals.
    """
    kv = KVConfig(num_blocks=64, block_size=16)  # M = 1024 tokens in the batch
    requests, arrivals = [], []
    for t in range(steps):
        for k in range(2):
            requests.append(req(f"A{t}_{k}", 32, 32, client="A", first=1000))
            arrivals.append(t)
        requests.append(req(f"B{t}", 32, 32, client="B", first=1000))
        arrivals.append(t)
    sched = jaxserve.scheduler.make(name, **opts)
    charged, service, trace = set(), {"A": 0.0, "B": 0.0}, []

    def on_step(rec):
        for rid, s in zip(rec.plan.request_ids, rec.plan.samples_token.tolist()):
            if rid not in charged:
                charged.add(rid)
                service[rid[0]] += 32.0
            service[rid[0]] += 2.0 * s
        backlogged = {q.request.client_id for q in sched.waiting_requests(rec.after)}
        trace.append((service["A"] - service["B"], backlogged == {"A", "B"}))

    drive(sched, kv, requests, arrival_steps=arrivals, max_steps=steps, token_fn=token_fn, on_step=on_step)
    start = next(i for i, (_, both) in enumerate(trace) if both)
    assert all(both for _, both in trace[start:]), "both clients must stay backlogged"
    gaps = np.array([gap - trace[start][0] for gap, _ in trace[start:]])
    return np.abs(gaps), service


def test_vtc_fairness_bound_on_two_client_overload():
    bound = 2 * max(1.0 * 32, 2.0 * 64 * 16)  # 2 max(w_p L_input, w_q M)
    vtc_gaps, vtc_service = _service_gap("vtc", base="vllm")
    fcfs_gaps, fcfs_service = _service_gap("vllm")
    assert vtc_gaps.max() <= bound
    assert fcfs_gaps[-1] > 2 * bound  # FCFS serves A in proportion to its sending rate ...
    assert fcfs_gaps[-1] > fcfs_gaps[len(fcfs_gaps) // 2] + bound / 2  # ... and the gap keeps growing
    assert fcfs_service["A"] > 1.6 * fcfs_service["B"]
    assert abs(vtc_service["A"] - vtc_service["B"]) < 0.05 * (vtc_service["A"] + vtc_service["B"])


def test_vtc_runs_on_sarathi_batching():
    sched = jaxserve.scheduler.make("vtc", base="sarathi", chunk_size=128)
    assert isinstance(sched, jaxserve.scheduler.SarathiScheduler)
    gaps, service = _service_gap("vtc", steps=300, base="sarathi", chunk_size=128)
    assert gaps.max() <= 2 * max(32, 2 * 64 * 16)
    assert abs(service["A"] - service["B"]) < 0.1 * (service["A"] + service["B"])


def test_vtc_rejects_bad_options():
    with pytest.raises(ValueError, match="base"):
        jaxserve.scheduler.make("vtc", base="orca")
    with pytest.raises(ValueError, match="weights"):
        jaxserve.scheduler.make("vtc", weights={"x": 0})


# -- registry and options ---------------------------------------------------------------------


def test_registry_lists_and_rejects_unknown():
    assert {"static", "orca", "vllm", "sarathi", "vtc"} <= set(jaxserve.scheduler.available())
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        jaxserve.scheduler.make("nope")
    with pytest.raises(ValueError, match="no option 'chunksize'"):
        jaxserve.scheduler.make("sarathi", chunksize=3)
    with pytest.raises(ValueError, match="chunk_size"):
        jaxserve.scheduler.make("sarathi", chunk_size=0)
    with pytest.raises(ValueError, match="preemption_mode"):
        jaxserve.scheduler.make("vllm", preemption_mode="drop")


def test_add_request_rejects_what_could_never_run():
    kv = KVConfig(num_blocks=4, block_size=4)
    sched = jaxserve.scheduler.make("sarathi")
    state = sched.init(kv)
    with pytest.raises(ValueError, match="could never finish"):
        sched.add_request(state, req("big", 10, 7), 0.0)  # 17 tokens > 16
    vllm = jaxserve.scheduler.make("vllm", max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        vllm.add_request(vllm.init(kv), req("long", 6, 4), 0.0)  # a recompute would need 9
    state = sched.add_request(state, req("x", 4, 4), 0.0)
    with pytest.raises(ValueError, match="already"):
        sched.add_request(state, req("x", 4, 4), 0.0)


def _step(sched, state, step, abort=None):
    state, plan = sched.schedule(state, float(step))
    if abort is not None:
        state = sched.abort(state, abort, float(step))
    out = StepOutput({r: 1 for r, s in zip(plan.request_ids, plan.samples_token.tolist()) if s})
    return sched.update(state, plan, out, float(step)), plan


@pytest.mark.parametrize("name", ["vllm", "sarathi", "vtc"])
def test_abort_in_every_state_releases_everything(name):
    from jaxserve.request import RequestStatus as S

    kv = KVConfig(num_blocks=12, block_size=4, num_host_blocks=16)
    opts = {"chunk_size": 6} if name == "sarathi" else {}
    sched = jaxserve.scheduler.make(name, preemption_mode="swap", enable_prefix_caching=True, **opts)
    state = sched.init(kv)
    for r in _pressure_workload() + [req("w", 8, 4)]:
        state = sched.add_request(state, r, 0.0)
    assert sched.status(state, "w") is S.WAITING
    state = sched.abort(state, "w", 0.0)  # waiting
    assert sched.status(state, "w") is None
    if name == "sarathi":  # running mid-prefill (chunks of 6 tokens for 8-token prompts)
        state, plan = _step(sched, state, 0)
        assert sched.status(state, "a") is S.RUNNING and not plan.samples_token.all()
        state = sched.abort(state, "b", 0.0)
        state = sched.add_request(state, req("b", 8, 24, first=200), 0.0)
    step = 1
    while sched.status(state, "c") is not S.SWAPPED:
        state, _ = _step(sched, state, step)
        step += 1
        assert step < 200, "c was never swapped out"
    used, held = state.kv.host.num_used, len(state.swapped.get("c").host_blocks)
    assert held > 0
    state = sched.abort(state, "c", 0.0)  # swapped
    assert state.kv.host.num_used == used - held
    state, plan = _step(sched, state, step, abort="a")  # between schedule and update: tokens dropped
    assert "a" in plan.request_ids and "a" not in {f.request_id for f in state.finished}
    for rid in ("a", "b", "c", "w", "unknown"):
        state = sched.abort(state, rid, 100.0)
    state = sched.abort(state, "a", 100.0)  # again: a no-op
    assert not state.has_unfinished
    assert state.kv.device.num_used == 0 and state.kv.host.num_used == 0
    assert state.kv.device.num_free == kv.num_blocks
    state.kv.device.check()


def test_call_order_and_bad_outputs_are_refused():
    sched = jaxserve.scheduler.make("vllm")
    state = sched.add_request(sched.init(KVConfig(8, 4)), req("a", 3, 3), 0.0)
    state, plan = sched.schedule(state, 0.0)
    with pytest.raises(ValueError, match="before update"):
        sched.schedule(state, 0.0)
    for bad in ({"a": 2**32 + 7}, {"a": True}, {"a": 1.5}, {"a": -1}, {}):
        with pytest.raises(ValueError, match="token"):
            sched.update(state, plan, StepOutput(bad), 0.0)
    state = sched.update(state, plan, StepOutput({"a": np.int64(4)}), 0.0)  # numpy ints are fine
    assert state.running.last_token[0] == 4


def test_scheduler_options_are_validated():
    for opts, key in (
        ({"order": "fcfs"}, "order"),
        ({"preempt_rank": 3}, "preempt_rank"),
    ):
        with pytest.raises(ValueError, match=key):
            jaxserve.scheduler.make("sarathi", **opts)
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="w_p"):
            jaxserve.scheduler.make("vtc", w_p=bad)
        with pytest.raises(ValueError, match="weights"):
            jaxserve.scheduler.make("vtc", weights={"a": bad})


def test_vtc_idle_client_cannot_bank_service_when_nobody_waits():
    sched = jaxserve.scheduler.make("vtc", max_num_seqs=1)
    state = sched.init(KVConfig(num_blocks=256, block_size=4))
    state = sched.add_request(state, req("b0", 40, 4, client="B"), 0.0)
    for step in range(4):  # b is served alone; its queue empties when b0 is admitted
        state, plan = sched.schedule(state, float(step))
        state = sched.update(state, plan, StepOutput({r: 1 for r in plan.request_ids}), float(step))
    served_b = sched.order.counter(state.waiting, "B")
    assert served_b > 0 and state.num_waiting == 0
    state = sched.add_request(state, req("a0", 40, 4, client="A"), 4.0)  # nobody waits: lift to B's
    assert sched.order.counter(state.waiting, "A") == served_b
