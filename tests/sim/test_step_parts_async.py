"""RooflineCostModel.parts (a step's terms by operation class) and asynchronous host scheduling."""

import pytest
from sim_plans import make_plan

from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.hardware import get_hardware
from jaxserve.sim.models import get_model


def model(**kw):
    return RooflineCostModel(get_model("llama-2-70b"), get_hardware("a100-80gb"), tp=8, **kw)


MIXED = make_plan([900, 1500, 0, 300], [1, 1, 700, 1], [True, True, False, True])


@pytest.mark.parametrize("ops", [{}, {"copy_blocks": ((1, 2), (3, 4))}, {"swap_out_blocks": ((5, 6),)}])
def test_parts_recombine_to_the_step_bit_for_bit(ops):
    cm = model()
    plan = make_plan([900, 1500, 0, 300], [1, 1, 700, 1], [True, True, False, True], **ops)
    p, cost = cm.parts(plan), cm.step(plan)
    memory = p.weights_s + p.kv_s + p.act_s + (p.copy_s if p.copy_s else 0.0)
    assert cost.compute_s == p.gemm_compute_s + p.attn_compute_s
    assert cost.memory_s == memory
    assert cost.comm_s == p.comm_s + p.comm_fixed_s + (p.swap_s if p.swap_s else 0.0)
    assert cost.duration_s == p.host_s + max(cost.compute_s, cost.memory_s) + cost.comm_s
    assert (p.copy_s > 0) == bool(ops.get("copy_blocks")) and (p.swap_s > 0) == bool(ops.get("swap_out_blocks"))


def test_parts_by_hand():
    """4 rows, 703 tokens, 3 sampled: GEMMs on every token, the LM head on sampled rows, attention
    pairs Σ n·(c + (n+1)/2), KV read (prefix + new) and written (new), the host's 4 ms."""
    cm = model()
    m, hw = cm.model, cm.hardware
    p = cm.parts(MIXED)
    flops = hw.peak_flops("bf16") * cm.mfu
    assert p.gemm_compute_s == pytest.approx((703 * 2 * m.matmul_params + 3 * 2 * m.lm_head_params) / 8 / flops)
    pairs = 900 + 1500 + 300 + 3 * 1 + 700 * 701 / 2
    assert p.attn_compute_s == pytest.approx(pairs * 4 * 80 * (64 // 8) * 128 / flops)
    assert p.kv_s == pytest.approx((2700 + 2 * 703) * m.kv_bytes_per_token("bf16", 8) / (hw.memory_bandwidth * cm.mbu))
    assert p.weights_s == pytest.approx((m.matmul_params + m.lm_head_params) * 2 / 8 / (hw.memory_bandwidth * cm.mbu))
    assert p.host_s == cm.step_overhead_s == 4e-3
    assert p.comm_fixed_s == pytest.approx((2 * 80 + 1) * cm.collective_latency_s)


def test_empty_plan_has_zero_parts():
    assert set(model().parts(make_plan([], [], []))) == {0.0}


def test_decode_parts_equal_the_plan_parts():
    cm = model()
    plan = make_plan([1000, 2000, 500], [1, 1, 1])
    assert cm.decode_parts(3, 3500.0) == cm.parts(plan)


@pytest.mark.parametrize("overhead, device_bound", [(1e-3, True), (0.5, False)])
def test_async_step_is_the_larger_of_host_and_device(overhead, device_bound):
    sync, asyn = model(step_overhead_s=overhead), model(step_overhead_s=overhead, async_scheduling=True)
    s, a = sync.step(MIXED), asyn.step(MIXED)
    device = max(s.compute_s, s.memory_s) + s.comm_s
    assert s.duration_s == overhead + device
    assert a.duration_s == (device if device_bound else overhead)
    assert (a.compute_s, a.memory_s, a.comm_s) == (s.compute_s, s.memory_s, s.comm_s)
    assert 0 < a.energy_j < s.energy_j  # shorter: less idle energy, the same busy energy


def test_async_hides_the_per_row_host_time_too():
    a = model(step_overhead_s=0.0, per_seq_overhead_s=0.1, async_scheduling=True)
    assert a.step(MIXED).duration_s == 0.4


@pytest.mark.parametrize("k", [3, 40])
@pytest.mark.parametrize("overhead", [0.02, 1e-3])  # host-bound, device-bound (the device step is ~14 ms)
def test_async_decode_run_equals_stepping_bit_for_bit(k, overhead):
    cm = model(async_scheduling=True, step_overhead_s=overhead)
    rows, context = 64, 64 * 200
    durations, energies = cm.decode_run(rows, context, 4096, k)
    for j in range(k):
        cost = cm.step(make_plan([200 + j] * rows, [1] * rows))
        assert (durations[j], energies[j]) == (cost.duration_s, cost.energy_j)
    assert (durations[0] == overhead) == (overhead > 0.015)


def test_async_scheduling_must_be_a_bool():
    with pytest.raises(ValueError, match="async_scheduling must be a bool"):
        model(async_scheduling=1)
