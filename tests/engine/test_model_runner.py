"""ModelRunner on a tiny random Llama: compiled shapes, chunked prefill, prefix caching,
copy-on-write, preemption (recompute and swap), batch invariance, sampling and request errors.

The reference is ``transformers`` (tokens from its greedy ``generate``, logits from a full forward
pass) and, where sampling is random, the same request served alone on an unconstrained cache.
Runs go through ``engine_testing.run_steps`` (a scheduler loop whose arrivals are placed at given
steps), so every scenario's batch composition is exact and reproducible.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from engine_testing import MAX_ROWS, RUNNER_KV, greedy, hf_sequence_logits, prompt, request, run_steps, step_compiles
from hf_checkpoints import hf_greedy

from jaxserve import scheduler as schedulers
from jaxserve.engine.engine import Engine
from jaxserve.engine.model_runner import ModelRunner
from jaxserve.kv.config import KVConfig
from jaxserve.request import Request, SamplingParams

KV = KVConfig(RUNNER_KV.num_blocks, RUNNER_KV.block_size)
ATOL = 1e-4


def make(name, **options):
    return schedulers.make(name, **{"max_num_seqs": MAX_ROWS, **options})


def assert_logits_match_hf(trace, model, req, atol=ATOL):
    """Every position the engine computed for ``req`` has the transformers logits."""
    ref = hf_sequence_logits(model, req, trace.tokens[req.request_id])
    got = trace.logits[req.request_id]
    assert got, f"{req.request_id}: no logits recorded"
    for pos, row in got.items():
        np.testing.assert_allclose(row, ref[pos], atol=atol, err_msg=f"{req.request_id} position {pos}")


# -- compilation -----------------------------------------------------------------------------------
def test_warmed_up_runner_never_compiles_again(llama, llama_params):
    """After warm-up of every shape a 2-sequence batch can take, a workload of mixed prompt
    lengths, chunked prefills, decodes, prefix hits, copy-on-write and preemption runs without a
    single new compilation."""
    cfg, params = llama_params
    runner = ModelRunner(cfg, params, RUNNER_KV)
    assert runner.num_compilations == 0
    # Two sequences give at most 2 decode rows, or 1 decode row and 2 blocks: {0,1} x {0,1,2} and
    # {0,1,2} x {0} (the second call's (1, 0) is already compiled).
    with step_compiles() as compiles:
        assert runner.warmup(1, MAX_ROWS) == 5 and runner.warmup(MAX_ROWS, 0) == 2
    assert runner.num_compilations == 6 and len(compiles) == 6  # each shape traced and compiled once
    before = runner.num_compilations

    shared = prompt(100, 16)
    # Prompts of 1 token (a decode-shaped prefill) and of 40 (two row blocks); one request is done
    # after its prefill (max_new_tokens=1).
    reqs = [request(f"w{i}", prompt(200 + i, n), greedy(m)) for i, (n, m) in enumerate([(5, 4), (30, 1), (12, 6), (1, 3), (40, 2)])]
    reqs += [request("hit1", shared + [7, 8], greedy(3)), request("hit2", shared + [9], greedy(3)), request("cow", shared, greedy(2))]
    shapes, expect = set(), {}
    with step_compiles() as compiles:
        plans = _compile_workload(runner, reqs, shapes, expect, llama[1])
    assert runner.num_compilations == before and not compiles, f"recompiled; shapes seen {sorted(shapes)}"
    assert shapes == {(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)}, sorted(shapes)  # all of them ran
    assert any(p.preempted for p in plans) and any(p.copy_blocks for p in plans)
    assert any(c > 0 and n > 1 for p in plans for c, n in zip(p.num_computed_tokens, p.num_new_tokens))

    # The check can fail: a shape outside the warm-up compiles once (and once only).
    big = [request(f"b{i}", prompt(300 + i, 4), greedy(2)) for i in range(3)]
    with step_compiles() as compiles:
        run_steps(runner, schedulers.make("vllm", max_num_seqs=4), KV, big)
    assert runner.num_compilations == before + 2 and len(compiles) == 2  # (0, 4) and (4, 0)


class CapWatch:
    """A runner wrapper that records, after every step, how many shapes it keeps compiled."""

    def __init__(self, runner):
        self.runner, self.live = runner, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, plan):
        out = self.runner.execute(plan)
        self.live.append(self.runner.num_compiled_shapes)
        return out


def test_a_capped_runner_keeps_at_most_its_shapes_and_serves_the_same_tokens(llama_params):
    """``max_compiled_shapes`` bounds what stays compiled (each executable holds ~260 memory maps;
    hundreds of shapes exhaust vm.max_map_count and LLVM aborts the process): past the cap the
    compiled steps are dropped and recompiled on use, and the tokens do not change."""
    cfg, params = llama_params
    reqs = [request(f"c{i}", prompt(400 + i, n), greedy(m)) for i, (n, m) in enumerate([(3, 5), (9, 2), (30, 4), (1, 6), (14, 3)])]
    free = run_steps(ModelRunner(cfg, params, RUNNER_KV), make("sarathi", chunk_size=8), KV, reqs, arrival_steps=[0, 0, 2, 3, 5])
    assert len(free.shapes) >= 4, sorted(free.shapes)  # the cap below is really exceeded
    capped = CapWatch(ModelRunner(cfg, params, RUNNER_KV, max_compiled_shapes=2))
    trace = run_steps(capped, make("sarathi", chunk_size=8), KV, reqs, arrival_steps=[0, 0, 2, 3, 5])
    assert trace.tokens == free.tokens
    assert max(capped.live) <= 2 and capped.runner.num_evictions >= 1
    with pytest.raises(ValueError, match="max_compiled_shapes"):
        ModelRunner(cfg, params, RUNNER_KV, max_compiled_shapes=0)


def test_warmup_compiles_the_smallest_shapes_up_to_the_cap_and_reports_progress(llama_params):
    cfg, params = llama_params
    runner = ModelRunner(cfg, params, RUNNER_KV, max_compiled_shapes=3)
    seen = []
    assert runner.warmup(4, 4, on_progress=lambda done, total, shape: seen.append((done, total, shape))) == 3
    assert [(d, t) for d, t, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert [s for *_, s in seen] == [(1, 0), (2, 0), (3, 0)]  # fewest padded rows first: decode rows before a 32-row block
    assert runner.num_compiled_shapes == 3 and runner.num_evictions == 0 and runner.compile_seconds > 0


def test_compiling_a_shape_runs_its_loops_and_sampling_branches_without_touching_kv(llama_params):
    """A shape's warm-up runs the KV loop (every padding row and block reads one position) and the
    greedy, temperature and filtered sampling branches, and leaves every KV page bit for bit."""
    import jax

    from jaxserve.engine.packing import warmup_batches

    cfg, params = llama_params
    runner = ModelRunner(cfg, params, RUNNER_KV)
    batches = warmup_batches((2, 2), runner.spec)
    for b in batches:
        assert (b.attn.decode_kv_lens == 1).all() and (b.attn.block_kv_lens == 1).all()
        assert (b.attn.slot_page == runner.spec.num_pages).all()  # every write goes to the drop page
        assert not b.sampled  # no row's token is reported
    modes = [(bool((b.sampling.temperature > 0).any()), bool((b.sampling.top_k > 0).any() or (b.sampling.top_p < 1).any()))
             for b in batches]  # fmt: skip
    assert modes == [(False, False), (True, False), (True, True)]

    keys = jax.random.split(jax.random.key(0), 2 * len(runner.caches))
    runner.caches = tuple(
        tuple(jax.random.normal(keys[2 * i + j], c.shape, c.dtype) for j, c in enumerate(layer))
        for i, layer in enumerate(runner.caches)
    )  # fmt: skip
    before = [np.asarray(c) for layer in runner.caches for c in layer]
    assert runner.warmup(2, 2) > 0
    after = [np.asarray(c) for layer in runner.caches for c in layer]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


def _compile_workload(runner, reqs, shapes, expect, model):
    """Runs ``reqs`` under several policies (checking transformers' tokens); returns the plans."""
    plans = []
    for sched, kv in [
        (make("sarathi", chunk_size=16), KV),
        (make("sarathi", chunk_size=64), KV),
        (make("sarathi", chunk_size=5, enable_prefix_caching=True), KV),
        (make("vllm", enable_prefix_caching=True), KV),
        (make("orca"), KV),
        (make("vllm"), TIGHT),  # preempts (PREEMPT_REQS)
    ]:
        batch = reqs if kv is KV else PREEMPT_REQS[:3]
        arrivals = [0, 0, 2, 3, 6, 9, 12, 13] if kv is KV else [0] * 3  # "cow" joins while hit2 runs
        trace = run_steps(runner, sched, kv, batch, arrival_steps=arrivals)
        shapes |= trace.shapes
        plans += trace.plans
        for r in batch:
            if r.request_id not in expect:
                expect[r.request_id] = tuple(hf_greedy(model, r.prompt_token_ids, r.sampling.max_new_tokens))
            assert trace.tokens[r.request_id] == expect[r.request_id], (sched, r.request_id)
    return plans


# -- chunked prefill -------------------------------------------------------------------------------
CHUNK_REQS = [request("x", prompt(1, 23), greedy(5)), request("y", prompt(2, 13), greedy(5))]
CHUNK_ARRIVALS = [0, 2]  # y arrives while x decodes: chunked runs mix its prefill with x's decodes


@pytest.fixture(scope="module")
def whole_prompt_run(runner):
    return run_steps(runner, make("vllm"), KV, CHUNK_REQS, arrival_steps=CHUNK_ARRIVALS, with_logits=True)


def test_whole_prompt_path_matches_transformers(whole_prompt_run, llama):
    model = llama[1]
    for r in CHUNK_REQS:
        assert list(whole_prompt_run.tokens[r.request_id]) == hf_greedy(model, r.prompt_token_ids, 5)
        assert whole_prompt_run.rows_of(r.request_id)[0] == (0, r.prompt_len)  # one whole prefill
        assert_logits_match_hf(whole_prompt_run, model, r)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 64])
def test_chunked_prefill_matches_whole_prompt(runner, whole_prompt_run, llama, chunk_size):
    trace = run_steps(runner, make("sarathi", chunk_size=chunk_size), KV, CHUNK_REQS, arrival_steps=CHUNK_ARRIVALS, with_logits=True)
    for r in CHUNK_REQS:
        rid = r.request_id
        assert trace.tokens[rid] == whole_prompt_run.tokens[rid]
        np.testing.assert_allclose(trace.logits_matrix(rid), whole_prompt_run.logits_matrix(rid), atol=ATOL)
        prefill = [(c, n) for c, n in trace.rows_of(rid) if c < r.prompt_len]
        assert all(n <= chunk_size for _, n in prefill)
        assert sum(n for _, n in prefill) == r.prompt_len  # every prompt token computed exactly once
        if chunk_size < r.prompt_len:
            assert len(prefill) > 1 and prefill[1][0] > 0  # chunks really started mid-sequence
    assert_logits_match_hf(trace, llama[1], CHUNK_REQS[0])
    if chunk_size > 1:  # budget left after x's decode: y's chunk shares a step with it
        assert any(set(p.request_ids) == {"x", "y"} and p.num_decode_tokens and p.num_prefill_tokens for p in trace.plans)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size, chunk_align", [(c, 1) for c in range(1, 25)] + [(12, 4), (20, 8), (9, 3)])
def test_chunked_prefill_sweep(runner, whole_prompt_run, chunk_size, chunk_align):
    sched = make("sarathi", chunk_size=chunk_size, chunk_align=chunk_align)
    trace = run_steps(runner, sched, KV, CHUNK_REQS, arrival_steps=CHUNK_ARRIVALS, with_logits=True)
    for r in CHUNK_REQS:
        assert trace.tokens[r.request_id] == whole_prompt_run.tokens[r.request_id]
        np.testing.assert_allclose(trace.logits_matrix(r.request_id), whole_prompt_run.logits_matrix(r.request_id), atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("policy, options", [("vllm", {}), ("sarathi", {"chunk_size": 7})])
def test_ragged_attention_path_matches_grouped(llama_params, whole_prompt_run, policy, options):
    """The kernel layout (``attention="ragged"``: the jnp reference of ragged paged attention on
    CPU, the Pallas kernel on GPU/TPU) gives the grouped path's logits, padded rows and all."""
    cfg, params = llama_params
    ragged = ModelRunner(cfg, params, RUNNER_KV, attention="ragged")
    assert ragged.attention == "ragged"
    trace = run_steps(ragged, make(policy, **options), KV, CHUNK_REQS, arrival_steps=CHUNK_ARRIVALS, with_logits=True)
    for r in CHUNK_REQS:
        assert trace.tokens[r.request_id] == whole_prompt_run.tokens[r.request_id]
        np.testing.assert_allclose(trace.logits_matrix(r.request_id), whole_prompt_run.logits_matrix(r.request_id), atol=ATOL)


# -- prefix caching and copy-on-write --------------------------------------------------------------
SHARED = prompt(3, 16)  # 4 whole blocks


def _prefix_case(case, model):
    """(requests, arrival steps, b's expected first row) of a prefix-cache scenario."""
    g = greedy(6)
    if case == "shared_prefix":  # b's first 4 blocks hit, it computes its own 5 tokens
        return [request("a", SHARED + [40, 41, 42], g), request("b", SHARED + [50, 51, 52, 53, 54], g)], [0, 2], (16, 5)
    if case == "copy_on_write":  # identical whole-block prompts, a still running: b copies block 3
        return [request("a", SHARED, g), request("b", SHARED, g)], [0, 2], (15, 1)
    if case == "take_over":  # a finished: b takes the cached last block over (no copy)
        return [request("a", SHARED, g), request("b", SHARED, g)], [0, 12], (15, 1)
    if case == "partial_last_block":  # 18-token identical prompts: 4 blocks hit, 2 tokens computed
        p = SHARED + [60, 61]
        return [request("a", p, g), request("b", p, g)], [0, 2], (16, 2)
    if case == "multi_turn":  # b continues a's conversation: a's generated blocks are reused too
        out = hf_greedy(model, SHARED, 6)
        return [request("a", SHARED, g), request("b", SHARED + out + [70, 71, 72], g)], [0, 12], (20, 5)
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["shared_prefix", "copy_on_write", "take_over", "partial_last_block", "multi_turn"])
def test_prefix_cache_hits_give_the_same_logits(runner, llama, case):
    model = llama[1]
    reqs, arrivals, first_row = _prefix_case(case, model)
    cached = run_steps(runner, make("vllm", enable_prefix_caching=True), KV, reqs, arrival_steps=arrivals, with_logits=True)
    plain = run_steps(runner, make("vllm"), KV, reqs, arrival_steps=arrivals, with_logits=True)
    assert cached.rows_of("b")[0] == first_row  # the hit happened: b started past the cached prefix
    assert plain.rows_of("b")[0] == (0, reqs[1].prompt_len)
    copies = [c for p in cached.plans for c in p.copy_blocks]
    if case == "copy_on_write":
        assert len(copies) == 1
        src, dst = copies[0]
        plan = next(p for p in cached.plans if p.copy_blocks)
        b_table = plan.block_tables[plan.request_ids.index("b")]
        a_table = next(p.block_tables[p.request_ids.index("a")] for p in cached.plans if "a" in p.request_ids)
        assert src == a_table[3] and dst == b_table[3] and a_table[:3] == b_table[:3]
    else:
        assert not copies
    for r in reqs:
        rid = r.request_id
        assert cached.tokens[rid] == plain.tokens[rid]
        assert list(cached.tokens[rid]) == hf_greedy(model, r.prompt_token_ids, 6)
        for pos, row in cached.logits[rid].items():
            np.testing.assert_allclose(row, plain.logits[rid][pos], atol=ATOL, err_msg=f"{rid} position {pos}")
        assert_logits_match_hf(cached, model, r)


# -- preemption ------------------------------------------------------------------------------------
PREEMPT_REQS = [request(f"p{i}", prompt(10 + i, 9 + 2 * i), greedy(12)) for i in range(3)] + [
    request("sampled", prompt(20, 7), SamplingParams(12, temperature=1.0, seed=5))
]
TIGHT = KVConfig(10, KV.block_size)  # 40 token slots for two requests of 21-25 tokens each


@pytest.fixture(scope="module")
def unconstrained_run(runner):
    return run_steps(runner, make("vllm"), KV, PREEMPT_REQS)


@pytest.mark.parametrize(
    "policy, options, kv",
    [
        ("vllm", {}, TIGHT),
        ("sarathi", {"chunk_size": 8}, TIGHT),
        ("vllm", {"preemption_mode": "swap"}, dataclasses.replace(TIGHT, num_host_blocks=16)),
        ("sarathi", {"chunk_size": 8, "preemption_mode": "swap"}, dataclasses.replace(TIGHT, num_host_blocks=16)),
    ],
    ids=["vllm-recompute", "sarathi-recompute", "vllm-swap", "sarathi-swap"],
)
def test_preemption_gives_the_same_tokens(runner, llama, unconstrained_run, policy, options, kv):
    trace = run_steps(runner, make(policy, **options), kv, PREEMPT_REQS)
    swap = options.get("preemption_mode") == "swap"
    victims = [rid for p in trace.plans for rid in (p.swapped_out if swap else p.preempted)]
    assert victims, "no request was preempted"
    assert sum(f.num_preemptions for f in trace.finished.values()) == len(victims)
    if swap:
        assert any(p.swap_out_blocks for p in trace.plans) and any(p.swap_in_blocks for p in trace.plans)
        assert not any(p.preempted for p in trace.plans)  # the host pool was big enough: no recompute
    else:  # a victim recomputes its prompt and its generated tokens from position 0
        rid = victims[0]
        restarts = [(c, n) for c, n in trace.rows_of(rid) if c == 0]
        assert len(restarts) >= 2
    for r in PREEMPT_REQS:
        rid = r.request_id
        assert trace.tokens[rid] == unconstrained_run.tokens[rid], rid
        if r.sampling.temperature == 0:
            assert list(trace.tokens[rid]) == hf_greedy(llama[1], r.prompt_token_ids, 12)


# -- batch invariance ------------------------------------------------------------------------------
SOLO = request("solo", prompt(30, 11), greedy(8))
OTHERS = [request(f"o{i}", prompt(31 + i, n), greedy(m)) for i, (n, m) in enumerate([(26, 5), (4, 9), (17, 3), (9, 6)])]


@pytest.fixture(scope="module")
def solo_tokens(runner, llama):
    tokens = run_steps(runner, make("vllm"), KV, [SOLO]).tokens["solo"]
    assert list(tokens) == hf_greedy(llama[1], SOLO.prompt_token_ids, 8)
    return tokens


@pytest.mark.parametrize(
    "policy, options, arrivals",
    [
        ("vllm", {}, [2, 0, 1, 3, 3]),
        ("sarathi", {"chunk_size": 6}, [2, 0, 1, 3, 3]),
        ("sarathi", {"chunk_size": 20}, [3, 0, 0, 2, 5]),
        ("orca", {}, [1, 0, 2, 2, 6]),
    ],
)
def test_output_does_not_depend_on_the_batch(runner, solo_tokens, policy, options, arrivals):
    trace = run_steps(runner, make(policy, **options), KV, [SOLO] + OTHERS, arrival_steps=arrivals)
    assert trace.tokens["solo"] == solo_tokens
    mates = {rid for p in trace.plans if "solo" in p.request_ids for rid in p.request_ids} - {"solo"}
    assert len(mates) >= 2, f"solo shared steps with {mates} only"


def test_output_does_not_depend_on_a_wide_batch(runner, solo_tokens):
    """Four rows at once (the 4-row buckets): decodes of others in the same kernel groups."""
    trace = run_steps(runner, schedulers.make("vllm", max_num_seqs=4), KV, [SOLO] + OTHERS[:3])
    assert trace.tokens["solo"] == solo_tokens
    assert max(p.num_seqs for p in trace.plans) == 4


# -- sampling --------------------------------------------------------------------------------------
SAMPLED = [
    request("t_plain", prompt(40, 9), SamplingParams(10, temperature=1.0, seed=1)),
    request("t_topp", prompt(41, 14), SamplingParams(10, temperature=0.8, top_p=0.9, seed=2)),
    request("t_topk", prompt(42, 5), SamplingParams(10, temperature=1.2, top_k=5)),  # engine-derived seed
]


@pytest.fixture(scope="module")
def sampled_alone(runner):
    return {r.request_id: run_steps(runner, make("vllm"), KV, [r]).tokens[r.request_id] for r in SAMPLED}


def test_seeded_sampling_is_reproducible(runner, sampled_alone):
    again = {r.request_id: run_steps(runner, make("vllm"), KV, [r]).tokens[r.request_id] for r in SAMPLED}
    assert again == sampled_alone
    # Random, not greedy in disguise: at temperature 1 on a random model the draws vary.
    assert len(set(sampled_alone["t_plain"])) > 3


@pytest.mark.parametrize(
    "policy, options, arrivals, together",
    [
        ("vllm", {"max_num_seqs": 4}, [0, 0, 0, 1, 3], {"t_plain", "t_topp", "t_topk"}),
        ("sarathi", {"chunk_size": 4}, [0, 1, 0, 2, 3], {"t_plain", "t_topk"}),
    ],
)
def test_seeded_sampling_does_not_depend_on_the_batch(runner, sampled_alone, policy, options, arrivals, together):
    # Unfiltered next to top-p / top-k rows (filtering sorts the vocabulary), with greedy company.
    trace = run_steps(runner, make(policy, **options), KV, SAMPLED + OTHERS[:2], arrival_steps=arrivals)
    for r in SAMPLED:
        assert trace.tokens[r.request_id] == sampled_alone[r.request_id], r.request_id
    assert any(together <= set(p.request_ids) for p in trace.plans)


def test_different_seeds_give_different_samples(runner):
    base = SAMPLED[0]
    other = dataclasses.replace(base, request_id="t_seed2", sampling=dataclasses.replace(base.sampling, seed=2))
    trace = run_steps(runner, make("vllm"), KV, [base, other])
    assert trace.tokens["t_plain"] != trace.tokens["t_seed2"]


def test_top_k_1_and_tiny_top_p_are_greedy(runner, llama):
    p = prompt(50, 12)
    reqs = [
        request("k1", p, SamplingParams(8, temperature=1.5, top_k=1, seed=3)),
        request("p0", p, SamplingParams(8, temperature=2.0, top_p=1e-6, seed=4)),
    ]
    trace = run_steps(runner, make("vllm"), KV, reqs)
    expect = tuple(hf_greedy(llama[1], p, 8))
    assert trace.tokens["k1"] == expect and trace.tokens["p0"] == expect


# -- request errors --------------------------------------------------------------------------------
def test_register_rejects_bad_requests(runner):
    with pytest.raises(ValueError, match="'oov'.*96.*vocabulary"):
        runner.register(request("oov", [5, 96, 7], greedy(2)))
    with pytest.raises(ValueError, match="'long'.*max_model_len=256"):
        runner.register(request("long", prompt(60, 250), greedy(7)))
    with pytest.raises(ValueError, match="'lengths'.*token ids"):
        runner.register(Request("lengths", prompt_len=8, sampling=greedy(2)))
    runner.register(request("edge", prompt(61, 250), greedy(6)))  # exactly max_model_len is fine
    runner.release("edge")


def test_engine_rejects_bad_requests_and_serves_the_rest(runner, llama):
    good = [request("g0", prompt(70, 6), greedy(4), arrival_time=0.0), request("g1", prompt(71, 19), greedy(4), arrival_time=0.0)]
    bad = [
        request("oov", [5, 300, 7], greedy(4), arrival_time=0.0),
        request("long", prompt(72, 255), greedy(4), arrival_time=0.0),
        request("neg_late", [5, 96], greedy(4), arrival_time=1e-4),
    ]
    reqs = [good[0], bad[0], bad[1], good[1], bad[2]]
    run = Engine(runner, make("sarathi", chunk_size=16), KV).serve(reqs)
    rejected = {run.log.requests[i].request_id: reason for i, reason in run.log.rejected.items()}
    assert set(rejected) == {"oov", "long", "neg_late"}
    assert "vocabulary" in rejected["oov"] and "vocabulary" in rejected["neg_late"]
    assert "256" in rejected["long"]
    assert set(run.finished) == {"g0", "g1"}
    for r in good:
        assert list(run.finished[r.request_id].output_token_ids) == hf_greedy(llama[1], r.prompt_token_ids, 4)
    assert not runner._sampling  # nothing registered is left behind
