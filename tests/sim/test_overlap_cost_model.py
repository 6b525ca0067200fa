"""Overlap-aware cost model (NanoFlow): interference curves, the nano-batched pipeline's bounds by
hand, the unsplit step equal to the roofline, decode runs equal to stepping."""

import numpy as np
import pytest
from sim_plans import make_plan

from jaxserve.sim.cost_model import RooflineCostModel, StepParts
from jaxserve.sim.hardware import get_hardware
from jaxserve.sim.interference import GEMV_A100, NANOFLOW_A100, NETWORK_A100, InterferenceCurve
from jaxserve.sim.models import get_model
from jaxserve.sim.nano_search import steady_state_plan
from jaxserve.sim.overlap_cost_model import NanoSchedule, OverlapCostModel, overlapped_busy, sequential_ops_s

LLAMA70, A100 = get_model("llama-2-70b"), get_hardware("a100-80gb")


def parts(**kw):
    fields = dict.fromkeys(StepParts._fields, 0.0)
    return StepParts(**{**fields, **kw})


# -- interference curves -------------------------------------------------------------------------------

def test_curves_interpolate_nanoflows_profile():
    assert GEMV_A100(0.4) == 0.6 and NETWORK_A100(0.4) == 0.8  # profiled points
    assert GEMV_A100(0.25) == pytest.approx(0.45) and NETWORK_A100(0.7) == pytest.approx(0.94)  # between them
    assert GEMV_A100(0.05) == pytest.approx(0.125) and GEMV_A100(0.0) == 0.0 and GEMV_A100(1.0) == 1.0
    np.testing.assert_allclose(NETWORK_A100(np.array([0.0, 0.1, 1.0])), [0.0, 0.4, 1.0])


@pytest.mark.parametrize("shares, perf, match", [
    ((0.5, 0.2), (0.3, 0.4), "shares must increase"), ((0.2, 1.0), (0.3, 0.4), "shares must increase"),
    ((0.2, 0.5), (0.5, 0.4), "performance must be non-decreasing"), ((0.2,), (0.3, 0.4), "equal-length"),
])  # fmt: skip
def test_curve_validation(shares, perf, match):
    with pytest.raises(ValueError, match=match):
        InterferenceCurve("x", shares, perf, "test")


# -- the pipeline's bounds, by hand ---------------------------------------------------------------------

# GEMMs 100 s of FLOPs over 10 s of weights, attention 20 s of KV, collectives 30 s; 10 layers.
WORK = parts(gemm_compute_s=100.0, weights_s=10.0, kv_s=20.0, comm_s=30.0)


def test_two_nano_batches_are_bound_by_the_dependency_chain():
    # attention 20 / P(0.2)=0.4 -> 50; collectives 30 / P(0.1)=0.4 -> 75; GEMMs on 0.7 of the SMs.
    # SM time 100 + 0.2*50 + 0.1*75 = 117.5; chain (100/0.7 + 50 + 75) / 2 = 133.93; fill chain / 10.
    chain = (100 / 0.7 + 50 + 75) / 2
    assert overlapped_busy(WORK, 2, 0.2, 0.1, 10) == pytest.approx(chain + chain / 10)


def test_four_nano_batches_are_bound_by_the_sms():
    chain = (100 / 0.7 + 50 + 75) / 4  # 66.96 < SM time 117.5; HBM 4*10 + 20 = 60
    assert overlapped_busy(WORK, 4, 0.2, 0.1, 10) == pytest.approx(117.5 + chain / 10)


def test_a_memory_bound_split_is_bound_by_the_weights_each_nano_batch_reads():
    # Weight-bound GEMMs (1 s of FLOPs, 10 s of weights): each of 4 nano-batches reads them again.
    # GEMMs 40; attention 2 / P(0.1)=0.25 -> 8; collectives 1 / 0.4 -> 2.5; SM time 40 + 0.8 + 0.25;
    # HBM 4*10 + 2 = 42 binds; chain (40/0.8 + 8 + 2.5) / 4 = 15.125.
    work = parts(gemm_compute_s=1.0, weights_s=10.0, kv_s=2.0, comm_s=1.0)
    assert overlapped_busy(work, 4, 0.1, 0.1, 10) == pytest.approx(42.0 + 15.125 / 10)


def test_attention_flops_scale_with_the_share_and_kv_streaming_by_the_gemv_curve():
    compute_bound = parts(attn_compute_s=10.0, kv_s=1.0, gemm_compute_s=100.0)
    memory_bound = parts(attn_compute_s=1.0, kv_s=10.0, gemm_compute_s=100.0)
    # attention 10/0.5 = 20 vs KV 10/P(0.5)=0.7 -> 14.29; SM time 100 + 0.5*20 = 110 either way for the first
    assert overlapped_busy(compute_bound, 8, 0.5, 0.0, 1000) == pytest.approx(110.0 + (200 + 20) / 8 / 1000)
    assert overlapped_busy(memory_bound, 8, 0.5, 0.0, 1000) == pytest.approx(100 + 0.5 * 10 / 0.7 + (200 + 10 / 0.7) / 8 / 1000)


def test_a_kind_with_work_and_no_share_never_finishes():
    assert overlapped_busy(WORK, 2, 0.2, 0.0, 10) == np.inf
    assert np.isfinite(overlapped_busy(parts(gemm_compute_s=1.0, kv_s=1.0), 2, 0.2, 0.0, 10))  # no collectives


def test_bounds_broadcast_over_a_grid_of_schedules():
    grid = overlapped_busy(WORK, np.array([2, 4]), np.array([0.2, 0.2]), np.array([0.1, 0.1]), 10)
    assert grid.tolist() == [overlapped_busy(WORK, 2, 0.2, 0.1, 10), overlapped_busy(WORK, 4, 0.2, 0.1, 10)]


# -- the cost model -------------------------------------------------------------------------------------

PLANS = [make_plan([1000] * 64, [1] * 64), make_plan([0, 500], [2048, 1], [True, True]), steady_state_plan(512, 512, 2048)]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_unsplit_schedule_is_the_roofline_bit_for_bit(async_scheduling):
    roofline = RooflineCostModel(LLAMA70, A100, tp=8, async_scheduling=async_scheduling)
    unsplit = OverlapCostModel(LLAMA70, A100, tp=8, async_scheduling=async_scheduling)
    for plan in PLANS:
        assert unsplit.step(plan) == roofline.step(plan)
    for k in (4, 40):
        for ours, theirs in zip(unsplit.decode_run(64, 64000, 1000, k), roofline.decode_run(64, 64000, 1000, k)):
            assert np.array_equal(ours, theirs)


def test_nano_batching_a_dense_step_beats_the_fused_roofline_which_beats_kernel_by_kernel():
    """Llama-2-70B on 8xA100, 2048 dense tokens of a 512/512 mix: the collectives hide under the
    GEMMs (NanoFlow's gain); running each kernel alone is slower than the fused roofline."""
    plan = steady_state_plan(512, 512, 2048)
    roofline = RooflineCostModel(LLAMA70, A100, tp=8)
    nano = OverlapCostModel(LLAMA70, A100, tp=8, schedule=NanoSchedule(4, 0.1, 0.1))
    fused = roofline.step(plan).duration_s
    assert nano.step(plan).duration_s < 0.92 * fused and sequential_ops_s(roofline, plan) > 1.05 * fused
    asynchronous = OverlapCostModel(LLAMA70, A100, tp=8, schedule=NanoSchedule(4, 0.1, 0.1), async_scheduling=True)
    assert asynchronous.step(plan).duration_s == pytest.approx(nano.step(plan).duration_s - roofline.step_overhead_s)


def test_a_step_the_split_would_slow_runs_unsplit():
    small = make_plan([1000] * 4, [1] * 4)  # 4 decodes: weight-bound, 4 nano-batches would read the weights 4 times
    roofline = RooflineCostModel(LLAMA70, A100, tp=8)
    nano = OverlapCostModel(LLAMA70, A100, tp=8, schedule=NanoSchedule(4, 0.1, 0.1))
    assert nano.step(small) == roofline.step(small)


def test_overlapped_decode_run_equals_stepping_bit_for_bit():
    nano = OverlapCostModel(LLAMA70, A100, tp=8, schedule=NanoSchedule(3, 0.2, 0.1), async_scheduling=True)
    rows, context = 1024, 1024 * 700
    durations, energies = nano.decode_run(rows, context, 800, 30)
    for j in (0, 7, 29):
        cost = nano.step(make_plan([700 + j] * rows, [1] * rows))
        assert (durations[j], energies[j]) == (cost.duration_s, cost.energy_j)
    assert durations[0] < RooflineCostModel(LLAMA70, A100, tp=8, async_scheduling=True).decode_run(rows, context, 800, 1)[0][0]


def test_energy_counts_the_duplicated_weight_reads():
    plan = steady_state_plan(512, 512, 2048)
    nano = OverlapCostModel(LLAMA70, A100, tp=8, schedule=NanoSchedule(4, 0.1, 0.1))
    cost, p = nano.step(plan), nano.parts(plan)
    assert cost.memory_s == pytest.approx(4 * p.weights_s + p.act_s + p.kv_s)
    assert cost.energy_j > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": NanoSchedule(2, 0.2, 0.0)}, "network_share must be > 0"),
    ({"schedule": NanoSchedule(2, 0.2, 0.1), "pp": 2}, "pp must be 1"),
    ({"power_cap_w": 300.0}, "unset power_cap_w"),
    ({"schedule": (2, 0.2, 0.1)}, "must be a NanoSchedule"),
])  # fmt: skip
def test_model_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OverlapCostModel(LLAMA70, A100, **{"tp": 8, **kwargs})


@pytest.mark.parametrize("args, match", [
    ((0,), "num_nano must be an int >= 1"), ((2, 1.0, 0.0), "memory_share must be in"),
    ((2, 0.5, 0.5), "must leave the GEMMs a share"), ((2, 0.1, -0.1), "network_share must be in"),
])  # fmt: skip
def test_schedule_validation(args, match):
    with pytest.raises(ValueError, match=match):
        NanoSchedule(*args)


def test_nanoflow_curves_are_the_default():
    model = OverlapCostModel(LLAMA70, A100, tp=8, schedule=NanoSchedule(2, 0.3, 0.1))
    assert model.interference is NANOFLOW_A100
    assert repr(model).startswith("OverlapCostModel(llama-2-70b, a100-80gb, tp=8") and "num_nano=2" in repr(model)


def test_like_copies_the_roofline_device():
    roofline = RooflineCostModel(LLAMA70, A100, tp=8, mfu=0.5, step_overhead_s=0.01, frequency_mhz=1200)
    nano = OverlapCostModel.like(roofline, NanoSchedule(2, 0.2, 0.1), async_scheduling=True)
    assert (nano.tp, nano.mfu, nano.step_overhead_s, nano.frequency_mhz, nano.async_scheduling) == (8, 0.5, 0.01, 1200, True)
    assert OverlapCostModel.like(roofline, NanoSchedule()).step(PLANS[2]) == roofline.step(PLANS[2])
