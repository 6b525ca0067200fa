"""LoongServe's elastic sequence parallelism in the engine (``engine/esp_runner.py``) on 8 forced
host CPU devices: greedy and seeded-sampling tokens, and every computed position's float32 logits,
equal the single-device runner's when a long prompt is prefilled over k = 2, 4, 8 devices and
decoded on fewer, when a decode scales up onto another device because its devices' pools are full,
and in a batch mixing one-device and multi-device requests; an abort frees the request's pages on
every device. Prompt lengths (37, 41, 33) are divisible by none of the degrees.

Two ESP runners serve all scenarios (each new step shape compiles once per runner, a few seconds on
the CI machine): a roomy one (16 pages per device) and a tight one (2 pages per device). k = 2 and 4
are ``slow``; k = 8 is the default run's.
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_testing import greedy, prompt, request, run_steps

from jaxserve import scheduler as schedulers
from jaxserve.engine.esp_policy import EspPolicy
from jaxserve.engine.esp_runner import EspRunner
from jaxserve.kv.config import KVConfig
from jaxserve.parallel.mesh import sequence_mesh
from jaxserve.request import SamplingParams

N = 8
ATOL = 1e-5  # float32: the partials are only summed in another order (observed ~1e-7)
ROOMY = KVConfig(num_blocks=16 * N, block_size=4)  # the ESP runner's pool: 16 pages per device
TIGHT = KVConfig(num_blocks=2 * N, block_size=4)  # 2 pages (8 tokens) per device
SCHED_KV = KVConfig(num_blocks=64, block_size=4)  # what the scheduler plans (<= both runners' pools)


class Recorder(EspRunner):
    """An EspRunner that takes explicit prefill degrees by request id and records, per request, the
    devices that staged its prefill and its KV shards just before it left."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.degrees: dict[str, int] = {}
        self.staged: dict[str, set[int]] = {}
        self.shards: dict[str, list] = {}
        self.step_devices: list[dict[str, set[int]]] = []  # per step: request -> devices holding its KV

    def register(self, request):
        super().register(request)
        if request.request_id in self.degrees:
            self.set_prefill_degree(request.request_id, self.degrees[request.request_id])

    def release(self, request_id):
        if request_id in self.pages._tables:
            self.shards[request_id] = self.pages.shards_of(request_id)
        super().release(request_id)

    def _execute(self, plan, all_logits):
        out = super()._execute(plan, all_logits)
        self.step_devices.append({})
        for rid, rows in zip(plan.request_ids, self.last_rows):
            self.staged.setdefault(rid, set()).update(rows.stage_dev[rows.stage_dev >= 0].tolist())
            self.step_devices[-1][rid] = set(rows.dest_dev.tolist())
        self.pages.check_invariants()
        return out


def esp(llama_params, kv, policy=EspPolicy()):
    cfg, params = llama_params
    return Recorder(cfg, params, kv, mesh=sequence_mesh(size=N), policy=policy)


@pytest.fixture(scope="module")
def roomy(llama_params):
    return esp(llama_params, ROOMY)


@pytest.fixture(scope="module")
def tight(llama_params):
    return esp(llama_params, TIGHT)


def both(reference, runner, requests, kv=SCHED_KV, arrival_steps=None, scheduler=("vllm", {})):
    """Runs ``requests`` on the one-device ``reference`` and on ``runner`` under ``scheduler`` (name,
    options); checks equal tokens and logits; returns the ESP trace."""
    name, options = scheduler
    want = run_steps(reference, schedulers.make(name, **options), kv, requests, arrival_steps=arrival_steps, with_logits=True)
    got = run_steps(runner, schedulers.make(name, **options), kv, requests, arrival_steps=arrival_steps, with_logits=True)
    assert got.tokens == want.tokens
    for r in requests:
        np.testing.assert_allclose(got.logits_matrix(r.request_id), want.logits_matrix(r.request_id), atol=ATOL, rtol=0)
    return got


def sampled(n: int, seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.9, top_k=40, top_p=0.95, seed=seed)


@pytest.mark.parametrize("k", [pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow), 8])
def test_long_prefill_over_k_devices_then_decode_on_fewer(runner, roomy, k):
    rid = f"long-{k}"
    roomy.degrees[rid] = k
    both(runner, roomy, [request(rid, prompt(7, 37), greedy(5))])
    assert len(roomy.staged[rid] | {roomy.shards[rid][0][0]}) == k  # the prefill ran on k devices
    assert [d for d, _, _ in roomy.shards[rid]] == [roomy.shards[rid][0][0]]  # its KV on one: scale-down


def test_chunked_prefill_over_k_devices(runner, roomy):
    """Sarathi chunks of 10 tokens: each chunk after the first starts inside a page (pages of 4), so
    that page's earlier tokens are read from its destination device and its new ones from staging
    (two pages per decode device, so such a page is not on its chunk's first prefill device)."""
    roomy.degrees["chunked"] = 4
    reqs = [request("chunked", prompt(51, 37), greedy(4)), request("beside", prompt(52, 5), greedy(6))]
    roomy.pages.policy = EspPolicy(decode_pages_per_device=2)
    try:
        both(runner, roomy, reqs, scheduler=("sarathi", {"chunk_size": 10}))
    finally:
        roomy.pages.policy = EspPolicy()
    assert len(roomy.staged["chunked"]) >= 3


def test_decode_scales_up_when_its_devices_fill(runner, tight):
    """Each device holds 2 pages. ``a`` plans devices 0 and 1 (4 pages); ``b`` arrives and takes
    device 1's pages, so ``a``'s third page goes to a device outside its plan (scale-up) and its
    decode then attends over three devices."""
    before = tight.pages.num_scale_ups
    reqs = [request("a", prompt(11, 5), greedy(10)), request("b", prompt(12, 5), sampled(10, seed=3))]
    both(runner, tight, reqs, kv=TIGHT, arrival_steps=[0, 1])
    assert tight.pages.num_scale_ups > before
    devices = [d for d, _, _ in tight.shards["a"]]
    assert len(devices) == 3 and devices[:1] == [0] and 1 not in devices, tight.shards["a"]


def test_a_batch_mixes_one_device_and_multi_device_requests(runner, roomy):
    roomy.degrees.update({"long-a": 4, "long-b": 8})
    reqs = [
        request("long-a", prompt(21, 41), greedy(6)),
        request("short-a", prompt(22, 7), greedy(6)),
        request("short-b", prompt(23, 9), sampled(6, seed=5)),
        request("long-b", prompt(24, 33), sampled(6, seed=9)),
    ]
    roomy.pages.policy = EspPolicy(decode_pages_per_device=4)  # long requests decode over 3 devices
    try:
        both(runner, roomy, reqs, arrival_steps=[0, 0, 2, 3])
    finally:
        roomy.pages.policy = EspPolicy()
    assert len({d for d, _, _ in roomy.shards["long-a"]}) == 3 and len(roomy.shards["short-a"]) == 1
    mixed = [s for s in roomy.step_devices if any(len(d) == 1 for d in s.values()) and any(len(d) > 1 for d in s.values())]
    assert mixed, "no step had both a one-device and a multi-device request"


def test_an_abort_frees_the_pages_on_every_device(tight):
    sched, kv = schedulers.make("vllm"), TIGHT
    req = request("abort-me", prompt(31, 22), greedy(8))
    tight.degrees["abort-me"] = 4
    tight.register(req)
    state = sched.add_request(sched.init(kv), req, 0.0)
    for step in range(2):  # the prefill and one decode
        state, plan = sched.schedule(state, float(step))
        state = sched.update(state, plan, tight.execute(plan), float(step))
    held = [2 - f for f in tight.pages.free_pages()]
    assert sum(held) == 6 and sum(h > 0 for h in held) == 3  # 23 tokens on 3 devices
    state = sched.abort(state, "abort-me", 2.0)
    tight.release("abort-me")
    assert tight.pages.free_pages() == [2] * N and not tight.pages.binding


def test_llm_front_door(llama, runner):
    """``jaxserve.LLM(sp=8, esp=True)`` generates the one-device runner's tokens (a 40-token prompt
    prefilled over 3 devices next to a short one); ``esp`` with ``tp > 1`` is refused by name."""
    import jaxserve

    prompts = [prompt(41, 40), prompt(42, 6)]
    llm = jaxserve.LLM(
        llama[0], sp=N, esp=True, esp_policy=EspPolicy(prefill_tokens_per_device=16), block_size=4,
        num_blocks=ROOMY.num_blocks, max_model_len=64, compile_cache="", stop_at_eos=False,
    )  # fmt: skip
    assert isinstance(llm.runner, EspRunner) and llm.runner.pages_per_device == 16
    outs = llm.generate(prompts, greedy(4))
    want = run_steps(runner, schedulers.make("vllm"), SCHED_KV, [request(f"r{i}", p, greedy(4)) for i, p in enumerate(prompts)])
    assert [o.token_ids for o in outs] == [want.tokens["r0"], want.tokens["r1"]]
    with pytest.raises(ValueError, match="esp=True runs on sp devices with tp=1"):
        jaxserve.LLM(llama[0], sp=4, tp=2, esp=True)
