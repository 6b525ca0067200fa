"""NanoFlow's cost-model options from a config: ``sim.async_scheduling`` and ``sim.nano_batches`` /
``sim.nano_*_share`` reach the simulator (and its cluster), the defaults stay the plain roofline."""

from __future__ import annotations

import pytest

from config_defaults import default_config as defaults
from jaxserve.config import ConfigError, override
from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.overlap_cost_model import NanoSchedule, OverlapCostModel
from jaxserve.sim.simulate import build_cost_model, build_sim, run_sim

SEVENTY_B = {"model.name": "llama-2-70b", "hardware.name": "a100-80gb", "hardware.tp": 8}


def offline(**values):
    """A saturated server: 64 requests at once, 512 prompt / 64 output tokens."""
    return override(defaults(), {**SEVENTY_B, "workload.kind": "poisson", "workload.qps": 1e6, "workload.num_requests": 64,
                                 "workload.lengths.kind": "fixed", "workload.lengths.prompt_len": 512,
                                 "workload.lengths.output_len": 64, "scheduler.name": "sarathi",
                                 "scheduler.chunk_size": 2048, **values})  # fmt: skip


def test_the_defaults_are_the_synchronous_unsplit_roofline():
    cm = build_cost_model(override(defaults(), SEVENTY_B))
    assert type(cm) is RooflineCostModel and cm.async_scheduling is False


def test_the_keys_build_the_cost_model_the_experiment_builds_by_hand():
    rf = build_cost_model(override(defaults(), SEVENTY_B))
    schedule = NanoSchedule(4, 0.2, 0.1)
    cm = build_cost_model(override(defaults(), {**SEVENTY_B, "sim.nano_batches": 4, "sim.nano_memory_share": 0.2,
                                                "sim.async_scheduling": True}))  # fmt: skip
    assert isinstance(cm, OverlapCostModel) and cm.schedule == schedule and cm.async_scheduling is True
    assert repr(cm) == repr(OverlapCostModel.like(rf, schedule, async_scheduling=True))


def test_overlap_and_async_each_shorten_a_saturated_run():
    def makespan(**values):
        results = run_sim(build_sim(offline(**values)))
        assert results.metrics["num_finished"] == 64
        return results.metrics["makespan_s"]

    plain, hidden = makespan(), makespan(**{"sim.async_scheduling": True})
    nano = makespan(**{"sim.nano_batches": 4})
    both = makespan(**{"sim.nano_batches": 4, "sim.async_scheduling": True})
    assert hidden < plain and nano < plain and both < min(hidden, nano)


@pytest.mark.parametrize("values, message", [
    ({"sim.nano_batches": 0}, "sim.nano_batches/sim.nano_memory_share/sim.nano_network_share: NanoSchedule.num_nano must be an int >= 1"),
    ({"sim.nano_batches": 4, "sim.nano_memory_share": 0.95}, "sim.nano_batches/sim.nano_memory_share/sim.nano_network_share: NanoSchedule: memory_share + network_share"),
    ({"sim.nano_batches": 4, "sim.nano_network_share": 0.0}, "hardware/model: tp=8 has collectives to overlap"),
    ({"sim.cost_model": "profiled", "sim.async_scheduling": True}, "sim.async_scheduling / sim.nano_batches: the profiled cost model"),
])  # fmt: skip
def test_bad_values_are_one_error_naming_the_keys(values, message):
    with pytest.raises(ConfigError) as e:
        build_cost_model(override(defaults(), {**SEVENTY_B, **values}))
    assert str(e.value).startswith(message), str(e.value)
