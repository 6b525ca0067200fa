"""configs/loongserve.py and the loongserve.* keys: the node builds from a config, runs a workload
to the end, and bad values stop with a ConfigError naming the key."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from jaxserve.cluster.esp_config import build_loongserve_sim, is_loongserve, run_loongserve_sim
from jaxserve.config import ConfigError, override

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(f"jaxserve_esp_test_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def small(**values):
    # configs/loongserve.py with a synthetic workload (no ../shared/traces needed)
    base = {"workload.kind": "poisson", "workload.qps": 4.0, "workload.num_requests": 40, "workload.duration_s": None,
            "workload.lengths.kind": "uniform", "workload.lengths.low": 16, "workload.lengths.high": 6000}  # fmt: skip
    return override(load("loongserve"), {**base, **values})


def test_the_config_runs_a_node_of_eight_instances():
    config = small()
    assert is_loongserve(config) and not is_loongserve(load("default"))
    run = build_loongserve_sim(config)
    assert run.cost_model.num_instances == 8 and run.cost_model.machine == "a100-80gb"
    assert run.settings.max_context == 1 << 20 and run.settings.capacity_tokens == run.kv.capacity_tokens > 100000
    m = run_loongserve_sim(run).metrics
    assert m["num_finished"] == 40 and m["num_instances"] == 8 and m["loongserve"]["prefill_batches"] > 0
    assert m["energy_j"] is None and "power" in m["unavailable"]["energy_j"]
    assert m["cost_usd_per_mtok"] > 0


@pytest.mark.parametrize("key, value, message", [
    ("cluster.esp.num_instances", 0, "cluster.esp.num_instances must be >= 1"),
    ("cluster.esp.max_prefill_requests", 0, "cluster.esp.max_prefill_requests must be >= 1"),
    ("hardware.pp", 2, "hardware.pp=1"),
    ("cluster.num_replicas", 2, "cluster.*"),
    ("sim.cost_model", "profiled", "sim.cost_model='roofline'"),
])  # fmt: skip
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        build_loongserve_sim(small(**{key: value}))
    assert message in str(err.value)
