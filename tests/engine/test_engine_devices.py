"""Which devices a config's engine runs on: ``parallel.first_device``, the ESP keys
(``parallel.esp*``), and engine-cluster replicas laid out one after another (8 host devices)."""

from __future__ import annotations

import jax
import pytest

from config_defaults import default_config
from jaxserve.config import ConfigError, override
from jaxserve.engine.esp_policy import EspPolicy
from jaxserve.engine.esp_runner import EspRunner
from jaxserve.engine.serve_config import build_runner, engine_settings


def engine_config(model_dir, **values):
    return override(default_config(), {"backend": "engine", "model.path": model_dir, "kv.num_blocks": 16,
                                       "kv.block_size": 4, "engine.compile_cache": "", **values})  # fmt: skip


def cache_devices(runner) -> set:
    return set(runner.caches[0][0].devices())


def test_first_device_puts_the_runner_on_its_own_devices(llama):
    runner, _ = build_runner(engine_settings(engine_config(llama[0], **{"parallel.tp": 2, "parallel.first_device": 4})), 4)
    assert list(runner.mesh.devices.flat) == jax.devices()[4:6]
    assert cache_devices(runner) == set(jax.devices()[4:6])
    one, _ = build_runner(engine_settings(engine_config(llama[0], **{"parallel.first_device": 3})), 4)
    assert cache_devices(one) == {jax.devices()[3]}


@pytest.mark.parametrize("values, message", [
    ({"parallel.first_device": 7, "parallel.tp": 2}, "parallel.first_device must be in [0, 6] so that its tp x sp = 2 devices exist"),
    ({"parallel.first_device": -1}, "parallel.first_device must be in [0, 7]"),
    ({"parallel.esp": True, "parallel.sp": 2, "parallel.tp": 2}, "parallel.esp runs on parallel.sp devices with parallel.tp=1"),
    ({"parallel.esp": True, "parallel.sp": 2, "parallel.esp_prefill_tokens_per_device": 0}, "parallel.esp_*: prefill_tokens_per_device must be an int >= 1"),
    ({"parallel.esp": True, "parallel.sp": 2, "parallel.esp_decode_pages_per_device": -2}, "parallel.esp_*: decode_pages_per_device must be None or an int >= 1"),
])  # fmt: skip
def test_bad_device_and_esp_keys_are_config_errors_naming_the_key(llama, values, message):
    with pytest.raises(ConfigError) as e:
        engine_settings(engine_config(llama[0], **values))
    assert str(e.value).startswith(message), str(e.value)


def test_esp_keys_build_an_esp_runner_with_a_pool_per_device(llama):
    config = engine_config(llama[0], **{"parallel.esp": True, "parallel.sp": 4, "parallel.first_device": 4,
                                        "parallel.esp_prefill_tokens_per_device": 8,
                                        "parallel.esp_decode_pages_per_device": 2})  # fmt: skip
    settings = engine_settings(config)
    assert settings.esp_policy == EspPolicy(8, 2)
    runner, kv = build_runner(settings, 4)
    assert isinstance(runner, EspRunner) and runner.num_devices == 4 and runner.pages_per_device == kv.num_blocks // 4
    assert list(runner.mesh.devices.flat) == jax.devices()[4:8]
    off = engine_settings(engine_config(llama[0], **{"parallel.sp": 4}))
    assert off.esp_policy is None and not isinstance(build_runner(off, 4)[0], EspRunner)


def test_engine_cluster_replicas_get_devices_of_their_own(llama):
    from jaxserve.cluster.config import build_cluster_sim, lay_out_devices, replica_configs
    from jaxserve.config import get

    config = engine_config(llama[0], **{"cluster.num_replicas": 3, "cluster.replicas": "1:parallel.tp=4",
                                        "workload.kind": "poisson", "workload.qps": 5.0, "workload.num_requests": 2,
                                        "workload.lengths.kind": "fixed"})  # fmt: skip
    starts = [get(c, "parallel.first_device", int) for c in lay_out_devices(replica_configs(config))]
    assert starts == [0, 1, 5]  # replica 1 takes devices 1-4
    wrapped = override(config, {"cluster.num_replicas": 4, "cluster.replicas": "1:parallel.tp=4;2:parallel.tp=4"})
    assert [get(c, "parallel.first_device", int) for c in lay_out_devices(replica_configs(wrapped))] == [0, 1, 0, 4]
    run = build_cluster_sim(override(config, {"cluster.replicas": ""}))
    assert [cache_devices(s.executor) for s in run.specs] == [{d} for d in jax.devices()[:3]]
