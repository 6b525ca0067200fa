"""RayExecutor: a ModelRunner in a Ray actor behind the Executor protocol.

With ``ray`` installed (``pip install -e ".[ray]"``): the engine loop driving a runner in an actor
gives the same greedy and seeded-sampling tokens as the in-process runner; ``register``'s
ValueError crosses the actor as a ValueError with its message (so the replica logs the same
rejection); KV pages read from one actor and written into another (other block ids) are the same
bytes. Without ray those are skipped; what crosses the process boundary (plans, requests, step
outputs) is checked to pickle either way, and a missing ray is an ImportError naming the extra.

One local Ray instance (2 CPUs) and one actor serve the module; the actor shares the session's
persistent compilation cache, so the shapes the in-process runner compiled are file reads there.
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
from engine_testing import RUNNER_KV, greedy, prompt, request, run_steps

from jaxserve import scheduler as schedulers
from jaxserve.engine.engine import Engine
from jaxserve.engine.ray_executor import RayExecutor, init_local_ray
from jaxserve.kv.config import KVConfig
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import SamplingParams

# ray.init starts its processes with fork+exec from a process running jax, which warns of fork.
pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")

KV = KVConfig(RUNNER_KV.num_blocks, RUNNER_KV.block_size)
GREEDY = [request(f"rg{i}", prompt(800 + i, n), greedy(m)) for i, (n, m) in enumerate([(9, 6), (14, 5), (5, 7)])]
SAMPLED = [
    request(f"rs{i}", prompt(810 + i, n), SamplingParams(max_new_tokens=m, temperature=0.8, top_p=0.9, seed=100 + i))
    for i, (n, m) in enumerate([(11, 6), (6, 8), (3, 5)])
]


def vllm():
    return schedulers.make("vllm", max_num_seqs=2)  # within the shared runner's compiled shapes


# -- without ray ------------------------------------------------------------------------------------
def test_what_crosses_to_the_actor_pickles():
    sched = vllm()
    state = sched.init(KV)
    for r in GREEDY + SAMPLED:
        assert pickle.loads(pickle.dumps(r)) == r
        state = sched.add_request(state, r, 0.0)
    state, plan = sched.schedule(state, 0.0)
    copy = pickle.loads(pickle.dumps(plan))
    assert isinstance(copy, BatchPlan) and copy.entries == plan.entries and copy.step == plan.step
    tokens = np.arange(int(plan.samples_token.sum()), dtype=np.int64) + 3
    out = StepOutput.for_plan(plan, tokens, 0.25)
    back = pickle.loads(pickle.dumps(out))
    assert dict(back.token_ids) == dict(out.token_ids) and back.duration_s == 0.25
    assert pickle.loads(pickle.dumps(KV)) == KV


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r'"ray" extra: pip install -e "\.\[ray\]"'):
        RayExecutor.start("/nonexistent", KV)


# -- on a local Ray instance ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason='ray is not installed (pip install -e ".[ray]")')
    started = not ray.is_initialized()
    init_local_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def remote(ray_instance, llama):
    import jax

    executor = RayExecutor.start(llama[0], RUNNER_KV, compile_cache=jax.config.jax_compilation_cache_dir)
    yield executor
    executor.shutdown()


def test_the_actor_runs_the_runner_on_cpu_in_its_own_process(remote, runner):
    assert remote.pid != os.getpid() and remote.backend == "cpu"
    assert (remote.kv, remote.max_model_len, remote.cfg) == (runner.kv, runner.max_model_len, runner.cfg)
    assert remote.spec == runner.spec and remote.attention == runner.attention


@pytest.mark.parametrize("requests", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_the_engine_on_an_actor_gives_the_in_process_tokens(remote, runner, requests):
    local = Engine(runner, vllm(), KV).serve(requests)
    served = Engine(remote, vllm(), KV).serve(requests)
    assert set(served.finished) == {r.request_id for r in requests} and not served.log.rejected
    for r in requests:
        got, want = served.finished[r.request_id], local.finished[r.request_id]
        assert got.output_token_ids == want.output_token_ids, r.request_id
        assert len(got.output_token_ids) == r.sampling.max_new_tokens
    # Arrivals at 0 and a deterministic scheduler: the same steps, each timed by the actor.
    a, b = local.log.freeze(), served.log.freeze()
    assert len(b.step_end_s) == len(a.step_end_s) and np.all(b.step_duration_s > 0)
    assert remote.overhead_seconds > 0
    if requests is SAMPLED:
        assert len({t for r in requests for t in served.finished[r.request_id].output_token_ids}) > 3


def test_register_refusals_cross_the_actor_as_value_errors(remote, runner):
    bad_id = request("bad-id", [5, 500, 7], greedy(2))
    too_long = request("too-long", prompt(820, 250), greedy(10))
    for r in (bad_id, too_long):
        with pytest.raises(ValueError) as local:
            runner.register(r)
        with pytest.raises(ValueError) as there:
            remote.register(r)
        assert type(there.value) is ValueError and str(there.value) == str(local.value)
        assert "raised in a Ray actor" in there.value.__notes__[0]
    # So the replica rejects them with the same reason and serves the rest.
    good = request("good", prompt(821, 6), greedy(3))
    served = Engine(remote, vllm(), KV).serve([bad_id, good])
    assert set(served.finished) == {"good"}
    assert list(served.log.rejected.values()) == [
        "request 'bad-id': prompt token id 500 is outside the vocabulary [0, 96)"
    ]
    with pytest.raises(ValueError, match="outside this runner's pool"):
        remote.read_kv([64])


def test_a_checkpoint_the_actor_cannot_load_raises_its_error(remote, tmp_path):
    from jaxserve.model.config import CheckpointError

    with pytest.raises(CheckpointError, match="has no config.json"):
        RayExecutor.start(str(tmp_path), KV)


def test_kv_pages_read_from_one_actor_and_written_into_another(remote, llama):
    r = request("kv-moved", prompt(830, 13), greedy(4))
    trace = run_steps(remote, vllm(), KV, [r])  # leaves the request's KV in its pages
    blocks = list(trace.plans[-1].block_tables[0])
    assert len(blocks) == 4  # 13 + 3 tokens in KV
    payload = remote.read_kv(blocks)
    assert payload.shape[3] == len(blocks) and np.any(payload != 0)

    other = RayExecutor.start(llama[0], KVConfig(num_blocks=40, block_size=RUNNER_KV.block_size))
    try:
        dst = [39, 0, 21, 7]  # another pool size, other ids, another order
        assert dst != blocks
        other.write_kv(dst, payload)
        assert other.read_kv(dst).tobytes() == payload.tobytes()
        assert other.read_kv(dst[::-1]).tobytes() == payload[:, :, :, ::-1].tobytes()
        assert not np.any(other.read_kv([1, 2, 38]))
        with pytest.raises(ValueError, match=r"payload of shape .* is needed for 3 blocks"):
            other.write_kv([1, 2, 3], payload)
        # Both CPUs of the instance are reserved now: a third actor cannot start.
        with pytest.raises(TimeoutError, match=r"did not start within 2 s \(it reserves num_cpus=1"):
            RayExecutor.start(llama[0], KV, timeout_s=2)
    finally:
        other.shutdown()
