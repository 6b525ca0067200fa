"""Property tests: every registered scheduler (built-in or registered by a script) on random workloads.

Random arrivals, prompt/output lengths, shared prefixes, stop tokens, clients, priorities, aborts at
random steps, tiny KV caches and block sizes, swap space, prefix caching on/off. Each step is checked
by ``sched_checks.Checker`` (KV accounting, sharing, freed-page hygiene, exactly-once computation,
budgets, determinism of ``schedule``); each run must finish every admissible request with the right
tokens and release every block.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import jaxserve
from jaxserve.kv import KVConfig
from jaxserve.scheduler.driver import drive
from sched_checks import plan_key, run_checked

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_custom_scheduler():
    spec = importlib.util.spec_from_file_location("custom_scheduler", ROOT / "experiments" / "custom_scheduler.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["custom_scheduler"] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


_load_custom_scheduler()  # registers "tiered": it must pass the same properties
NAMES = jaxserve.scheduler.available()
VOCAB = 5
STOP = 3


def token_fn(rid: str, index: int) -> int:
    """Deterministic across processes (str hashes are salted, so no hash())."""
    return 1 + (sum(map(ord, rid)) * 31 + index * 7) % VOCAB


def expected_output(req) -> tuple[int, ...]:
    out = []
    for j in range(req.sampling.max_new_tokens):
        out.append(token_fn(req.request_id, j))
        if out[-1] in req.sampling.stop_token_ids:
            break
    return tuple(out)


@st.composite
def scenarios(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    prefixes = [draw(st.lists(st.integers(1, VOCAB), max_size=3 * block_size)) for _ in range(2)]
    n = draw(st.integers(1, 10))
    requests = []
    for i in range(n):
        prefix = prefixes[draw(st.integers(0, 1))]
        tail = draw(st.lists(st.integers(1, VOCAB), min_size=0 if prefix else 1, max_size=24))
        requests.append(
            jaxserve.Request(
                f"r{i}",
                prompt_token_ids=prefix + tail,
                sampling=jaxserve.SamplingParams(
                    draw(st.integers(1, 16)), stop_token_ids=draw(st.sampled_from([(), (STOP,)]))
                ),
                client_id=draw(st.sampled_from(["a", "b", "c"])),
                priority=draw(st.integers(0, 2)),
            )
        )
    # Mostly a cache that fits the largest request alone but not everyone at once (contention,
    # preemption); sometimes one too small for some requests (rejection at add_request).
    largest = max(-(-r.max_total_tokens // block_size) for r in requests)
    num_blocks = draw(st.one_of(st.integers(largest, 2 * largest), st.integers(max(1, largest // 2), largest)))
    arrivals = draw(st.lists(st.integers(0, 8), min_size=n, max_size=n))
    aborts = {}
    for i in draw(st.lists(st.integers(0, n - 1), max_size=3, unique=True)):
        aborts.setdefault(draw(st.integers(0, 30)), []).append(f"r{i}")
    options = dict(
        max_num_seqs=draw(st.integers(1, 6)),
        enable_prefix_caching=draw(st.booleans()),
        preemption_mode=draw(st.sampled_from(["recompute", "swap"])),
        watermark=draw(st.sampled_from([0.0, 0.01, 0.2])),
    )
    longest = max(r.max_total_tokens for r in requests)
    budget = draw(st.one_of(st.integers(longest, 2 * longest), st.integers(min(4, longest), longest)))
    kv = KVConfig(num_blocks, block_size, num_host_blocks=draw(st.integers(0, 2 * largest)))
    return requests, arrivals, aborts, options, budget, kv


def build(name: str, options: dict, budget: int):
    sched = jaxserve.scheduler.make(name)
    fields = {f.name for f in dataclasses.fields(sched)}
    opts = {k: v for k, v in options.items() if k in fields}
    for budget_field in ("chunk_size", "max_num_batched_tokens"):
        if budget_field in fields:
            opts[budget_field] = budget
    if "chunk_align" in fields:
        opts["chunk_align"] = 1
    return dataclasses.replace(sched, **opts)


def split_admissible(sched, kv, requests):
    """Requests add_request accepts, checking that rejections are exactly the impossible ones."""
    ok = []
    state = sched.init(kv)
    for req in requests:
        too_big = req.max_total_tokens > kv.capacity_tokens
        longest = getattr(sched, "longest_prefill", None)
        too_long = longest is not None and longest(req) > sched.max_num_batched_tokens
        if too_big or too_long:
            with pytest.raises(ValueError, match=req.request_id):
                sched.add_request(state, req, 0.0)
        else:
            sched.add_request(state, req, 0.0)
            ok.append(req)
    return ok


def check_scenario(name, scenario):
    requests, arrivals, aborts, options, budget, kv = scenario
    sched = build(name, options, budget)
    admissible = split_admissible(sched, kv, requests)
    arrival_of = {r.request_id: a for r, a in zip(requests, arrivals)}
    arrivals = [arrival_of[r.request_id] for r in admissible]
    budget_limit = budget if hasattr(sched, "chunk_size") or hasattr(sched, "max_num_batched_tokens") else None
    result, checker = run_checked(
        sched, kv, admissible, token_budget=budget_limit, token_fn=token_fn,
        arrival_steps=arrivals, aborts=aborts, max_steps=3000,
    )
    final = result.final_state
    # liveness: nothing pending, nothing lost, nothing duplicated
    assert not final.has_unfinished, f"{name}: requests still pending after {result.num_steps} steps"
    aborted = {rid for ids in aborts.values() for rid in ids}
    for req in admissible:
        rid = req.request_id
        if rid in result.finished:
            assert result.finished[rid].output_token_ids == expected_output(req), f"{name}: {rid} output"
        else:
            assert rid in aborted, f"{name}: {rid} was lost"
    for what, happened in (
        ("preemption", any(p.preempted for p in result.plans)),
        ("swap", any(p.swapped_out for p in result.plans)),
        ("swap-in", any(p.swapped_in for p in result.plans)),
        ("copy-on-write", any(p.copy_blocks for p in result.plans)),
        ("prefix hit", _admitted_with_cache_hit(result.plans)),
        ("chunked prefill", any((p.num_new_tokens > 1).any() and not p.samples_token.all() for p in result.plans)),
        ("abort", bool(aborted)),
        ("stop token", any(f.finish_reason == "stop" for f in result.finished.values())),
    ):
        if happened:
            event(what)
    # aborts and finishes release everything
    assert final.kv.device.num_used == 0 and final.kv.host.num_used == 0
    assert final.kv.device.num_free == kv.num_blocks
    return result


def _admitted_with_cache_hit(plans) -> bool:
    seen = set()
    for plan in plans:
        seen.update(plan.preempted)  # a recompute starts again
        for rid, nc in zip(plan.request_ids, plan.num_computed_tokens.tolist()):
            if rid not in seen and nc > 0:
                return True
        seen = (seen - set(plan.preempted)) | set(plan.request_ids)
    return False


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(scenario=scenarios())
def test_scheduler_invariants(name, scenario):
    check_scenario(name, scenario)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(scenario=scenarios())
def test_scheduler_invariants_exhaustive(name, scenario):
    check_scenario(name, scenario)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(scenario=scenarios())
def test_same_inputs_same_plans(name, scenario):
    requests, arrivals, aborts, options, budget, kv = scenario
    sched = build(name, options, budget)
    admissible = split_admissible(sched, kv, requests)
    arrival_of = {r.request_id: a for r, a in zip(requests, arrivals)}
    kwargs = dict(arrival_steps=[arrival_of[r.request_id] for r in admissible], aborts=aborts, token_fn=token_fn)
    first = drive(sched, kv, admissible, **kwargs)
    second = drive(build(name, options, budget), kv, admissible, **kwargs)
    assert [plan_key(p) for p in first.plans] == [plan_key(p) for p in second.plans]


def test_custom_scheduler_is_registered_and_short():
    assert "tiered" in NAMES
    source = (ROOT / "experiments" / "custom_scheduler.py").read_text()
    assert len(source.splitlines()) < 100
