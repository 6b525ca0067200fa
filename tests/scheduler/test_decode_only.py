"""The fast path's dry run: ``next_is_stable_decode(sched, state)`` (the policy's ``decode_only``)
says exactly what scheduling would: whether ``schedule(state)`` plans a stable decode."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxserve
from jaxserve.kv import KVConfig
from jaxserve.scheduler.driver import drive
from jaxserve.scheduler.fast_forward import is_stable_decode, next_is_stable_decode
from jaxserve.scheduler.vllm import VLLMScheduler

POLICIES = [
    ("vllm", {}), ("vllm", {"enable_prefix_caching": True}), ("vllm", {"preemption_mode": "swap"}),
    ("vllm", {"max_num_seqs": 3}), ("sarathi", {"chunk_size": 32}), ("sarathi", {"chunk_size": 16, "chunk_align": 4}),
    ("sarathi", {"chunk_size": 5, "chunk_align": 2}),  # the decodes leave too little (or no) budget
    ("sarathi", {"enable_prefix_caching": True, "chunk_size": 24}), ("sarathi", {"preemption_mode": "swap"}),
    ("orca", {}), ("static", {"max_num_seqs": 4}),
]  # fmt: skip


def _requests(rng, n: int, shared_prefix: bool, max_total: int) -> list:
    """``n`` requests of at most ``max_total`` tokens; with ``shared_prefix`` every other one starts
    with the same tokens (prefix-cache hits)."""
    half = max_total // 2
    prefix = list(range(1, half // 2 + 1))
    out = []
    for i in range(n):
        tokens = [int(t) for t in rng.integers(1, 50, int(rng.integers(1, half - len(prefix) + 1)))]
        if shared_prefix and i % 2:
            tokens = prefix + tokens
        out.append(jaxserve.Request(f"r{i}", prompt_token_ids=tokens,
                                    sampling=jaxserve.SamplingParams(int(rng.integers(1, half + 1)))))
    return out


@pytest.mark.parametrize("name, opts", POLICIES)
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10_000), num_blocks=st.sampled_from([12, 24, 200]), block_size=st.sampled_from([1, 4, 16]))
def test_dry_run_agrees_with_scheduling(name, opts, seed, num_blocks, block_size):
    rng = np.random.default_rng(seed)
    sched = jaxserve.scheduler.make(name, max_num_batched_tokens=64, **opts) if name in ("vllm", "orca", "static") \
        else jaxserve.scheduler.make(name, **opts)
    kv = KVConfig(num_blocks, block_size, num_host_blocks=8)
    requests = _requests(rng, 12, bool(seed % 2), min(kv.capacity_tokens, 64))
    seen = collections.Counter()

    def check(rec):
        answer = next_is_stable_decode(sched, rec.before)
        assert answer == is_stable_decode(sched, rec.before, rec.plan), rec.plan.step
        seen[answer] += 1

    drive(sched, kv, requests, arrival_steps=sorted(rng.integers(0, 40, len(requests)).tolist()), on_step=check,
          keep_plans=False)
    assert seen[False] > 0  # (True in most examples; the test below needs both)


def test_dry_run_reaches_both_answers_and_leaves_the_state_unchanged():
    sched = jaxserve.scheduler.make("sarathi", chunk_size=16)
    kv = KVConfig(40, 4)
    requests = [jaxserve.Request(f"r{i}", prompt_len=10 + i, sampling=jaxserve.SamplingParams(12)) for i in range(4)]
    answers = []

    def check(rec):
        tables = rec.before.running.block_tables
        free = rec.before.kv.device.num_free
        answers.append(next_is_stable_decode(sched, rec.before))
        assert rec.before.running.block_tables == tables and rec.before.kv.device.num_free == free

    drive(sched, kv, requests, arrival_steps=[0, 0, 3, 9], on_step=check)
    assert True in answers and False in answers


def test_policies_without_a_dry_run_or_with_fair_queues():
    class Stepped(VLLMScheduler):
        fast_forward_safe = True  # declared, but no decode_only of its own: only scheduling can tell

    kv = KVConfig(40, 4)
    state = Stepped().init(kv)
    assert next_is_stable_decode(Stepped(), state) is None
    vtc = jaxserve.scheduler.make("vtc")
    assert next_is_stable_decode(vtc, vtc.init(kv)) is False
