"""A LoongServe node from a config (``cluster.esp.enabled``): ``build_loongserve_sim`` reads the keys,
``run_loongserve_sim`` serves the workload on the node and summarizes it like any run.

The model / hardware / kv keys describe ONE instance (``hardware.tp`` GPUs; its KV pool is what
``build_kv`` sizes for it, counted in tokens); ``cluster.esp.num_instances`` of them form the node.
Bad values are a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from jaxserve.cluster.config import is_cluster
from jaxserve.cluster.esp_node import EspNode, EspSettings
from jaxserve.config import ConfigError, Results, build_workload, get, slo_targets
from jaxserve.kv.config import KVConfig
from jaxserve.metrics import request_metrics, summarize
from jaxserve.request import Request
from jaxserve.runtime import ProgressHook
from jaxserve.sim.esp_cost_model import EspCostModel
from jaxserve.sim.simulate import build_cost_model, build_kv, max_context, max_sim_time_s

ENERGY_UNMODELLED = "the ESP cost model does not model power (ring and multi-master steps have no power profile)"


@dataclasses.dataclass(frozen=True)
class LoongServeSim:
    """Everything a LoongServe run needs, built from a config."""

    cost_model: EspCostModel
    kv: KVConfig  # one instance's pool
    settings: EspSettings
    requests: tuple[Request, ...]
    slo: dict


def is_loongserve(config) -> bool:
    return get(config, "cluster.esp.enabled", bool)


def _positive_int(config, key: str) -> int:
    value = get(config, key, int)
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")
    return value


def build_loongserve_sim(config, requests=None) -> LoongServeSim:
    """Reads ``config``; ``requests``, when given, are served instead of its workload."""
    num_instances = _positive_int(config, "cluster.esp.num_instances")
    max_prefill = _positive_int(config, "cluster.esp.max_prefill_requests")
    if get(config, "sim.cost_model", str) != "roofline":
        raise ConfigError("cluster.esp.enabled: the ESP cost model builds on sim.cost_model='roofline'")
    if get(config, "hardware.pp", int) != 1:
        raise ConfigError("cluster.esp.enabled: an instance is tensor-parallel only; set hardware.pp=1")
    if is_cluster(config):
        raise ConfigError("cluster.esp.enabled: the node replaces the cluster; leave the other cluster.* keys at their defaults")
    base = build_cost_model(config)
    try:
        cost = EspCostModel(base, num_instances)
    except ValueError as e:
        raise ConfigError(f"cluster.esp.num_instances: {e}") from None
    kv = build_kv(config, base)
    settings = EspSettings(capacity_tokens=kv.capacity_tokens, max_prefill_requests=max_prefill,
                           max_context=max_context(config, base), max_sim_time_s=max_sim_time_s(config))  # fmt: skip
    served = tuple(build_workload(config) if requests is None else requests)
    return LoongServeSim(cost, kv, settings, served, slo_targets(config))


def run_loongserve_sim(run: LoongServeSim, on_progress: Optional[ProgressHook] = None) -> Results:
    """Serves ``run.requests`` on the node: metrics (with ``loongserve``: what the scaling plan did),
    per-request rows and the log."""
    node = EspNode(run.cost_model, run.settings)
    log = node.run(run.requests, on_progress).freeze()
    unmodelled = {"energy_j": ENERGY_UNMODELLED, "energy_j_per_token": ENERGY_UNMODELLED}
    metrics = summarize(log, **run.slo, price_per_hour_usd=run.cost_model.cost_usd_per_hour(), unmodelled=unmodelled)
    metrics["num_kv_blocks"] = run.kv.num_blocks * run.cost_model.num_instances
    metrics["num_instances"] = run.cost_model.num_instances
    stats = dataclasses.asdict(node.stats)
    stats.pop("peak_used")  # kept only when the node checks itself
    metrics["loongserve"] = stats
    return Results(metrics, request_metrics(log).rows(), log, run.kv, run.settings)
