"""The engine with asynchronous scheduling (``Engine(async_scheduling=True)``, runtime/pipelined.py)
against the synchronous engine on the session's tiny Llama: per-request tokens and finish reasons
identical for greedy and seeded sampling under every usual policy, with stop tokens hit in the
middle of a batch, preemption in a small pool (recompute and swap), prefix caching, and an abort
while a step is in flight; nothing leaks."""

from __future__ import annotations

import dataclasses

import pytest
from engine_testing import MAX_ROWS, RUNNER_KV, greedy, prompt, request, step_compiles

from jaxserve import scheduler as schedulers
from jaxserve.engine.engine import Engine
from jaxserve.kv.config import KVConfig
from jaxserve.request import SamplingParams
from jaxserve.runtime import RunLimits
from jaxserve.runtime.pipelined import PipelinedReplica, run_pipelined

KV = KVConfig(RUNNER_KV.num_blocks, RUNNER_KV.block_size)
SPECS = [(0.0, 17, 6), (0.0, 5, 9), (0.001, 30, 4), (0.004, 9, 7), (0.02, 12, 5), (0.05, 3, 8)]
POLICIES = [("vllm", {}), ("sarathi", {"chunk_size": 8}), ("orca", {}), ("static", {}),
            ("vtc", {"base": "sarathi", "chunk_size": 8})]  # fmt: skip


def make(name, options):
    try:  # two sequences at a time keeps the runs within the shared runner's compiled shapes
        return schedulers.make(name, **{"max_num_seqs": MAX_ROWS, **options})
    except ValueError:
        return schedulers.make(name, **options)


def workload(seeded: bool, stops: dict | None = None):
    """SPECS as requests (greedy, or seeded temperature/top-k/top-p sampling); ``stops``: request
    id -> stop token ids."""
    out = []
    for i, (t, n, m) in enumerate(SPECS):
        sp = SamplingParams(m, temperature=0.9, top_k=20, top_p=0.9, seed=40 + i) if seeded else greedy(m)
        if stops and f"a{i}" in stops:
            sp = dataclasses.replace(sp, stop_token_ids=stops[f"a{i}"])
        out.append(request(f"a{i}", prompt(900 + i, n), sp, arrival_time=t, client_id=f"c{i % 2}"))
    return out


def outputs(run):
    return {rid: (f.output_token_ids, f.finish_reason) for rid, f in run.finished.items()}


def mid_output_stops(tokens: dict) -> dict:
    """For every other request, the first of its generated tokens not generated before it (and not
    its last) as a stop token: those requests stop in the middle of a batch (the tiny random model
    repeats itself: often at their first token), the others run to length."""
    stops = {}
    for k, (rid, out) in enumerate(sorted(tokens.items())):
        first_new = next((j for j in range(len(out) - 1) if out[j] not in out[:j]), None)
        if k % 2 == 0 and first_new is not None:
            stops[rid] = (out[first_new],)
    return stops


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("name, options", POLICIES, ids=[n for n, _ in POLICIES])
def test_async_gives_the_synchronous_tokens(runner, name, options, seeded):
    free = Engine(runner, make(name, options), KV).serve(workload(seeded))
    stops = mid_output_stops({rid: f.output_token_ids for rid, f in free.finished.items()})
    assert len(stops) >= 2
    reqs = workload(seeded, stops)
    sync = outputs(Engine(runner, make(name, options), KV).serve(reqs))
    assert {reason for _, reason in sync.values()} == {"stop", "length"}
    for inputs in ("device", "host") if not seeded else ("device",):  # (host inputs: the greedy runs)
        engine = Engine(runner, make(name, options), KV, async_scheduling=True, async_inputs=inputs)
        run = engine.serve(reqs)
        assert outputs(run) == sync, inputs
        assert sorted(run.log.finished) == list(range(len(reqs))) and not run.log.rejected
        assert engine.overlap.overlapped_steps > 0
        assert not runner._sampling  # every request released


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_async_preemption_and_prefix_caching_leave_nothing_behind(runner, mode):
    """Requests sharing a prompt prefix outgrow the runner's 64 blocks: preempted (recomputed or
    swapped), prefix hits on, stop tokens; the tokens are the synchronous engine's and at the end
    every block is free or evictable."""
    shared = prompt(950, 24)
    reqs = [request("big", shared + prompt(951, 180), greedy(30)),
            request("small", shared + prompt(952, 8), greedy(30), arrival_time=1e-6),
            request("third", shared + prompt(953, 4), greedy(12), arrival_time=2e-6)]  # fmt: skip
    kv = KVConfig(KV.num_blocks, KV.block_size, RUNNER_KV.num_host_blocks if mode == "swap" else 0)
    options = {"chunk_size": 32, "preemption_mode": mode, "enable_prefix_caching": True}
    free = Engine(runner, make("sarathi", options), kv).serve(reqs)
    stop = free.finished["third"].output_token_ids[0]
    reqs[2] = dataclasses.replace(reqs[2], sampling=dataclasses.replace(reqs[2].sampling, stop_token_ids=(stop,)))
    sync = Engine(runner, make("sarathi", options), kv).serve(reqs)
    sched = make("sarathi", options)
    replica = PipelinedReplica(sched, kv, runner, limits=RunLimits(max_context=runner.max_model_len),
                               admit=runner.register)  # fmt: skip
    finished = {}
    replica._on_finished = lambda fs: finished.update((f.request_id, (f.output_token_ids, f.finish_reason)) for f in fs)
    try:
        log = run_pipelined(sched, kv, runner, reqs, replica=replica)
    finally:
        for r in reqs:
            runner.release(r.request_id)
    assert finished == outputs(sync)
    assert finished["third"][1] == "stop"
    assert log.preemptions
    state = replica.state
    assert not state.has_unfinished and state.kv.device.num_used == 0 and state.kv.host.num_used == 0
    assert state.kv.device.num_evictable > 0  # the prefix cache kept blocks


def test_an_abort_while_a_step_is_in_flight(runner):
    reqs = workload(False)
    sync = outputs(Engine(runner, make("sarathi", {"chunk_size": 8}), KV).serve(reqs))
    sched = make("sarathi", {"chunk_size": 8})
    replica = PipelinedReplica(sched, KV, runner, admit=runner.register)
    finished = {}
    replica._on_finished = lambda fs: finished.update((f.request_id, (f.output_token_ids, f.finish_reason)) for f in fs)
    try:
        for r in reqs:
            replica.add(r)
        aborted = None
        while replica.next_event_time == replica.now:
            replica.step()
            if aborted is None and replica.in_flight and replica.num_steps >= 2:
                aborted = replica.state.running.ids[0]  # its row is in the step on the device now
                replica.abort(aborted)
                runner.release(aborted)
        replica.drain()
    finally:
        for r in reqs:
            runner.release(r.request_id)
    assert aborted is not None and aborted not in finished
    assert finished == {rid: v for rid, v in sync.items() if rid != aborted}
    assert replica.state.kv.device.num_used == 0 and not replica.state.has_unfinished


def test_async_compiles_only_in_warm_ups(runner):
    """Input ids gathered on the device and packed host ids are committed alike (``_run``), so
    one compiled step serves both: every step compilation is a first use's warm-up."""
    before = set(runner._compiled)
    with step_compiles() as found:
        Engine(runner, make("vllm", {}), KV, async_scheduling=True).serve(workload(False))
    new = set(runner._compiled) - before
    assert len(found) == len(new)


def test_async_scheduling_is_refused_for_a_bad_switch(runner):
    with pytest.raises(ValueError, match="async_scheduling must be a bool"):
        Engine(runner, make("vllm", {}), KV, async_scheduling=1)
    with pytest.raises(ValueError, match="async_inputs must be one of"):
        Engine(runner, make("vllm", {}), KV, async_scheduling=True, async_inputs="gpu")


def test_llm_and_the_config_key(llama):
    import jaxserve
    from config_defaults import default_config

    from jaxserve.config import ConfigError, override
    from jaxserve.engine.serve_config import engine_settings

    options = dict(num_blocks=RUNNER_KV.num_blocks, block_size=RUNNER_KV.block_size, scheduler="vllm",
                   scheduler_options={"max_num_seqs": MAX_ROWS}, stop_at_eos=False)  # fmt: skip
    prompts = [prompt(980, 9), prompt(981, 5)]
    sampling = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3)
    outs = [[c.token_ids for c in jaxserve.LLM(llama[0], async_scheduling=a, **options).generate(prompts, sampling)]
            for a in (False, True)]  # fmt: skip
    assert outs[0] == outs[1]
    with pytest.raises(ValueError, match="async_scheduling=True does not run with esp"):
        jaxserve.LLM(llama[0], async_scheduling=True, esp=True, sp=2, **options)
    config = override(default_config(), {"backend": "engine", "model.path": llama[0], "engine.compile_cache": ""})
    assert engine_settings(config).async_scheduling is False
    assert engine_settings(override(config, {"engine.async_scheduling": True})).async_scheduling is True
    with pytest.raises(ConfigError, match="engine.async_scheduling does not run with parallel.esp"):
        engine_settings(override(config, {"engine.async_scheduling": True, "parallel.esp": True, "parallel.sp": 2}))
