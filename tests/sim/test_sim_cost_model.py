"""RooflineCostModel: the known shapes of LLM serving cost, parallelism, energy, KV capacity."""

import math

import numpy as np
import pytest

import jaxserve
from jaxserve.sim.cost_model import DEFAULT_STEP_OVERHEAD_S, RooflineCostModel, StepCost
from jaxserve.sim.hardware import get_hardware
from jaxserve.sim.models import ModelSpec, get_model

BS = 16


def make_plan(computed, new, samples=None, **ops):
    computed = np.asarray(computed, np.int64)
    new = np.asarray(new, np.int64)
    samples = np.ones(len(new), bool) if samples is None else np.asarray(samples, bool)
    tables = tuple(tuple(range(-(-int(c + n) // BS))) for c, n in zip(computed.tolist(), new.tolist()))
    return jaxserve.BatchPlan(
        request_ids=tuple(f"r{i}" for i in range(len(new))),
        num_computed_tokens=computed,
        num_new_tokens=new,
        samples_token=samples,
        block_tables=tables,
        token_ids=np.zeros(int(new.sum()), np.int32),
        block_size=BS,
        **ops,
    )


def prefill(n):
    return make_plan([0], [n])


def decode(batch, context):
    """``batch`` decodes, each with ``context`` tokens already in KV."""
    return make_plan([context] * batch, [1] * batch)


def cost_model(model="llama-2-7b", hardware="a100-80gb", **kw):
    return RooflineCostModel(get_model(model), get_hardware(hardware), **kw)


A100 = cost_model()


# -- the known shapes ------------------------------------------------------------------------------

def test_prefill_is_compute_bound():
    c = A100.step(prefill(2048))
    assert c.compute_s > c.memory_s
    assert c.duration_s == pytest.approx(DEFAULT_STEP_OVERHEAD_S + c.compute_s)


@pytest.mark.parametrize("batch", [1, 2, 4, 8, 16, 32])
def test_small_batch_decode_is_memory_bound(batch):
    c = A100.step(decode(batch, 1024))
    assert c.memory_s > c.compute_s


def test_decode_memory_time_is_weights_plus_kv():
    # Batch-1 decode reads ~all 13.5 GB of weights once: ~8.3 ms at 80 % of 2,039 GB/s.
    c = A100.step(decode(1, 0))
    assert c.memory_s == pytest.approx(13.48e9 / (2039e9 * 0.8), rel=0.02)


def test_decode_time_grows_with_context():
    assert A100.step(decode(8, 4096)).duration_s > A100.step(decode(8, 512)).duration_s
    assert A100.step(decode(1, 4096)).memory_s > A100.step(decode(1, 512)).memory_s


def test_decode_batching_amortizes_weights():
    one, many = A100.step(decode(1, 512)), A100.step(decode(64, 512))
    assert many.duration_s < 64 * one.duration_s / 10  # per-token cost falls by > 10x


def test_prefill_time_is_superlinear_at_long_prompts():
    t = {n: A100.step(prefill(n)).duration_s for n in (1024, 2048, 4096, 8192)}
    per_token_short = (t[2048] - t[1024]) / 1024
    per_token_long = (t[8192] - t[4096]) / 4096
    assert per_token_long > 1.05 * per_token_short  # the quadratic attention term
    assert t[8192] > 8 * (t[1024] - DEFAULT_STEP_OVERHEAD_S)


def test_chunk_over_a_cached_prefix_costs_more_than_the_same_chunk_alone():
    # Sarathi: later chunks of a prompt attend to everything already in KV.
    first, later = A100.step(make_plan([0], [512])), A100.step(make_plan([7680], [512]))
    assert later.compute_s > first.compute_s and later.memory_s > first.memory_s


def test_lm_head_only_for_sampling_rows():
    chunk = A100.step(make_plan([0], [512], samples=[False]))
    last = A100.step(make_plan([0], [512], samples=[True]))
    assert last.compute_s > chunk.compute_s and last.memory_s > chunk.memory_s


def test_step_matches_a_per_row_reference():
    """The vectorized step equals a slow per-row sum of the same roofline terms."""
    m, hw = get_model("llama-2-13b"), get_hardware("h100-sxm")
    cm = RooflineCostModel(m, hw, tp=2, step_overhead_s=0.001, per_seq_overhead_s=1e-5)
    computed, new = [0, 100, 2047, 33, 5000], [512, 1, 1, 70, 300]
    samples = [False, True, True, True, True]
    c = cm.step(make_plan(computed, new, samples))
    flops_rate = hw.peak_flops("bf16") * hw.efficiency.mfu
    flops = sum(m.linear_flops_per_token() * n + m.attention_flops(k, n) for k, n in zip(computed, new))
    flops += sum(samples) * m.lm_head_flops_per_token()
    assert c.compute_s == pytest.approx(flops / 2 / flops_rate, rel=1e-9)
    kv = sum(k + 2 * n for k, n in zip(computed, new)) * m.kv_bytes_per_token() / 2  # read prefix+new, write new
    weights = (m.matmul_params + m.lm_head_params) * 2 / 2
    # Activations per token and layer: replicated GEMM inputs/outputs (4h) + tp-sharded sides.
    h, inter = m.hidden_size, m.intermediate_size
    act = sum(new) * m.num_layers * (4 * h + (h + 2 * m.kv_dim + 2 * inter + h + inter) / 2) * 2
    assert c.memory_s == pytest.approx((kv + weights + act) / (hw.memory_bandwidth * hw.efficiency.mbu), rel=1e-9)
    assert c.duration_s == pytest.approx(0.001 + 5e-5 + max(c.compute_s, c.memory_s) + c.comm_s)


# -- parallelism -----------------------------------------------------------------------------------

def test_tensor_parallelism_cuts_compute_and_adds_communication():
    tp1, tp2 = cost_model(), cost_model(tp=2)
    a, b = tp1.step(prefill(2048)), tp2.step(prefill(2048))
    assert a.comm_s == 0.0 and b.comm_s > 0.0
    assert b.compute_s == pytest.approx(a.compute_s / 2, rel=1e-9)
    assert b.duration_s < a.duration_s
    assert b.memory_s < a.memory_s


def test_allreduce_cost_follows_the_ring_formula():
    cm = cost_model(tp=4)
    hw, m = get_hardware("a100-80gb"), get_model("llama-2-7b")
    link = hw.interconnect_bandwidth * hw.efficiency.link
    tokens = 1000
    c = cm.step(make_plan([0], [tokens], samples=[False]))
    allreduces = 2 * m.num_layers
    expected = allreduces * (2 * 3 / 4 * tokens * m.hidden_size * 2 / link) + (allreduces + 1) * 10e-6
    assert c.comm_s == pytest.approx(expected, rel=1e-9)


def test_parallel_attention_needs_one_allreduce_per_layer():
    f = cost_model("falcon-180b", "h100-sxm", tp=8)
    c = f.step(make_plan([0], [1000], samples=[False]))
    m, hw = get_model("falcon-180b"), get_hardware("h100-sxm")
    link = hw.interconnect_bandwidth * hw.efficiency.link
    assert c.comm_s == pytest.approx(
        m.num_layers * (2 * 7 / 8 * 1000 * m.hidden_size * 2 / link) + (m.num_layers + 1) * 10e-6, rel=1e-9
    )


def test_pipeline_parallelism_buys_memory_not_latency():
    pp1, pp2 = cost_model("llama-2-13b", "a100-40gb"), cost_model("llama-2-13b", "a100-40gb", pp=2)
    a, b = pp1.step(decode(16, 1024)), pp2.step(decode(16, 1024))
    assert b.comm_s > 0 and b.duration_s >= a.duration_s
    assert b.compute_s == pytest.approx(a.compute_s) and b.memory_s == pytest.approx(a.memory_s)
    assert pp2.kv_capacity_blocks(BS) > 2 * pp1.kv_capacity_blocks(BS)


def test_kv_heads_replicate_when_tp_exceeds_them():
    # Multi-query attention: one KV head, copied to every tp rank (as vLLM does).
    mqa = ModelSpec(name="mqa", num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=1, head_dim=32,
                    intermediate_size=1024, vocab_size=1000, max_position_embeddings=2048)
    cm = RooflineCostModel(mqa, get_hardware("a100-80gb"), tp=2)
    assert cm.kv_bytes_per_token_device == mqa.kv_bytes_per_token()
    gqa = cost_model("llama-2-70b", tp=4)  # 8 KV heads split 4 ways
    assert gqa.kv_bytes_per_token_device == get_model("llama-2-70b").kv_bytes_per_token() // 4


# -- energy ----------------------------------------------------------------------------------------

def test_energy_lies_between_idle_and_tdp():
    hw = get_hardware("a100-80gb")
    for plan in (prefill(2048), decode(32, 1024)):
        c = A100.step(plan)
        assert hw.power_idle_w * c.duration_s < c.energy_j < hw.power_max_w * c.duration_s


def test_energy_counts_every_device_and_busy_steps_draw_more_power():
    one, two = cost_model(), cost_model(tp=2)
    c1, c2 = one.step(prefill(4096)), two.step(prefill(4096))
    idle2 = 2 * get_hardware("a100-80gb").power_idle_w * c2.duration_s
    assert c2.energy_j > idle2
    power_prefill = c1.energy_j / c1.duration_s
    d = one.step(decode(1, 128))
    assert power_prefill > d.energy_j / d.duration_s  # the overhead share is idle time
    assert one.idle_power_w() == 65.0 and two.idle_power_w() == 130.0


def test_pipeline_stages_are_idle_while_others_run():
    pp1, pp4 = cost_model("llama-2-13b", "a100-40gb"), cost_model("llama-2-13b", "a100-40gb", pp=4)
    a, b = pp1.step(prefill(4096)), pp4.step(prefill(4096))
    watts_per_device_1 = a.energy_j / a.duration_s
    watts_per_device_4 = b.energy_j / b.duration_s / 4
    assert watts_per_device_4 < watts_per_device_1


def test_unpublished_power_gives_zero_energy():
    tpu = cost_model("llama-2-7b", "tpu-v5p")
    c = tpu.step(prefill(512))
    assert c.duration_s > 0 and c.energy_j == 0.0 and not tpu.models_energy and tpu.idle_power_w() == 0.0
    assert A100.models_energy


# -- plan operations ---------------------------------------------------------------------------------

def test_empty_plan_costs_nothing():
    assert A100.step(jaxserve.BatchPlan.empty(BS)) == StepCost(0.0, 0.0, 0.0, 0.0, 0.0)


def test_swaps_cost_host_link_time():
    base = A100.step(decode(4, 100))
    swapped = A100.step(make_plan([100] * 4, [1] * 4, swap_out_blocks=((1, 0), (2, 1)), swap_in_blocks=((3, 5),)))
    block_bytes = BS * get_model("llama-2-7b").kv_bytes_per_token()
    assert swapped.comm_s - base.comm_s == pytest.approx(3 * block_bytes / 32e9)


def test_swaps_on_hardware_without_a_host_link_figure_raise_unless_given():
    plan = make_plan([100], [1], swap_in_blocks=((3, 5),))
    with pytest.raises(ValueError, match="host_bandwidth"):
        cost_model("llama-2-7b", "tpu-v5e").step(plan)
    assert cost_model("llama-2-7b", "tpu-v5e", host_bandwidth=16e9).step(plan).comm_s > 0


def test_copy_on_write_blocks_cost_memory_time():
    base = A100.step(decode(2, 100)).memory_s
    assert A100.step(make_plan([100] * 2, [1] * 2, copy_blocks=((0, 9),))).memory_s > base


def test_overheads_are_parameters():
    bare = cost_model(step_overhead_s=0.0)
    c = bare.step(decode(8, 100))
    assert c.duration_s == pytest.approx(max(c.compute_s, c.memory_s))
    per_seq = cost_model(step_overhead_s=0.0, per_seq_overhead_s=1e-4)
    assert per_seq.step(decode(8, 100)).duration_s == pytest.approx(c.duration_s + 8e-4)


def test_mfu_and_mbu_overrides_scale_times():
    fast = cost_model(mfu=0.3, mbu=0.4)
    a, b = A100.step(prefill(1024)), fast.step(prefill(1024))
    assert b.compute_s == pytest.approx(2 * a.compute_s) and b.memory_s == pytest.approx(2 * a.memory_s)


def test_fp8_weights_halve_weight_traffic_on_h100():
    bf16, fp8 = cost_model(hardware="h100-sxm"), cost_model(hardware="h100-sxm", dtype="fp8")
    a, b = bf16.step(decode(1, 0)), fp8.step(decode(1, 0))
    assert b.memory_s == pytest.approx(a.memory_s / 2, rel=0.05)
    assert b.compute_s == pytest.approx(a.compute_s / 2, rel=1e-6)


# -- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tp": 3}, "tp=3 must divide"),
        ({"tp": 0}, "tp must be an int"),
        ({"pp": 100}, "pp=100 exceeds"),
        ({"dtype": "int4"}, "dtype must be one of"),
        ({"dtype": "fp8"}, "no 'fp8' peak"),  # A100 has no FP8 tensor cores
        ({"mfu": 1.5}, "mfu"),
        ({"mbu": 0.0}, "mbu"),
        ({"step_overhead_s": -1.0}, "step_overhead_s"),
        ({"step_overhead_s": math.nan}, "step_overhead_s"),
    ],
)
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cost_model(**kwargs)


def test_cpu_cannot_be_tensor_parallel_and_has_no_bf16():
    with pytest.raises(ValueError, match="no interconnect"):
        cost_model(hardware="cpu", dtype="fp32", tp=2)
    with pytest.raises(ValueError, match="bf16"):
        cost_model(hardware="cpu")
    assert cost_model(hardware="cpu", dtype="fp32").step(decode(1, 10)).duration_s > 0


# -- KV capacity and price ----------------------------------------------------------------------------

def test_kv_capacity_llama2_7b_on_a100_80gb():
    # (80 GiB x 0.9 - 13.5 GB weights - ~0.7 GB activations) / 8 MiB per 16-token block.
    blocks = A100.kv_capacity_blocks(16)
    assert 6_500 <= blocks <= 8_000
    expected = (80 * 1024**3 * 0.9 - 2 * get_model("llama-2-7b").num_params - A100.activation_reserve_bytes()) // (
        16 * 512 * 1024
    )
    assert blocks == expected
    assert A100.kv_capacity_blocks(32) == pytest.approx(blocks / 2, abs=1)
    assert A100.kv_capacity_blocks(16, gpu_memory_utilization=0.5) < blocks
    assert A100.kv_capacity_blocks(16, activation_reserve_bytes=0) > blocks


def test_kv_capacity_grows_faster_than_tp():
    tp1, tp2 = cost_model("llama-2-13b"), cost_model("llama-2-13b", tp=2)
    assert tp2.kv_capacity_blocks(16) > 2 * tp1.kv_capacity_blocks(16)


def test_weights_that_do_not_fit_raise():
    with pytest.raises(ValueError, match=r"llama-2-70b.*does not fit.*l4"):
        cost_model("llama-2-70b", "l4").kv_capacity_blocks(16)
    with pytest.raises(ValueError, match="does not fit"):
        cost_model("llama-2-70b", "a100-80gb").kv_capacity_blocks(16)
    assert cost_model("llama-2-70b", "a100-80gb", tp=4).kv_capacity_blocks(16) > 10_000
    with pytest.raises(ValueError, match="block_size"):
        A100.kv_capacity_blocks(0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        A100.kv_capacity_blocks(16, gpu_memory_utilization=1.5)


def test_price_scales_with_devices():
    hw = get_hardware("h100-sxm")
    assert cost_model(hardware="h100-sxm").cost_usd_per_hour() == hw.price_per_hour_usd
    assert cost_model(hardware="h100-sxm", tp=4, pp=2).cost_usd_per_hour() == pytest.approx(8 * hw.price_per_hour_usd)
