"""The checks in sched_checks catch broken schedulers (so a passing property run means something).

Each broken scheduler below is vLLM with one deliberate bug, run on a small hand-built workload
that takes the broken path; the Checker must refuse it with the matching message. The same
workloads pass with the real scheduler, and take the path (``test_workloads_take_their_path``).
"""

from __future__ import annotations

import dataclasses

import pytest

from jaxserve import Request, SamplingParams
from jaxserve.kv import KVConfig
from jaxserve.persistent import evolve
from jaxserve.scheduler import VLLMScheduler
from sched_checks import aim_aborts, run_checked


def token_fn(rid, index):
    return 1 + (sum(map(ord, rid)) + 7 * index) % 50


def _pressure():
    """Three requests whose prompts fit together in 12 blocks of 4 but whose outputs do not."""
    return [Request(r, prompt_token_ids=list(range(k, k + 8)), sampling=SamplingParams(24))
            for r, k in (("a", 100), ("b", 200), ("c", 300))]


def _shared_prefix():
    """b hits a's cached prefix; c's prompt is exactly that prefix: it copies the last block."""
    shared = list(range(500, 512))
    return [Request("a", prompt_token_ids=shared + [1, 2], sampling=SamplingParams(3)),
            Request("b", prompt_token_ids=shared + [3], sampling=SamplingParams(3)),
            Request("c", prompt_token_ids=shared, sampling=SamplingParams(3))]


# name -> (scheduler options, KVConfig, requests, arrival steps, abort picks, the path it takes)
WORKLOADS = {
    "swap": (dict(preemption_mode="swap"), KVConfig(12, 4, num_host_blocks=16), _pressure, None, [], "swap-in"),
    "cow": (dict(enable_prefix_caching=True), KVConfig(64, 4), _shared_prefix, [0, 2, 2], [], "copy-on-write"),
    "abort running": (dict(), KVConfig(12, 4), _pressure, None, [("running", 2, 1)], "abort-running"),
    "abort waiting": (dict(max_num_seqs=1), KVConfig(12, 4), _pressure, None, [("waiting", 1, 0)], "abort-waiting"),
    "abort swapped": (dict(preemption_mode="swap"), KVConfig(12, 4, num_host_blocks=16), _pressure, None,
                      [("swapped", 0, 0)], "abort-swapped"),
}


def run(cls, workload):
    options, kv, requests, arrivals, picks, _ = WORKLOADS[workload]
    sched, requests = cls(**options), requests()
    kwargs = dict(token_fn=token_fn, arrival_steps=arrivals or [0] * len(requests))
    aborts = aim_aborts(sched, kv, requests, picks, **kwargs)
    return run_checked(sched, kv, requests, aborts=aborts, **kwargs)


# -- the bugs ------------------------------------------------------------------------------------


class AbortDoesNothing(VLLMScheduler):
    def abort(self, state, request_id, now):
        return state


class AbortLeaksBlocks(VLLMScheduler):
    """Drops the request but keeps its device and host blocks allocated."""

    def abort(self, state, request_id, now):
        new = super().abort(state, request_id, now)
        return evolve(new, kv=state.kv)


class SwapInToWrongBlocks(VLLMScheduler):
    """Restores host blocks into the right device blocks but in the wrong order."""

    def schedule(self, state, now):
        state, plan = super().schedule(state, now)
        if len(plan.swap_in_blocks) > 1:
            host, device = zip(*plan.swap_in_blocks)
            plan = dataclasses.replace(plan, swap_in_blocks=tuple(zip(host, device[::-1])))
        return state, plan


class CopyForgotten(VLLMScheduler):
    """Gives a fully cached prompt a fresh block for its last one but never copies into it."""

    def schedule(self, state, now):
        state, plan = super().schedule(state, now)
        return state, dataclasses.replace(plan, copy_blocks=())


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_workloads_take_their_path(workload):
    _, checker = run(VLLMScheduler, workload)
    assert checker.paths[WORKLOADS[workload][-1]] >= 1


@pytest.mark.parametrize(
    "cls, workload, message",
    [
        (AbortDoesNothing, "abort running", "left it running"),
        (AbortDoesNothing, "abort waiting", "left it waiting"),
        (AbortDoesNothing, "abort swapped", "left it swapped"),
        (AbortLeaksBlocks, "abort running", "refcounts"),
        (AbortLeaksBlocks, "abort swapped", "host blocks"),
        (SwapInToWrongBlocks, "swap", "does not hold that position's KV"),
        (CopyForgotten, "cow", "no cache hit|does not hold that position's KV"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_checker_catches(cls, workload, message):
    with pytest.raises(AssertionError, match=message):
        run(cls, workload)
