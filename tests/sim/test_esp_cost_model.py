"""The ESP cost model: one instance is the roofline, long prefills speed up sublinearly with k,
and hand-computed ring and multi-master cases."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.plan import BatchPlan
from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.esp_cost_model import EspCostModel
from jaxserve.sim.hardware import get_hardware
from jaxserve.sim.models import get_model


@pytest.fixture(scope="module")
def base():
    return RooflineCostModel(get_model("llama-2-7b"), get_hardware("a100-80gb"))


@pytest.fixture(scope="module")
def esp(base):
    return EspCostModel(base, 8)


def prefill_batch(lens, block=16):
    tables, start = [], 0
    for n in lens:
        blocks = -(-n // block)
        tables.append(tuple(range(start, start + blocks)))
        start += blocks
    return BatchPlan(request_ids=tuple(f"r{i}" for i in range(len(lens))), num_computed_tokens=np.zeros(len(lens), np.int64),
                     num_new_tokens=np.array(lens, np.int64), samples_token=np.ones(len(lens), bool),
                     block_tables=tuple(tables), token_ids=np.zeros(sum(lens), np.int32), block_size=block)  # fmt: skip


@pytest.mark.parametrize("lens", [[1], [7], [512], [30000], [100, 2000, 15000]])
def test_one_instance_prefill_is_the_roofline(base, esp, lens):
    assert esp.prefill(lens, 1) == pytest.approx(base.step(prefill_batch(lens)).duration_s, rel=1e-9)


@pytest.mark.parametrize("rows, context", [(1, 100), (16, 40000), (64, 500000)])
def test_one_instance_decode_is_the_roofline(base, esp, rows, context):
    expected = base.decode_run(rows, context, context, 1)[0][0]
    assert esp.decode_time_s([rows], [context], [0]) == pytest.approx(expected, rel=1e-9)


def test_tensor_parallel_instances_read_the_same_roofline():
    base = RooflineCostModel(get_model("llama-2-13b"), get_hardware("h100-sxm"), tp=2)
    esp = EspCostModel(base, 4)
    assert esp.prefill([4096, 333], 1) == pytest.approx(base.step(prefill_batch([4096, 333])).duration_s, rel=1e-9)
    assert esp.terms.comm_per_token > 0 and esp.terms.comm_fixed > 0


def test_long_prefill_falls_with_k_but_sublinearly(esp):
    for n in (20000, 100000):
        times = [esp.prefill([n], k) for k in range(1, 9)]
        assert all(a > b for a, b in zip(times, times[1:]))
        assert all(times[0] / times[k - 1] < k for k in range(2, 9))  # weights, overheads, ring hops


def test_ring_hops_are_exposed_for_short_prompts_and_hidden_for_long(esp):
    t = esp.terms
    short, long_ = 2000, 200000
    for n, exposed in ((short, True), (long_, False)):
        share = n / 8
        attn_block = t.compute_per_pair * n * (n + 1) / 2 / 8 / 8
        assert (esp.hop_s_per_token * share > attn_block) == exposed


def test_hand_computed_ring_prefill(esp):
    # One prompt of n = 8000 tokens over k = 2 instances, from the roofline's terms:
    t, n, k = esp.terms, 8000, 2
    pairs = n * (n + 1) / 2  # 32,004,000
    attn = t.compute_per_pair * pairs / k  # this instance's share of the pairs
    hop = esp.hop_s_per_token * n / k  # its 4000-token KV block once over NVLink
    ring = max(attn / 2, hop) + attn / 2  # one hop, under the first block's attention
    compute = t.compute_per_token * 4000 + t.compute_per_sample * 0.5 + ring
    memory = t.memory_weights + t.memory_lm_head + t.memory_per_kv_token * (8000 + 4000) + t.memory_per_token * 4000
    latency = esp.num_layers * 1 * esp.latency_s  # one hop per layer
    assert esp.prefill([n], k) == pytest.approx(t.step_overhead + max(memory, compute) + latency, rel=1e-12)
    # the link: 524,288 KV bytes per Llama-2-7B token (2·32 layers·4096·2 B) at 300 GB/s · 0.7 (A100 NVLink3)
    assert esp.hop_s_per_token == pytest.approx(524288 / (300e9 * 0.7))


def test_hand_computed_multi_master_decode(esp):
    # 8 requests of 50k tokens each: on one instance, or split over two with 4 masters each and
    # every request's KV half on the other instance (8 remote shards each side).
    t = esp.terms
    one = esp.decode_time_s([8], [400000], [0])
    two = esp.decode_time_s([4, 4], [200000, 200000], [8, 8])
    per = max(t.memory_weights + t.memory_lm_head + t.memory_per_kv_token * (200000 + 8) + t.memory_per_token * 4,
              (t.compute_per_token + t.compute_per_sample) * 4 + t.compute_per_pair * 200004)
    exchange = 8 * esp.exchange_s + 2 * esp.num_layers * esp.latency_s
    assert two == pytest.approx(t.step_overhead + per + exchange, rel=1e-12)
    assert two < one  # the KV read halves; the exchange is small
    # the exchange: per layer, a 4096-wide bf16 query out and partial back, plus 32 float32 lse
    assert esp.exchange_s == pytest.approx(32 * (2 * 4096 * 2 + 4 * 32) / (300e9 * 0.7))


def test_slowest_instance_sets_the_step(esp):
    balanced = esp.decode_time_s([2, 2], [10000, 10000], [0, 0])
    skewed = esp.decode_time_s([2, 2], [19000, 1000], [0, 0])
    assert skewed > balanced


def test_bad_arguments(base, esp):
    with pytest.raises(ValueError, match="num_instances"):
        EspCostModel(base, 0)
    with pytest.raises(ValueError, match="k must be"):
        esp.prefill([10], 9)
    with pytest.raises(ValueError, match="equal-length"):
        esp.decode_time_s([1, 2], [3], [0, 0])
    with pytest.raises(ValueError, match="prompt_lens"):
        esp.prefill([], 1)
