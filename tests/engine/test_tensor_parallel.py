"""The engine under a mesh on 8 host CPU devices (tests/conftest.py forces them): tensor-parallel
(and row-split) runs compute the single-device logits (float32, atol 1e-5) and greedy tokens for
Llama, Mistral (sliding window) and Qwen2 (q|k|v bias, tied embeddings, one KV head), with as many,
and fewer, KV heads than the tensor axis; KV pages cross between runners of different tp; and
``parallel.tp`` / ``parallel.sp`` reach the runner through the config and ``jaxserve.LLM``, a bad
value being one ConfigError naming the key.

Every runner compiles its own step shapes (a few seconds each on the 2-core CI machine), so the
default run covers each architecture once, tp in {2, 4, 8} once each and one row-split mesh; the
full sweep is ``slow``.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from engine_testing import RUNNER_KV, greedy, prompt, request, rows_plan

from config_defaults import default_config
from jaxserve import scheduler as schedulers
from jaxserve.config import ConfigError, override
from jaxserve.engine.engine import Engine
from jaxserve.engine.model_runner import ModelRunner
from jaxserve.engine.packing import warmup_batches
from jaxserve.engine.serve_config import build_runner, engine_settings
from jaxserve.parallel.tensor_parallel import engine_mesh

# 8 attention heads (head_dim 8): tp = 2, 4, 8 all divide them. Llama and Mistral keep 2 KV heads
# (tp 2 splits them, 4 and 8 replicate them); Qwen2 has 1 (always replicated).
HEADS = {"num_attention_heads": 8, "head_dim": 8}
A, B = prompt(31, 20), prompt(32, 9)
# Two prefill steps of the same bucket shape (two blocks, every row's logits): the second chunk of
# each prompt attends over pages the first one wrote. One compilation per runner.
CHUNKS = ((("tp-a", 0, 13, (9, 3, 40, 11, 12)), ("tp-b", 0, 6, (20, 7, 33))),
          (("tp-a", 13, 7, (9, 3, 40, 11, 12)), ("tp-b", 6, 3, (20, 7, 33))))  # fmt: skip
PROMPTS = {"tp-a": A, "tp-b": B}
ATOL = 1e-5  # float32; the all-reduces only reorder sums (observed <= 1e-6)


def mesh(tp: int, sp: int = 1):
    if len(jax.devices()) < tp * sp:
        pytest.fail(f"{len(jax.devices())} devices, need {tp * sp}: tests/conftest.py forces 8 host CPU devices")
    return engine_mesh(tp, sp)


def prefill(runner) -> tuple[dict, dict]:
    """Runs CHUNKS; returns each request's logits ``[20 or 9, vocab]`` and its two sampled tokens."""
    logits, tokens = {rid: [] for rid in PROMPTS}, {rid: [] for rid in PROMPTS}
    for rid, ids in PROMPTS.items():
        runner.register(request(rid, ids, greedy(1)))
    for step, rows in enumerate(CHUNKS):
        out, per_request = runner.execute_with_logits(rows_plan(rows, PROMPTS, step))
        for rid in PROMPTS:
            logits[rid].append(per_request[rid])
            tokens[rid].append(out.token_ids[rid])
    for rid in PROMPTS:
        runner.release(rid)
    return {rid: np.concatenate(x) for rid, x in logits.items()}, tokens


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(arch, tp, sp)`` -> ``(runner, logits, tokens)`` after ``prefill``, built on first use;
    ``tp = 0`` is the single-device runner."""
    from hf_checkpoints import make_checkpoint

    from jaxserve.model.loader import load_model

    models, done = {}, {}

    def get(arch, tp, sp=1):
        if arch not in models:
            directory = str(tmp_path_factory.mktemp(arch))
            make_checkpoint(directory, arch, **HEADS)
            models[arch] = load_model(directory)
        if (arch, tp, sp) not in done:
            cfg, params = models[arch]
            runner = ModelRunner(cfg, params, RUNNER_KV, mesh=mesh(tp, sp) if tp else None)
            done[arch, tp, sp] = (runner, *prefill(runner))
        return done[arch, tp, sp]

    return get


CASES = [("llama", 8, 1), ("mistral", 2, 1), ("qwen2", 4, 1), ("llama", 2, 2)]
SWEEP = [(arch, tp, 1) for arch in ("llama", "mistral", "qwen2") for tp in (2, 4, 8)]
SWEEP += [("qwen2", 1, 4), ("mistral", 2, 4), ("qwen2", 8, 1)]


def check_against_single_device(runs, arch, tp, sp):
    runner, logits, tokens = runs(arch, tp, sp)
    _, want_logits, want_tokens = runs(arch, 0)
    for rid in PROMPTS:
        assert logits[rid].shape == (len(PROMPTS[rid]), runner.cfg.vocab_size)
        np.testing.assert_allclose(logits[rid], want_logits[rid], atol=ATOL, rtol=0)
    assert tokens == want_tokens
    k = runner.caches[0][0]  # KV heads split over tp, or replicated up to tp when fewer
    assert k.shape[0] == max(runner.cfg.num_kv_heads, tp) and k.sharding.spec[0] == "tp"


@pytest.mark.parametrize("arch, tp, sp", CASES)
def test_sharded_logits_equal_single_device_logits(runs, arch, tp, sp):
    check_against_single_device(runs, arch, tp, sp)


@pytest.mark.slow
@pytest.mark.parametrize("arch, tp, sp", [c for c in SWEEP if c not in CASES])
def test_sharded_logits_sweep(runs, arch, tp, sp):
    check_against_single_device(runs, arch, tp, sp)


def test_the_step_communicates_as_megatron_does(runs):
    """The compiled tp = 8 step (a cache hit: the same shape ran in ``prefill``) has one all-reduce
    after each row-parallel projection and the vocab-parallel embedding lookup, and gathers only
    the ``[rows, vocab]`` logits, never a weight (without ``gather_logits``' vocab constraint XLA
    gathered the whole LM head)."""
    runner = runs("llama", 8)[0]
    batch = warmup_batches(runner.spec.shape(0, 2), runner.spec)[0]
    args = (runner.params, runner.caches, batch.token_ids, batch.attn, batch.logits_rows, tuple(batch.sampling))
    hlo = runner._steps[True].lower(*args).compile().as_text()
    ops = re.findall(r"= (\S+) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)\(", hlo)
    assert sorted(op for _, op in ops) == ["all-gather"] * 2 + ["all-reduce"] * (2 * runner.cfg.num_layers + 1), ops
    rows = len(batch.token_ids)
    gathered = sorted(shape.split("{")[0] for shape, op in ops if op == "all-gather")
    assert gathered == sorted([f"f32[{rows},96]", f"f32[{len(batch.logits_rows)},96]"]), gathered


@pytest.mark.slow
@pytest.mark.parametrize("tp", [4, 8])
def test_the_kernel_path_under_tensor_parallelism(runs, monkeypatch, tp):
    """attention="ragged" with the Pallas kernel in interpret mode inside the tp shard_map (the
    GPU/TPU path, local shapes) against the single-device grouped path, Mistral's sliding window."""
    monkeypatch.setenv("JAXSERVE_ATTENTION", "interpret")
    reference, want_logits, want_tokens = runs("mistral", 0)
    runner = ModelRunner(reference.cfg, reference.params, RUNNER_KV, attention="ragged", mesh=mesh(tp))
    logits, tokens = prefill(runner)
    for rid in PROMPTS:
        np.testing.assert_allclose(logits[rid], want_logits[rid], atol=ATOL, rtol=0)
    assert tokens == want_tokens


def test_kv_pages_cross_between_runners_of_different_tp(runs):
    """read_kv of a tp = 8 runner (2 KV heads replicated 4 times) has the checkpoint's 2 heads and
    the single-device runner's values; written into either runner, the pages read back the same."""
    sharded, single = runs("llama", 8)[0], runs("llama", 0)[0]
    table = list(CHUNKS[0][0][3])
    want, got = single.read_kv(table), sharded.read_kv(table)
    cfg = single.cfg
    assert got.shape == want.shape == (cfg.num_layers, 2, 2, len(table), RUNNER_KV.block_size, cfg.head_dim)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert np.any(want != 0)
    sharded.write_kv([50, 51, 52, 53, 54], want)  # into every replica of each head
    assert sharded.read_kv([50, 51, 52, 53, 54]).tobytes() == want.tobytes()
    replicas = np.asarray(sharded.caches[0][0])[:, 50]  # [8 cache heads, page_size, D]
    np.testing.assert_array_equal(replicas, np.repeat(want[0, 0, :, 0], 4, axis=0))
    single.write_kv([50, 51, 52, 53, 54], got)
    assert single.read_kv([50, 51, 52, 53, 54]).tobytes() == got.tobytes()


def test_engine_serve_and_llm_give_the_single_device_greedy_tokens(llama, llama_params, runner):
    """The session's Llama (4 heads, 2 KV heads) at tp = 4 under the vLLM scheduler: the same
    greedy tokens as the session's single-device runner, through Engine.serve and jaxserve.LLM."""
    import jaxserve

    cfg, params = llama_params
    requests = [request("tp-a", A[:13], greedy(4)), request("tp-b", B[:6], greedy(4))]
    sched = schedulers.make("vllm")
    want = Engine(runner, sched, RUNNER_KV).serve(requests)
    tokens = {rid: f.output_token_ids for rid, f in want.finished.items()}
    assert len(tokens) == 2
    sharded = Engine(ModelRunner(cfg, params, RUNNER_KV, mesh=mesh(4)), sched, RUNNER_KV).serve(requests)
    assert {rid: f.output_token_ids for rid, f in sharded.finished.items()} == tokens
    llm = jaxserve.LLM(llama[0], tp=4, num_blocks=64, block_size=4, compile_cache="", stop_at_eos=False)
    assert llm.runner.mesh.shape["tp"] == 4
    outs = llm.generate([list(r.prompt_token_ids) for r in requests], jaxserve.SamplingParams(4, temperature=0.0))
    assert [o.token_ids for o in outs] == [tokens[r.request_id] for r in requests]


@pytest.mark.parametrize("arch, overrides, message", [
    ("llama", {"parallel.tp": 3}, "parallel.tp=3 does not divide the 8 devices jax sees"),
    ("llama", {"parallel.tp": 16}, "parallel.tp=16 is more devices than the 8 jax sees"),
    ("llama", {"parallel.tp": 0}, "parallel.tp must be an integer >= 1, got 0"),
    ("llama", {"parallel.tp": 2, "parallel.sp": 8}, "parallel.sp=8 x parallel.tp=2 = 16 is more devices than the 8"),
    ("small", {"parallel.tp": 8}, "parallel.tp=8 does not divide the model's 4 attention heads"),
    ("odd_kv", {"parallel.tp": 2}, "parallel.tp=2 neither divides the model's 3 KV heads nor is a multiple of them"),
])  # fmt: skip
def test_a_bad_parallel_size_is_one_config_error_naming_the_key(llama, tmp_path, arch, overrides, message):
    from hf_checkpoints import make_checkpoint

    if arch == "small":  # the session's Llama: hf_checkpoints' own 4 heads
        directory = llama[0]
    else:  # 8 heads; or 6 heads over 3 KV heads
        directory = str(tmp_path)
        make_checkpoint(directory, "llama", **(HEADS if arch == "llama" else {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 48}))
    config = override(default_config(), {"backend": "engine", "model.path": directory, **overrides})
    with pytest.raises(ConfigError) as e:
        build_runner(engine_settings(config), max_num_seqs=4)
    assert str(e.value).startswith(message), str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # one error, no chained traceback


def test_parallel_keys_reach_the_runner(llama):
    config = override(default_config(), {"backend": "engine", "model.path": llama[0],
                                         "parallel.tp": 4, "parallel.sp": 2, "kv.num_blocks": 16, "engine.compile_cache": ""})  # fmt: skip
    runner, kv = build_runner(engine_settings(config), max_num_seqs=4)
    assert dict(runner.mesh.shape) == {"sp": 2, "tp": 4}
    assert runner.caches[0][0].shape[0] == 4  # the session Llama's 2 KV heads replicated over tp = 4
    single, _ = build_runner(engine_settings(override(config, {"parallel.tp": 1, "parallel.sp": 1})), max_num_seqs=4)
    assert single.mesh is None and len(single.caches[0][0].devices()) == 1
