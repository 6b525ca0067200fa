"""Property tests: every registered scheduler (built-in or registered by a script) on random workloads.

Random arrivals, prompt/output lengths, shared prefixes (and follow-ups that repeat one), stop
tokens, clients, priorities, tiny KV caches and block sizes, swap space, prefix caching on/off, and
aborts aimed at requests that are waiting, running, preempted or swapped out at that moment (and
at finished or unknown ids). Each step is checked by ``sched_checks.Checker`` (KV accounting and
contents, sharing, freed-page hygiene, exclusive writes, exactly-once computation, budgets,
determinism, what each abort freed); each run must finish every request not aborted with the right
tokens, none that was aborted, and release every block.

The checks prove what they cover: ``test_scheduler_invariants[name]`` runs its own hypothesis
exploration and then asserts that the workloads took every path policy ``name`` has (see
``expected_paths``) and none it must not, so it is meaningful alone (``-k``) and in any order.
"""

from __future__ import annotations

import collections
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
from sched_checks import NOOP_ABORTS, PATHS, REAL_ABORTS, aim_aborts, plan_key, run_checked

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


def tokens(min_size=0, max_size=24):
    return st.lists(st.integers(1, VOCAB), min_size=min_size, max_size=max_size)


@st.composite
def prompt_prefix(draw, block_size):
    """Often whole blocks, so that a prompt equal to the prefix is fully cached (copy-on-write)."""
    if draw(st.booleans()):
        k = draw(st.integers(1, 3)) * block_size
        return draw(tokens(k, k))
    return draw(tokens(0, 3 * block_size))


# Abort picks (see sched_checks.aim_aborts): a request state, which occurrence, which request.
# Hypothesis favours early elements: the rarer states come first.
ABORT_KINDS = ("swapped", "preempted", "running", "waiting", *NOOP_ABORTS)
assert set(ABORT_KINDS) == set(REAL_ABORTS + NOOP_ABORTS)


def abort_picks(kinds=ABORT_KINDS):
    return st.lists(st.tuples(st.sampled_from(kinds), st.integers(0, 4), st.integers(0, 7)), min_size=1, max_size=4)


def make_request(draw, rid, prompt, long_outputs):
    return jaxserve.Request(
        rid,
        prompt_token_ids=prompt,
        sampling=jaxserve.SamplingParams(
            draw(st.integers(4 if long_outputs else 1, 16)), stop_token_ids=draw(st.sampled_from([(), (STOP,)]))
        ),
        client_id=draw(st.sampled_from(["a", "b", "c"])),
        priority=draw(st.integers(0, 2)),
    )


@st.composite
def scenarios(draw, preemption_mode=None):
    """(requests, arrival steps, abort picks, scheduler options, token budget, KVConfig); the
    preemption mode is drawn unless given."""
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    prefixes = [draw(prompt_prefix(block_size)) for _ in range(2)]
    # "crowded": several requests at once in a cache that barely fits the largest one, so that
    # running requests outgrow it (preemption, swapping); "roomy": batches of several requests
    # even with full reservations (static, orca), so cached prefixes are shared (copy-on-write).
    pressure = draw(st.sampled_from(["crowded", "mixed", "roomy"]))
    crowded = pressure == "crowded"
    n = draw(st.integers(3 if crowded else 1, 10))
    requests = []
    for i in range(n):
        prefix = prefixes[draw(st.integers(0, 1))]
        tail = draw(st.one_of(st.just([]), tokens(1)) if prefix else tokens(1))
        requests.append(make_request(draw, f"r{i}", prefix + tail, crowded))
    arrivals = draw(st.lists(st.integers(0, 2 if crowded else 8), min_size=n, max_size=n))
    # Follow-up pairs, later: a longer prompt and then the bare prefix, whole blocks of it. The
    # prefix is cached by then and held by the first of the pair, so the second copies its last
    # block (copy-on-write, even in static batching where both must join one batch).
    for _ in range(draw(st.integers(0, 2))):
        prefix = prefixes[draw(st.integers(0, 1))]
        whole_blocks = prefix[: len(prefix) // block_size * block_size]
        if whole_blocks:
            at = draw(st.integers(2, 12))
            for prompt in (prefix + draw(tokens(1, 8)), whole_blocks):
                requests.append(make_request(draw, f"r{len(requests)}", prompt, crowded))
                arrivals.append(at)
    # Mostly a cache that fits the largest request alone but not everyone at once (contention,
    # preemption); sometimes one too small for some requests (rejection at add_request).
    largest = max(-(-r.max_total_tokens // block_size) for r in requests)
    if crowded:
        num_blocks = draw(st.integers(largest, largest + 2))
    elif pressure == "roomy":
        num_blocks = draw(st.integers(3 * largest, 6 * largest))
    else:
        num_blocks = draw(st.one_of(st.integers(largest, 2 * largest), st.integers(max(1, largest // 2), largest)))
    options = dict(
        max_num_seqs=draw(st.integers(2 if crowded else 1, 6)),
        enable_prefix_caching=draw(st.booleans()),
        preemption_mode=preemption_mode or draw(st.sampled_from(["recompute", "swap"])),
        watermark=draw(st.sampled_from([0.0, 0.01, 0.2])),
    )
    longest = max(r.max_total_tokens for r in requests)
    roomy_budget = st.integers(longest, 2 * longest)
    budget = draw(roomy_budget if crowded else st.one_of(roomy_budget, st.integers(min(4, longest), longest)))
    # swap mode mostly with room on the host for a victim; sometimes too little (recompute fallback)
    host = st.integers(largest // 2, 2 * largest) if options["preemption_mode"] == "swap" else st.integers(0, 2 * largest)
    kv = KVConfig(num_blocks, block_size, num_host_blocks=draw(host))
    # nothing is ever swapped out in recompute mode: aim at the other states there
    kinds = ABORT_KINDS if options["preemption_mode"] == "swap" else tuple(k for k in ABORT_KINDS if k != "swapped")
    return requests, arrivals, draw(abort_picks(kinds)), options, budget, kv


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


def prepare(name, scenario):
    """The scheduler, its admissible requests, the driver's arguments (aborts aimed at real
    requests) and the token budget to check, for one scenario."""
    requests, arrivals, picks, options, budget, kv = scenario
    sched = build(name, options, budget)
    admissible = split_admissible(sched, kv, requests)
    arrival_of = {r.request_id: a for r, a in zip(requests, arrivals)}
    kwargs = dict(token_fn=token_fn, arrival_steps=[arrival_of[r.request_id] for r in admissible], max_steps=3000)
    kwargs["aborts"] = aim_aborts(sched, kv, admissible, picks, output_form="alternate", **kwargs)
    budget_limit = budget if hasattr(sched, "chunk_size") or hasattr(sched, "max_num_batched_tokens") else None
    return sched, kv, admissible, kwargs, budget_limit


def check_scenario(name, scenario) -> set[str]:
    """Runs one scenario under the Checker; every request not aborted finishes with the right
    tokens, no aborted one does, and every block is released. Returns the paths it took."""
    sched, kv, admissible, kwargs, budget_limit = prepare(name, scenario)
    result, checker = run_checked(sched, kv, admissible, token_budget=budget_limit, **kwargs)
    final = result.final_state
    # liveness: nothing pending, nothing lost, nothing duplicated
    assert not final.has_unfinished, f"{name}: requests still pending after {result.num_steps} steps"
    for req in admissible:
        rid = req.request_id
        if rid in checker.aborted:
            assert rid not in result.finished, f"{name}: {rid} finished although it was aborted"
        else:
            assert rid in result.finished, f"{name}: {rid} was lost"
            assert result.finished[rid].output_token_ids == expected_output(req), f"{name}: {rid} output"
    # aborts and finishes release everything
    assert final.kv.device.num_used == 0 and final.kv.host.num_used == 0
    assert final.kv.device.num_free == kv.num_blocks
    paths = {p for p, count in checker.paths.items() if count}
    if any(f.finish_reason == "stop" for f in result.finished.values()):
        event("stop token")
    for path in sorted(paths):
        event(path)
    return paths


# Static batching and Orca reserve prompt + max_new_tokens at admission: they never run out of
# blocks, so they never preempt, swap, or hold a preempted or swapped request.
NEVER_PREEMPTS = {"static", "orca"}
PREEMPTION_PATHS = {"preempt-recompute", "preempt-swap", "swap-in", "abort-preempted", "abort-swapped"}


def expected_paths(name: str) -> tuple[set[str], set[str]]:
    """(paths random workloads must reach, paths they must never take) for policy ``name``."""
    if name in NEVER_PREEMPTS:
        return set(PATHS) - PREEMPTION_PATHS, PREEMPTION_PATHS
    return set(PATHS), set()


def explore(name: str, max_examples: int, derandomize: bool) -> collections.Counter:
    """Runs ``max_examples`` hypothesis scenarios through ``check_scenario``, half of them with
    each preemption mode (so neither is left to chance); returns, per path, the number of
    scenarios that took it."""
    hits = collections.Counter()
    for mode in ("recompute", "swap"):

        @settings(max_examples=max_examples // 2, deadline=None, derandomize=derandomize, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(scenario=scenarios(mode))
        def one(scenario):
            hits.update(check_scenario(name, scenario))

        one()
    return hits


def assert_coverage(name: str, hits: collections.Counter) -> None:
    required, forbidden = expected_paths(name)
    missing = sorted(required - set(hits))
    assert not missing, f"{name}: random workloads never reached {missing}; reached {dict(hits)}"
    taken = sorted(forbidden & set(hits))
    assert not taken, f"{name}: took {taken}, which it never should"


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_invariants(name):
    """160 random workloads pass every Checker invariant, and together they reach every path the
    policy has (preemption by recompute and swap, copy-on-write, prefix hits, aborts in each state)."""
    assert_coverage(name, explore(name, max_examples=160, derandomize=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_scheduler_invariants_exhaustive(name):
    assert_coverage(name, explore(name, max_examples=3000, derandomize=False))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(scenario=scenarios())
def test_same_inputs_same_plans(name, scenario):
    sched, kv, admissible, kwargs, _ = prepare(name, scenario)
    first = drive(sched, kv, admissible, **kwargs)
    second = drive(dataclasses.replace(sched), kv, admissible, **kwargs)
    assert [plan_key(p) for p in first.plans] == [plan_key(p) for p in second.plans]


def test_custom_scheduler_is_registered_and_short():
    assert "tiered" in NAMES
    source = (ROOT / "experiments" / "custom_scheduler.py").read_text()
    assert len(source.splitlines()) < 100
