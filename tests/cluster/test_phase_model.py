"""The analytic phase model: M/D/1 and M/G/1 prefill values worked by hand, decode TPOT from Little's
law worked by hand, the vmapped functions equal a loop over candidates, and the step-time tables
come from the cost model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxserve.cluster import phase_model as pm
from jaxserve.sim import RooflineCostModel, get_hardware, get_model

GRID = np.array([1.0, 100.0, 200.0, 300.0])


def prefill(steps, in_flight=(1.0,), count=(1.0,)):
    return pm.PrefillTable(np.array(steps, np.float32).reshape(len(count), -1), np.array(in_flight, np.float32),
                           np.array(count, np.float32))  # fmt: skip


def moments(*lens):
    return pm.prompt_moments(np.array(lens), GRID)


def test_md1_ttft_and_max_rate_by_hand():
    # every prompt 100 tokens, D = 0.1 s: M/D/1 wait λD²/(2(1−λD)); λ = 5 -> ρ = 0.5, wait 0.05
    table, m = prefill([[0.0, 0.1, 0.0, 0.0]]), moments(100, 100)
    assert np.asarray(pm.prefill_ttft(table, m, [5.0, 0.0]))[0] == pytest.approx([0.15, 0.1], rel=1e-6)
    assert np.asarray(pm.prefill_ttft(table, m, [10.0, 12.0]))[0].tolist() == [np.inf, np.inf]  # ρ >= 1
    # TTFT 0.15 leaves 0.05 s of queueing: λ* = 2·0.05 / (0.01 + 2·0.05·0.1) = 5
    assert float(pm.prefill_max_rate(table, m, 0.15)[0]) == pytest.approx(5.0, rel=1e-6)
    assert float(pm.prefill_max_rate(table, m, 0.1)[0]) == 0.0  # no slack at all
    # two instances split the rate: 10 req/s over two is 5 each
    two = prefill([[0.0, 0.1, 0.0, 0.0]], count=(2.0,))
    assert float(pm.prefill_ttft(two, m, [10.0])[0, 0]) == pytest.approx(0.15, rel=1e-6)
    assert float(pm.prefill_max_rate(two, m, 0.15)[0]) == pytest.approx(10.0, rel=1e-6)


def test_pipelined_prefill_is_distserves_two_stage_formula():
    # DistServe §4.1, two stages: TTFT = D + R·D² / (4 (2 − R·D)); D = 0.1, R = 10 -> 0.125
    table = prefill([[0.0, 0.1, 0.0, 0.0]], in_flight=(2.0,))
    assert float(pm.prefill_ttft(table, moments(100), [10.0])[0, 0]) == pytest.approx(0.125, rel=1e-6)


def test_mg1_over_a_prompt_length_mix():
    # half the prompts take 0.1 s, half 0.3 s (grid points 100 and 300): E[S] = 0.2, E[S²] = 0.05;
    # λ = 2: wait = 2·0.05 / (2·0.6) = 1/12
    table = prefill([[0.0, 0.1, 0.2, 0.3]])
    got = float(pm.prefill_ttft(table, moments(100, 300), [2.0])[0, 0])
    assert got == pytest.approx(0.2 + 1 / 12, rel=1e-6)
    # a prompt between grid points takes the interpolated time: 150 tokens -> 0.15 s
    assert float(pm.prefill_ttft(table, moments(150), [0.0])[0, 0]) == pytest.approx(0.15, rel=1e-6)


def decode(a=0.02, c=0.001, max_batch=256.0, in_flight=1.0, count=1.0):
    grid = np.array([1.0, 2.0, 64.0, 256.0], np.float32)
    return pm.DecodeTable(grid, (a + c * grid)[None], np.array([max_batch], np.float32),
                          np.array([in_flight], np.float32), np.array([count], np.float32))  # fmt: skip


def test_decode_tpot_and_max_rate_by_hand():
    # t(b) = 0.02 + 0.001 b, 99 steps a request; Little: b = λ·99·t(b) -> t = 0.02 / (1 − 99·0.001·λ)
    table = decode()
    assert float(pm.decode_tpot(table, 99.0, [5.0])[0, 0]) == pytest.approx(0.02 / 0.505, rel=1e-5)
    # TPOT 0.05 allows b = 30: λ* = 30 / (99 · 0.05)
    assert float(pm.decode_max_rate(table, 99.0, 0.05)[0]) == pytest.approx(30 / 4.95, rel=1e-5)
    assert float(pm.decode_max_rate(table, 99.0, 0.02)[0]) == 0.0  # one row alone takes 0.021 s
    # two micro-batches in flight and two instances each double the rate
    assert float(pm.decode_max_rate(decode(in_flight=2.0, count=2.0), 99.0, 0.05)[0]) == pytest.approx(4 * 30 / 4.95, rel=1e-5)


def test_decode_batch_cap_bounds_the_rate():
    # at most 10 rows fit: the cap's rate is 10 / (99 · 0.03); past it the queue grows without bound
    table = decode(max_batch=10.0)
    cap = 10 / (99 * 0.03)
    assert float(pm.decode_max_rate(table, 99.0, 0.05)[0]) == pytest.approx(cap, rel=1e-5)
    tpot = np.asarray(pm.decode_tpot(table, 99.0, [0.99 * cap, 1.01 * cap]))[0]
    assert tpot[0] < 0.03 and tpot[1] == np.inf


def test_vmapped_equals_a_loop_over_candidates():
    rng = np.random.default_rng(3)
    c = 7
    pre = pm.PrefillTable(np.sort(rng.uniform(0.01, 0.3, (c, 4)), 1).astype(np.float32),
                          rng.choice([1.0, 2.0, 4.0], c).astype(np.float32), rng.integers(1, 5, c).astype(np.float32))  # fmt: skip
    grid = np.array([1.0, 8.0, 64.0, 256.0], np.float32)
    dec = pm.DecodeTable(grid, (rng.uniform(0.01, 0.03, (c, 1)) + rng.uniform(1e-4, 1e-3, (c, 1)) * grid).astype(np.float32),
                         rng.uniform(20, 256, c).astype(np.float32), rng.choice([1.0, 2.0], c).astype(np.float32),
                         rng.integers(1, 5, c).astype(np.float32))  # fmt: skip
    m, rates = moments(50, 120, 280), np.array([0.5, 3.0, 9.0, 40.0], np.float32)
    ttft, tpot = np.asarray(pm.prefill_ttft(pre, m, rates)), np.asarray(pm.decode_tpot(dec, 80.0, rates))
    pre_rate, dec_rate = np.asarray(pm.prefill_max_rate(pre, m, 0.4)), np.asarray(pm.decode_max_rate(dec, 80.0, 0.04))
    assert np.isfinite(ttft).any() and np.isinf(ttft).any() and (pre_rate > 0).all() and (dec_rate > 0).all()
    # the single-candidate functions, jitted once each (eager dispatch would compile every op)
    ttft_one, pre_one = jax.jit(pm._prefill_ttft_one), jax.jit(pm._prefill_max_rate_one)
    tpot_one, dec_one = jax.jit(pm._decode_tpot_one), jax.jit(pm._decode_max_rate_one)
    for i in range(c):
        p = [np.asarray(x)[i] for x in pre]
        d = [np.asarray(grid)] + [np.asarray(x)[i] for x in dec[1:]]
        np.testing.assert_allclose(np.asarray(ttft_one(m.first, m.second, *p, rates)), ttft[i], rtol=1e-6)
        np.testing.assert_allclose(float(pre_one(m.first, m.second, *p, 0.4)), pre_rate[i], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(tpot_one(*d, 80.0, rates)), tpot[i], rtol=1e-6)
        np.testing.assert_allclose(float(dec_one(*d, 80.0, 0.04)), dec_rate[i], rtol=1e-6)


def test_tables_come_from_the_cost_model_and_the_max_rate_meets_the_target():
    cm = RooflineCostModel(get_model("llama-2-13b"), get_hardware("a100-80gb"), tp=2)
    grid = pm.length_grid(2048, 12)
    steps = pm.prefill_step_times(cm, grid, 16)
    assert steps[-1] == cm.step(pm.prefill_plan(2048, 16)).duration_s and np.all(np.diff(steps) > 0)
    batches = pm.length_grid(256, 12)
    dsteps = pm.decode_step_times(cm, batches, 700.0, 3000)
    assert dsteps[3] == cm.decode_run(int(batches[3]), int(round(batches[3] * 700)), 3000, 1)[0][0]
    table = pm.DecodeTable(batches.astype(np.float32), dsteps[None].astype(np.float32),
                           np.array([256.0], np.float32), np.ones(1, np.float32), np.ones(1, np.float32))  # fmt: skip
    rate = float(pm.decode_max_rate(table, 150.0, 0.04)[0])
    assert float(pm.decode_tpot(table, 150.0, [rate])[0, 0]) == pytest.approx(0.04, rel=1e-4)


def test_workload_moments_by_hand():
    # prompt 10, 4 outputs: decode steps run with 10, 11, 12 tokens in KV
    w = pm.PhaseWorkload.from_lengths([10, 20], [4, 1])
    assert (w.decode_steps, w.context_per_row, w.max_prompt, w.max_total) == (1.5, 11.0, 20, 21)
    with pytest.raises(ValueError, match="no decode phase"):
        pm.PhaseWorkload.from_lengths([10, 20], [1, 1])
    with pytest.raises(ValueError, match="as many output lengths"):
        pm.PhaseWorkload.from_lengths([10, 20], [3])
    with pytest.raises(ValueError, match="outside the grid"):
        pm.prompt_moments(np.array([400]), GRID)
