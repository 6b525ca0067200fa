"""Nano-batched engine steps (NanoFlow, issue 19 item 2) compute the unsplit step: every row's float32
logits (atol 1e-5) and the greedy and seeded tokens, for prefill-only, mixed and decode-only
steps, n = 2, 3, 4 (splits that do not divide the rows, fewer rows than n, a prefill chunk whose
blocks fall in different nano-batches), on one device and under tp = 2 / 4 meshes of host
devices, through ``ModelRunner``, ``jaxserve.LLM`` and the config; the boundaries add no compiled
shape, and a split step's KV write copies no cache.
"""

from __future__ import annotations

import numpy as np
import pytest
from config_defaults import default_config
from engine_testing import RUNNER_KV, greedy, prompt, request, rows_plan
from hf_checkpoints import make_checkpoint

import jaxserve
from jaxserve.config import ConfigError, override
from jaxserve.engine.model_runner import ModelRunner
from jaxserve.engine.packing import pack
from jaxserve.model.nano_batch import nano_split
from jaxserve.parallel.tensor_parallel import engine_mesh
from jaxserve.plan import BatchPlan
from jaxserve.request import SamplingParams

ATOL = 1e-5  # float32: a nano-batch's GEMMs have fewer rows (observed <= 1e-6)
BLOCK_ROWS = 8  # small blocks: a 38-token chunk is 5 blocks, which n = 2..4 split apart
HEADS = {"num_attention_heads": 8, "head_dim": 8}  # tp = 2, 4 divide them (2 KV heads: split, replicated)
PROMPTS = {"a": prompt(41, 70), "b": prompt(42, 24), "c": prompt(43, 12)}
TABLES = {"a": tuple(range(0, 20)), "b": tuple(range(20, 28)), "c": tuple(range(28, 32))}
# (request, tokens in KV, new tokens) per step: prefill-only (5 + 3 + 2 blocks, c's 9 tokens pad
# its second block), mixed (a's second chunk of 4 blocks beside two decode rows), decode-only (3 rows).
STEPS = (
    (("a", 0, 38), ("b", 0, 20), ("c", 0, 9)),
    (("a", 38, 30), ("b", 20, 1), ("c", 9, 1)),
    (("a", 68, 1), ("b", 21, 1), ("c", 10, 1)),
)
SAMPLING = {"a": greedy(1), "b": SamplingParams(max_new_tokens=1, temperature=1.0, seed=7),
            "c": SamplingParams(max_new_tokens=1, temperature=0.8, top_k=20, top_p=0.9, seed=3)}  # fmt: skip


def step_plan(rows, step: int) -> BatchPlan:
    """``rows``: ``(request id, tokens in KV, new tokens)`` of the module's requests."""
    return rows_plan([(rid, c, n, TABLES[rid]) for rid, c, n in rows], PROMPTS, step)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from jaxserve.model.loader import load_model

    directory = str(tmp_path_factory.mktemp("nano-llama"))
    make_checkpoint(directory, "llama", **HEADS)
    return directory, *load_model(directory)


@pytest.fixture(scope="module")
def runs(model):
    """``(n, tp, attention)`` -> ``(runner, [(tokens, logits) per step])``, built on first use; tp 0:
    one device. ``attention="ragged"`` on CPU is the ragged kernel's jnp reference (the GPU/TPU
    layout: one ragged sequence per decode row and per block of a nano-batch)."""
    _, cfg, params = model
    done = {}

    def get(n, tp=0, attention="grouped"):
        if (n, tp, attention) not in done:
            mesh = engine_mesh(tp) if tp else None
            runner = ModelRunner(cfg, params, RUNNER_KV, block_rows=BLOCK_ROWS, mesh=mesh, nano_batches=n, attention=attention)
            for rid, ids in PROMPTS.items():
                runner.register(request(rid, ids, SAMPLING[rid]))
            out = []
            for step, rows in enumerate(STEPS):
                result, logits = runner.execute_with_logits(step_plan(rows, step))
                out.append((result.token_ids, logits))
            done[n, tp, attention] = runner, out
        return done[n, tp, attention]

    return get


def check_same_as_unsplit(runs, n, tp, attention="grouped"):
    runner, got = runs(n, tp, attention)
    _, want = runs(1, 0, attention)
    for (tokens, logits), (want_tokens, want_logits) in zip(got, want):
        assert tokens == want_tokens
        for rid in want_logits:
            np.testing.assert_allclose(logits[rid], want_logits[rid], atol=ATOL, rtol=0)


# Each runner compiles its three step shapes (10-30 s on the shared 2-core machine), so the
# default run covers n = 3 on each attention path and one mesh of each size; the rest is slow.
@pytest.mark.parametrize("n, tp, attention", [(3, 0, "grouped"), (2, 2, "grouped")])
def test_nano_batched_steps_equal_the_unsplit_step(runs, n, tp, attention):
    check_same_as_unsplit(runs, n, tp, attention)


@pytest.mark.slow
@pytest.mark.parametrize("n, tp, attention", [(2, 0, "grouped"), (4, 0, "grouped"), (3, 0, "ragged"), (4, 0, "ragged"),
                                              (4, 2, "grouped"), (2, 4, "grouped"), (3, 4, "grouped"),
                                              (4, 4, "grouped")])  # fmt: skip
def test_nano_batched_steps_sweep(runs, n, tp, attention):
    check_same_as_unsplit(runs, n, tp, attention)


def test_the_steps_are_split_as_intended():
    """The scenario's buckets really are split: non-dividing runs, a chunk's blocks in several
    nano-batches, fewer decode rows than n; one row or block is not split at all."""
    assert nano_split(0, 10, BLOCK_ROWS, 3).parts == (((0, 0), (0, 3)), ((0, 0), (3, 6)), ((0, 0), (6, 10)))
    assert nano_split(2, 4, BLOCK_ROWS, 4).parts == (((0, 0), (0, 1)), ((0, 1), (1, 2)), ((1, 1), (2, 3)), ((1, 2), (3, 4)))
    assert nano_split(3, 0, BLOCK_ROWS, 4).parts == (((0, 1), (0, 0)), ((1, 2), (0, 0)), ((2, 3), (0, 0)))
    assert nano_split(1, 0, BLOCK_ROWS, 4) is None and nano_split(0, 1, BLOCK_ROWS, 2) is None
    assert nano_split(64, 16, BLOCK_ROWS, 1) is None


def test_take_and_merge_are_inverse():
    import jax.numpy as jnp

    x = jnp.arange(3 + 5 * BLOCK_ROWS)
    for n in (2, 3, 4):
        split = nano_split(3, 5, BLOCK_ROWS, n)
        parts = [split.take(x, i) for i in range(len(split.parts))]
        assert sum(p.shape[0] for p in parts) == x.shape[0]
        np.testing.assert_array_equal(split.merge(parts), x)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_a_bad_count_is_refused(bad):
    with pytest.raises(ValueError, match="nano_batches"):
        nano_split(4, 4, BLOCK_ROWS, bad)


def test_no_compiled_shape_of_its_own_and_no_cache_copy(runs):
    """One compilation per bucket shape whatever n (the boundaries follow from the shape), and the
    compiled split step copies no layer's cache: every nano-batch attends over one KV write."""
    runner, _ = runs(3)
    assert runner.num_compilations == runs(1)[0].num_compilations == len(STEPS)
    batch = pack(step_plan(STEPS[1], 1), runner.spec, runner._sampling)
    args = (runner.params, runner.caches, batch.token_ids, batch.attn, batch.logits_rows, tuple(batch.sampling))
    hlo = runner._steps[False].lower(*args).compile().as_text()
    cache = "f32[%d,%d,%d,%d]" % runner.caches[0][0].shape
    assert not [line for line in hlo.splitlines() if " copy(" in line and cache in line]


def test_llm_generates_the_same_tokens(model):
    directory = model[0]
    options = dict(num_blocks=RUNNER_KV.num_blocks, block_size=RUNNER_KV.block_size, block_rows=BLOCK_ROWS,
                   scheduler="vllm", scheduler_options={"max_num_seqs": 2}, stop_at_eos=False)  # fmt: skip
    prompts = [PROMPTS["a"][:30], PROMPTS["c"]]  # one step of 4 + 2 blocks, then two decode rows
    sampling = (SamplingParams(max_new_tokens=4, temperature=0.0), SamplingParams(max_new_tokens=4, temperature=1.0, seed=5))
    outs = {}
    for n in (1, 3):
        llm = jaxserve.LLM(directory, nano_batches=n, **options)
        outs[n] = [[c.token_ids for c in llm.generate(prompts, s)] for s in sampling]
    assert outs[3] == outs[1]
    with pytest.raises(ValueError, match="nano_batches"):
        jaxserve.LLM(directory, nano_batches=0, **options)


def test_the_config_key_reaches_the_runner(model):
    from jaxserve.engine.serve_config import build_runner, engine_settings

    config = override(default_config(), {"backend": "engine", "model.path": model[0], "kv.num_blocks": 16,
                                     "engine.compile_cache": ""})  # fmt: skip
    assert engine_settings(config).nano_batches == 1
    runner, _ = build_runner(engine_settings(override(config, {"engine.nano_batches": 4})), max_num_seqs=4)
    assert runner.nano_batches == 4
    with pytest.raises(ConfigError, match="engine.nano_batches must be >= 1"):
        engine_settings(override(config, {"engine.nano_batches": 0}))
    with pytest.raises(ConfigError, match="engine.nano_batches=2 does not run with parallel.esp"):
        engine_settings(override(config, {"engine.nano_batches": 2, "parallel.esp": True, "parallel.sp": 2}))
