"""Engine.serve: a request stream with arrival times on the real model under every registered
single-replica scheduler; all finish, the event log has them all, and the greedy tokens are the
same for every policy (and equal transformers')."""

from __future__ import annotations

import math

import numpy as np
import pytest
from engine_testing import MAX_ROWS, RUNNER_KV, greedy, prompt, request
from hf_checkpoints import hf_greedy

from jaxserve import scheduler as schedulers
from jaxserve.engine.engine import Engine
from jaxserve.kv.config import KVConfig
from jaxserve.metrics import summarize
from jaxserve.request import SamplingParams
from jaxserve.runtime import RunLimits

KV = KVConfig(RUNNER_KV.num_blocks, RUNNER_KV.block_size)
# Arrivals spread over the first few (measured, millisecond) steps, from two clients (for VTC).
SPECS = [(0.0, 17, 6), (0.0, 5, 9), (0.001, 30, 4), (0.004, 9, 7), (0.02, 12, 5), (0.05, 3, 8)]
REQUESTS = [
    request(f"e{i}", prompt(500 + i, n), greedy(m), arrival_time=t, client_id=f"c{i % 2}")
    for i, (t, n, m) in enumerate(SPECS)
]


def single_replica_policies():
    """Registered names whose scheduler is a single-replica ``Scheduler`` (the protocol)."""
    names = []
    for name in schedulers.available():
        try:
            sched = schedulers.make(name)
        except ValueError:
            continue
        if isinstance(sched, schedulers.Scheduler):
            names.append(name)
    return names


CASES = [(name, {}) for name in single_replica_policies()] + [
    ("vtc", {"base": "sarathi", "chunk_size": 8}),
    ("sarathi", {"chunk_size": 3, "enable_prefix_caching": True}),
]


def make(name, options):
    try:  # two sequences at a time keeps the runs within the shared runner's compiled shapes
        return schedulers.make(name, **{"max_num_seqs": MAX_ROWS, **options})
    except ValueError:
        return schedulers.make(name, **options)


@pytest.fixture(scope="module")
def expected(llama):
    return {r.request_id: tuple(hf_greedy(llama[1], r.prompt_token_ids, r.sampling.max_new_tokens)) for r in REQUESTS}


def test_the_usual_policies_are_registered():
    assert {"static", "orca", "vllm", "sarathi", "vtc"} <= set(single_replica_policies())


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}{'-' + '-'.join(map(str, o.values())) if o else ''}" for n, o in CASES])
def test_serve_finishes_everything_with_the_same_greedy_tokens(runner, expected, name, options):
    run = Engine(runner, make(name, options), KV).serve(REQUESTS)
    log = run.log
    n = len(REQUESTS)
    assert set(run.finished) == set(expected)
    for rid, tokens in expected.items():
        f = run.finished[rid]
        assert f.output_token_ids == tokens, f"{name}: {rid}"
        assert f.finish_reason == "length"
    # The event log has every request, admitted and finished once, after it arrived.
    assert [r.request_id for r in log.requests] == [r.request_id for r in REQUESTS]
    assert not log.rejected
    assert sorted(log.finished) == list(range(n)) and sorted(log.first_scheduled) == list(range(n))
    for i, r in enumerate(REQUESTS):
        assert r.arrival_time <= log.first_scheduled[i] < log.finished[i]
    frozen = log.freeze()
    per_request = np.bincount(frozen.token_req, minlength=n)
    assert per_request.tolist() == [r.sampling.max_new_tokens for r in REQUESTS]
    assert np.all(np.diff(frozen.step_end_s) >= 0) and np.all(frozen.step_duration_s > 0)
    metrics = summarize(frozen)
    assert metrics["num_finished"] == n and metrics["num_rejected"] == 0
    assert math.isfinite(metrics["ttft_s"]["mean"]) and metrics["ttft_s"]["mean"] > 0
    assert not runner._sampling  # every request released


def test_engine_checks_the_kv_shape_and_limits(runner):
    with pytest.raises(ValueError, match="does not match"):
        Engine(runner, schedulers.make("vllm"), KVConfig(32, RUNNER_KV.block_size))
    # A context limit below the runner's rejects in the log, the rest is served.
    short, long = request("short", prompt(600, 4), greedy(3)), request("long", prompt(601, 20), greedy(3))
    run = Engine(runner, make("vllm", {}), KV).serve([short, long], limits=RunLimits(max_context=16))
    assert set(run.finished) == {"short"}
    assert list(run.log.rejected.values()) == ["prompt + max_new_tokens = 23 > context 16"]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_serve_preempts_and_logs_it(runner, llama, mode):
    """Two requests that together outgrow the runner's 64 blocks: the later one is preempted
    (recomputed, or swapped to the runner's 16 host blocks) and both still get transformers'
    tokens; the event log counts the preemption."""
    reqs = [request("big", prompt(700, 170), greedy(30)), request("small", prompt(701, 30), greedy(30), arrival_time=1e-6)]
    kv = KVConfig(KV.num_blocks, KV.block_size, RUNNER_KV.num_host_blocks if mode == "swap" else 0)
    run = Engine(runner, make("sarathi", {"chunk_size": 32, "preemption_mode": mode}), kv).serve(reqs)
    for r in reqs:
        assert list(run.finished[r.request_id].output_token_ids) == hf_greedy(llama[1], r.prompt_token_ids, 30)
    assert run.finished["small"].num_preemptions == 1 and run.finished["big"].num_preemptions == 0
    assert run.log.preemptions == {1: 1}
    assert summarize(run.log.freeze())["num_preemptions"] == 1


def test_a_request_filling_max_model_len_and_the_whole_cache(runner, llama):
    """prompt + max_new_tokens = max_model_len = all 64 blocks: positions up to 255, the widest
    block table, and nothing else can run beside it."""
    assert runner.max_model_len == KV.num_blocks * KV.block_size == 256
    full = request("full", prompt(720, 250), greedy(6))
    after = request("after", prompt(721, 6), greedy(3))
    run = Engine(runner, make("sarathi", {"chunk_size": 32}), KV).serve([full, after])
    assert list(run.finished["full"].output_token_ids) == hf_greedy(llama[1], full.prompt_token_ids, 6)
    assert list(run.finished["after"].output_token_ids) == hf_greedy(llama[1], after.prompt_token_ids, 3)
    assert not run.log.rejected


def test_engine_refuses_a_host_pool_the_runner_lacks(runner):
    Engine(runner, schedulers.make("vllm"), KVConfig(KV.num_blocks, KV.block_size, RUNNER_KV.num_host_blocks))
    with pytest.raises(ValueError, match="host"):
        Engine(runner, schedulers.make("vllm"), KVConfig(KV.num_blocks, KV.block_size, RUNNER_KV.num_host_blocks + 1))


def test_serve_refuses_duplicate_request_ids(runner):
    """A second request under a running request's id must not re-register (and so re-sample) it."""
    a = request("dup", prompt(710, 9), greedy(6))
    again = request("dup", prompt(711, 5), SamplingParams(3, temperature=1.5, seed=1), arrival_time=1e-9)
    with pytest.raises(ValueError, match="'dup' appears more than once"):
        Engine(runner, make("vllm", {}), KV).serve([a, again])
    assert not runner._sampling
