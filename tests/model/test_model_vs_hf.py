"""The jaxserve model against ``transformers``: every row's logits of prefill chunks and decodes.

The reference is the HF model's full forward over the request's whole sequence (prompt + every
generated token), so paged KV writes, page tables, chunked prefill, decode after prefill, GQA, RoPE
scaling, sliding windows, biases and tied embeddings all have to be right for a row to match.

Runners are driven by hand-built BatchPlans whose steps all pack to the same bucket (two one-token
rows and 3-4 blocks of prefill rows), so each (arch, attention) pair costs one compilation; one test
drives a runner through the real ``vllm`` scheduler (prefill-only and decode-only steps) instead,
and a ``slow`` sweep drives every (arch, attention) through ``sarathi`` with staggered arrivals and
recompute / swap preemption.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_checkpoints import LLAMA3_ROPE_SCALING, VOCAB, hf_greedy, hf_logits, make_checkpoint, torch, transformers

from jaxserve import scheduler as schedulers
from jaxserve.engine.model_runner import ModelRunner
from jaxserve.kv.config import KVConfig
from jaxserve.model import sampling
from jaxserve.model.config import ModelConfig
from jaxserve.model.llama import RMSNorm
from jaxserve.model.loader import load_model
from jaxserve.model.rope import apply_rope, inv_freq, rope_tables
from jaxserve.plan import BatchPlan
from jaxserve.request import Request, SamplingParams

ARCHS = ["llama", "llama3", "mistral", "qwen2"]
IMPLS = ["grouped", "ragged"]
ATOL = 1e-4

BLOCK_SIZE = 4  # KV page size in tokens: small, so that sequences span many (scattered) pages
BLOCK_ROWS = 8  # prefill rows per block
CHUNK_PAGES = 2  # grouped attention's context chunk: 8 tokens, so long contexts take many chunks
NUM_PAGES = 64
MAX_MODEL_LEN = 128
MAX_NEW = 8

# Prompt length of each request. "x"/"y" have one-token prompts (their prefill is a one-token row).
PROMPTS = {"x": 1, "y": 1, "a": 24, "b": 30, "c": 19, "f": 96}
# Each step: (request id, tokens computed this step). Every step has exactly two one-token rows and
# 3 or 4 blocks of prefill rows, so all pack to the (2 decode rows, 4 blocks) bucket. It covers: a
# whole-prompt prefill (a), prompts split in chunks mid-sequence (b, c; a 3-token chunk padded to a
# block), a 96-token prompt in 4 chunks (f), decodes right after a one-token prefill (x, y) and
# decodes after chunked prefills at positions 19..31, beyond mistral's 12-token window.
SCHEDULE = [
    [("x", 1), ("y", 1), ("a", 24)],
    [("x", 1), ("y", 1), ("b", 16), ("c", 16)],
    [("x", 1), ("y", 1), ("b", 14), ("c", 3)],
    [("x", 1), ("y", 1), ("f", 24)],
    [("a", 1), ("b", 1), ("f", 24)],
    [("a", 1), ("c", 1), ("f", 24)],
    [("b", 1), ("c", 1), ("f", 24)],
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (torch model, ModelConfig, params) of a float32 checkpoint, built once."""
    out = {}
    for i, arch in enumerate(ARCHS):
        d = str(tmp_path_factory.mktemp(f"vs_hf_{arch}"))
        model = make_checkpoint(d, arch, seed=10 + i)
        cfg, params = load_model(d)
        out[arch] = (model, cfg, params)
    return out


def _runner(cfg, params, impl, num_pages=NUM_PAGES, max_model_len=MAX_MODEL_LEN):
    kv = KVConfig(num_blocks=num_pages, block_size=BLOCK_SIZE)
    runner = ModelRunner(
        cfg,
        params,
        kv,
        max_model_len=max_model_len,
        block_rows=BLOCK_ROWS,
        attention=impl,
        chunk_pages=CHUNK_PAGES,
        buckets_per_octave=(1, 1),  # power-of-two buckets: the steps below all pack to one shape
    )
    assert runner.attention == impl
    return runner, kv


class PlanDriver:
    """Builds BatchPlans from (request id, num_new_tokens) lists and records every row's logits."""

    def __init__(self, runner: ModelRunner, prompts: dict[str, int], seed: int):
        rng = np.random.default_rng(seed)
        free = rng.permutation(runner.kv.num_blocks).tolist()  # scattered, non-monotonic pages
        self.runner = runner
        self.prompt_len = dict(prompts)
        self.seqs, self.computed, self.tables, self.logits = {}, {}, {}, {}
        for rid, n in prompts.items():
            tokens = rng.integers(3, VOCAB, size=n).tolist()
            runner.register(
                Request(rid, prompt_token_ids=tokens, sampling=SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0))
            )
            pages = -(-(n + MAX_NEW) // runner.kv.block_size)
            self.tables[rid] = tuple(free[:pages])
            del free[:pages]
            self.seqs[rid], self.computed[rid], self.logits[rid] = tokens, 0, []

    def step(self, entries):
        rids, done, new, samples, tokens = [], [], [], [], []
        for rid, n in entries:
            c = self.computed[rid]
            assert c + n <= len(self.seqs[rid]), f"schedule asks {rid} for tokens it does not have yet"
            rids.append(rid)
            done.append(c)
            new.append(n)
            samples.append(c + n >= self.prompt_len[rid])
            tokens.extend(self.seqs[rid][c : c + n])
        plan = BatchPlan(
            request_ids=tuple(rids),
            num_computed_tokens=np.array(done, np.int64),
            num_new_tokens=np.array(new, np.int64),
            samples_token=np.array(samples, bool),
            block_tables=tuple(self.tables[r] for r in rids),
            token_ids=np.array(tokens, np.int32),
            block_size=self.runner.kv.block_size,
        )
        plan.validate()
        out, logits = self.runner.execute_with_logits(plan)
        assert set(out.token_ids) == {r for r, s in zip(rids, samples) if s}
        for rid, n, s in zip(rids, new, samples):
            chex.assert_shape(logits[rid], (n, VOCAB))
            assert logits[rid].dtype == np.float32
            self.logits[rid].append(logits[rid])
            self.computed[rid] += n
            if s:
                self.seqs[rid].append(out.token_ids[rid])

    def check_against(self, model):
        """Every request's logits equal the HF full forward's; greedy tokens are their argmax."""
        for rid, chunks in self.logits.items():
            ours = np.concatenate(chunks)
            n = len(ours)
            assert n == self.computed[rid]
            ref = hf_logits(model, self.seqs[rid][:n])
            err = np.abs(ours - ref).max(axis=-1)
            assert err.max() < ATOL, f"request {rid}: logits differ from transformers by {err.max():.2e} (worst position {err.argmax()})"
            p = self.prompt_len[rid]
            generated = self.seqs[rid][p:]
            assert generated == np.argmax(ours[p - 1 : p - 1 + len(generated)], axis=-1).tolist()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_row_matches_transformers(checkpoints, arch, impl):
    model, cfg, params = checkpoints[arch]
    runner, _ = _runner(cfg, params, impl)
    driver = PlanDriver(runner, PROMPTS, seed=ARCHS.index(arch))
    for entries in SCHEDULE:
        driver.step(entries)
    driver.check_against(model)
    # Decodes happened at positions past the window and after chunked prefills.
    assert {rid: len(driver.seqs[rid]) - PROMPTS[rid] for rid in PROMPTS} == {"x": 4, "y": 4, "a": 3, "b": 3, "c": 3, "f": 1}
    assert runner.num_compilations == 1  # every step packed to the same bucket


def test_sliding_window_changes_the_reference(checkpoints):
    """The mistral case can fail: its reference logits past the window depend on the window."""
    model, cfg, _ = checkpoints["mistral"]
    assert cfg.sliding_window == 12
    ids = list(range(3, 3 + 30))
    windowed = hf_logits(model, ids)
    model.config.sliding_window = None
    try:
        full = hf_logits(model, ids)
    finally:
        model.config.sliding_window = 12
    np.testing.assert_array_equal(windowed[:12], full[:12])
    assert np.abs(windowed[12:] - full[12:]).max() > 100 * ATOL


def _serve(runner, sched, kv, requests, arrivals):
    """Runs ``requests`` (request ``i`` added before step ``arrivals[i]``) through ``sched`` on
    ``runner`` to completion. Returns each request's tokens, its logits by position (a recompute
    after preemption overwrites them), the number of steps and the plans."""
    state = sched.init(kv)
    pending = sorted(zip(arrivals, range(len(requests))))
    seqs = {r.request_id: list(r.prompt_token_ids) for r in requests}
    by_pos = {r.request_id: {} for r in requests}
    step, plans = 0, []
    while pending or state.has_unfinished:
        while pending and pending[0][0] <= step:
            r = requests[pending.pop(0)[1]]
            runner.register(r)
            state = sched.add_request(state, r, float(step))
        state, plan = sched.schedule(state, float(step))
        step += 1
        if plan.is_empty:
            assert pending, "the scheduler planned nothing with no arrivals left"
            continue
        for e in plan.entries:  # the plan feeds each request's own tokens
            assert list(e.token_ids) == seqs[e.request_id][e.num_computed_tokens : e.num_computed_tokens + e.num_new_tokens]
        out, logits = runner.execute_with_logits(plan)
        for rid, c, n in zip(plan.request_ids, plan.num_computed_tokens.tolist(), plan.num_new_tokens.tolist()):
            chex.assert_shape(logits[rid], (n, VOCAB))
            by_pos[rid].update({c + j: logits[rid][j] for j in range(n)})
        for rid, tok in out.token_ids.items():
            seqs[rid].append(tok)
        state = sched.update(state, plan, out, float(step))
        for f in state.finished:
            runner.release(f.request_id)
        plans.append(plan)
    return seqs, by_pos, plans


def _check_served(model, requests, seqs, by_pos):
    for r in requests:
        rid = r.request_id
        seq = seqs[rid]
        assert len(seq) == r.max_total_tokens
        assert sorted(by_pos[rid]) == list(range(len(seq) - 1))
        ours = np.stack([by_pos[rid][i] for i in range(len(seq) - 1)])
        np.testing.assert_allclose(ours, hf_logits(model, seq[:-1]), atol=ATOL, rtol=0, err_msg=rid)


def _random_requests(rng, prompt_lens, max_new):
    return [
        Request(f"r{i}", prompt_token_ids=rng.integers(3, VOCAB, size=n).tolist(), sampling=SamplingParams(max_new_tokens=max_new, temperature=0.0))
        for i, n in enumerate(prompt_lens)
    ]


def test_vllm_scheduler_end_to_end(checkpoints):
    """A runner driven by the real vllm scheduler (whole prefills, then decode-only steps) reproduces
    transformers' logits and its greedy ``generate`` (mistral: decodes run past the window)."""
    model, cfg, params = checkpoints["mistral"]
    runner, kv = _runner(cfg, params, "grouped", num_pages=24, max_model_len=48)
    sched = schedulers.make("vllm", max_num_batched_tokens=64, max_num_seqs=4)
    reqs = _random_requests(np.random.default_rng(7), [17, 5, 14], 8)
    seqs, by_pos, plans = _serve(runner, sched, kv, reqs, [0, 0, 0])
    assert len(plans) == 8  # one prefill step, then 7 decode steps
    _check_served(model, reqs, seqs, by_pos)
    for r in reqs:
        assert seqs[r.request_id][r.prompt_len :] == hf_greedy(model, r.prompt_token_ids, 8)
    assert runner.num_compilations == 2  # one prefill shape, one decode shape


@pytest.mark.slow
@pytest.mark.parametrize("preemption", ["recompute", "swap"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_with_preemption_sweep(checkpoints, arch, impl, preemption):
    """Sarathi chunked prefills mixed with decodes, staggered arrivals and a KV cache small enough
    to preempt (recompute, or swap to host blocks and back)."""
    model, cfg, params = checkpoints[arch]
    kv = KVConfig(num_blocks=14, block_size=BLOCK_SIZE, num_host_blocks=16 if preemption == "swap" else 0)
    runner = ModelRunner(cfg, params, kv, max_model_len=48, block_rows=BLOCK_ROWS, attention=impl, chunk_pages=CHUNK_PAGES)
    sched = schedulers.make("sarathi", chunk_size=20, max_num_seqs=4, preemption_mode=preemption, watermark=0.0)
    rng = np.random.default_rng(ARCHS.index(arch))
    reqs = _random_requests(rng, [23, 9, 30, 3, 15, 12], 10)
    seqs, by_pos, plans = _serve(runner, sched, kv, reqs, [0, 0, 1, 2, 4, 7])
    _check_served(model, reqs, seqs, by_pos)
    assert any(p.num_decode_tokens and p.num_prefill_tokens for p in plans)  # mixed steps
    assert any(p.num_computed_tokens[~p.is_decode].any() for p in plans)  # a prefill continued mid-prompt
    if preemption == "swap":
        assert any(p.swap_out_blocks for p in plans) and any(p.swap_in_blocks for p in plans)
    else:
        assert any(p.preempted for p in plans)


# -- the pieces --------------------------------------------------------------------------------


def _hf_rope_config(**extra):
    return transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, **extra
    )


ROPE_CASES = {
    "default": {"rope_theta": 10000.0},
    "linear": {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "llama3": {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE_SCALING},
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_inv_freq_matches_transformers(case):
    hf_cfg = _hf_rope_config(**ROPE_CASES[case])
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    assert cfg.rope_scaling.rope_type == case
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config=hf_cfg)
    assert float(getattr(rotary, "attention_scaling", 1.0)) == 1.0
    ours = inv_freq(cfg)
    assert ours.dtype == np.float32 and ours.shape == (cfg.head_dim // 2,)
    np.testing.assert_allclose(ours, rotary.inv_freq.numpy(), rtol=1e-6, atol=0)
    if case != "default":  # the scaling really changes the frequencies
        assert not np.allclose(ours, inv_freq(cfg.replace(rope_scaling=type(cfg.rope_scaling)())))


class PiecesTest(chex.TestCase):
    """RoPE, RMSNorm and sampling: transformers' numerics, the same jitted and un-jitted."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_rope_matches_transformers(self):
        hf_cfg = _hf_rope_config(**ROPE_CASES["llama3"])
        cfg = ModelConfig.from_hf(hf_cfg.to_dict())
        T, H, D = 7, 3, cfg.head_dim
        rng = np.random.default_rng(0)
        x = rng.normal(size=(T, H, D)).astype(np.float32)
        positions = np.array([0, 1, 5, 63, 64, 200, 255], np.int32)
        freqs = jnp.asarray(inv_freq(cfg))

        @self.variant
        def rotate(x, positions):
            cos, sin = rope_tables(positions, freqs)
            return apply_rope(x, cos, sin), cos, sin

        out, cos, sin = rotate(jnp.asarray(x), jnp.asarray(positions))
        chex.assert_shape(out, (T, H, D))
        chex.assert_shape([cos, sin], (T, D))
        chex.assert_type([out, cos, sin], jnp.float32)

        rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config=hf_cfg)
        xt = torch.from_numpy(x).transpose(0, 1)[None]  # [1, H, T, D]
        hf_cos, hf_sin = rotary(xt, torch.from_numpy(positions.astype(np.int64))[None])
        q, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(xt, xt, hf_cos, hf_sin)
        np.testing.assert_allclose(np.asarray(cos), hf_cos[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(sin), hf_sin[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(out), q[0].transpose(0, 1).numpy(), atol=1e-5)
        # position 0 is the identity; rotation preserves each pair's norm
        np.testing.assert_allclose(np.asarray(out[0]), x[0], atol=1e-6)
        half = D // 2
        pair_norm = lambda a: a[..., :half] ** 2 + a[..., half:] ** 2  # noqa: E731
        np.testing.assert_allclose(pair_norm(np.asarray(out)), pair_norm(x), rtol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_rmsnorm_matches_transformers(self):
        D, eps = 16, 1e-5
        rng = np.random.default_rng(1)
        weight = rng.normal(1.0, 0.1, size=D).astype(np.float32)
        x = rng.normal(size=(5, D)).astype(np.float32) * 3.0
        hf = transformers.models.llama.modeling_llama.LlamaRMSNorm(D, eps=eps)
        with torch.no_grad():
            hf.weight.copy_(torch.from_numpy(weight))
            ref = hf(torch.from_numpy(x)).numpy()
        for dtype, atol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):

            @self.variant
            def norm(w, x, dtype=dtype):
                module = RMSNorm(D, eps, dtype)
                module.weight[...] = w
                return module(x)

            out = norm(jnp.asarray(weight, dtype), jnp.asarray(x, dtype))
            chex.assert_shape(out, x.shape)
            chex.assert_type(out, dtype)
            np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=atol * 4, rtol=atol)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sampling_is_the_same_jitted(self):
        rng = np.random.default_rng(2)
        S, V = 6, 32
        logits = jnp.asarray(rng.normal(size=(S, V)).astype(np.float32) * 2)
        temperature = jnp.array([0.0, 1.0, 0.7, 1.0, 1.3, 0.0], jnp.float32)
        top_k = jnp.array([0, 0, 5, 0, 3, 4], jnp.int32)
        top_p = jnp.array([1.0, 1.0, 1.0, 0.6, 0.9, 0.5], jnp.float32)
        seed = jnp.arange(S, dtype=jnp.uint32) * 7919
        index = jnp.array([0, 3, 1, 4, 9, 2], jnp.int32)
        out = self.variant(sampling.sample)(logits, temperature, top_k, top_p, seed, index)
        chex.assert_shape(out, (S,))
        chex.assert_type(out, jnp.int32)
        expected = jax.jit(sampling.sample)(logits, temperature, top_k, top_p, seed, index)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
        greedy = np.argmax(np.asarray(logits), axis=-1)
        assert out[0] == greedy[0] and out[5] == greedy[5]
