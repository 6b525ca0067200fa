"""``simulate(config) -> Results``: build model, hardware, KV, scheduler and workload from a config
and run the discrete-event simulation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Optional

import jaxserve.scheduler as scheduler_registry
from jaxserve.events import FrozenLog
from jaxserve.kv.config import KVConfig
from jaxserve.metrics import request_metrics, summarize
from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.hardware import get_hardware
from jaxserve.sim.models import get_model
from jaxserve.sim.profiled_cost_model import ProfiledCostModel
from jaxserve.sim.simulator import RunLimits, SimExecutor, run_replica
from jaxserve.workload import workload_from_config


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Results:
    metrics: dict  # the metrics.json content
    requests: list[dict]  # one row per request (the per-request CSV)
    log: FrozenLog
    kv: KVConfig
    scheduler: Any


def _get(cfg, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if node is None or not hasattr(node, part) and not (isinstance(node, dict) and part in node):
            return default
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _as_dict(node) -> dict:
    if node is None:
        return {}
    if hasattr(node, "to_dict"):
        return node.to_dict()
    return dict(node)


def _hardware(config):
    try:
        return get_hardware(_get(config, "hardware.name"))
    except ValueError as e:
        raise ConfigError(f"hardware.name: {e}") from None


def build_cost_model(config) -> RooflineCostModel | ProfiledCostModel:
    kind = _get(config, "sim.cost_model") or "roofline"
    if kind == "profiled":
        return build_profiled_cost_model(config)
    if kind != "roofline":
        raise ConfigError(f"sim.cost_model must be 'roofline' or 'profiled', got {kind!r}")
    try:
        model = get_model(_get(config, "model.name"))
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    hardware = _hardware(config)
    options = {}
    for key in ("tp", "pp", "mfu", "mbu", "step_overhead_s"):
        value = _get(config, f"hardware.{key}")
        if value is not None:  # unset keys keep the cost model's cited defaults
            options[key] = value
    dtype = _get(config, "model.dtype", "bf16")
    try:
        return RooflineCostModel(model, hardware, dtype=dtype, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"hardware/model: {e}") from None


def build_profiled_cost_model(config) -> ProfiledCostModel:
    """``sim.cost_model="profiled"``: step times fitted to ``sim.profile``; the model is the
    profile's (``model.name`` is not used), ``hardware.name`` gives memory, power and price, and
    ``hardware.mfu``/``mbu``/``step_overhead_s`` do not apply (the profile measured the step)."""
    path = _get(config, "sim.profile")
    if not path:
        raise ConfigError("sim.profile: sim.cost_model='profiled' needs a profile file (python -m jaxserve.profile)")
    for key in ("tp", "pp"):
        if (_get(config, f"hardware.{key}") or 1) != 1:
            raise ConfigError(f"hardware.{key}: a profile measures one device; profiled cost models need {key}=1")
    hardware = _hardware(config)
    from jaxserve.profile import load_profile  # here: `python -m jaxserve.profile` imports jaxserve.sim

    try:
        profile = load_profile(str(path))
    except OSError as e:
        raise ConfigError(f"sim.profile: cannot read {path!r} ({e.strerror or e})") from None
    except ValueError as e:
        raise ConfigError(f"sim.profile: {e}") from None
    jitter = _get(config, "sim.profile_jitter", False)
    if not isinstance(jitter, bool):
        raise ConfigError(f"sim.profile_jitter must be True or False, got {jitter!r}")
    try:
        return ProfiledCostModel.from_profile(profile, hardware, jitter=jitter, jitter_seed=int(_get(config, "seed", 0) or 0))
    except ValueError as e:
        raise ConfigError(f"sim.profile/hardware.name: {e}") from None


def build_kv(config, cost_model: RooflineCostModel) -> KVConfig:
    block_size = int(_get(config, "kv.block_size", 16))
    num_blocks = int(_get(config, "kv.num_blocks", 0) or 0)
    if num_blocks <= 0:
        fraction = float(_get(config, "kv.memory_fraction", 0.9))
        try:
            num_blocks = cost_model.kv_capacity_blocks(block_size, gpu_memory_utilization=fraction)
        except ValueError as e:
            raise ConfigError(f"kv: {e}") from None
    try:
        return KVConfig(num_blocks, block_size, int(_get(config, "kv.num_host_blocks", 0) or 0))
    except ValueError as e:
        raise ConfigError(f"kv: {e}") from None


def build_scheduler(config):
    options = _as_dict(_get(config, "scheduler"))
    name = options.pop("name", None)
    try:
        return scheduler_registry.make(name, **options)
    except ValueError as e:
        raise ConfigError(f"scheduler: {e}") from None


def max_context(config, cost_model: RooflineCostModel) -> Optional[int]:
    value = int(_get(config, "model.max_context", 0) or 0)
    return value if value > 0 else cost_model.model.max_position_embeddings


def build_workload(config) -> list:
    """The config's requests (length-only unless the trace carries token ids)."""
    try:
        return workload_from_config(_get(config, "workload"))
    except FileNotFoundError as e:
        raise ConfigError(str(e) if "trace_path" in str(e) else f"workload.trace_path: {e}") from None
    except ValueError as e:
        raise ConfigError(f"workload: {e}") from None


def simulate(config, on_progress: Optional[Callable[[float, int], None]] = None) -> Results:
    """Runs the experiment ``config`` (an ml_collections.ConfigDict, see configs/default.py) in the
    simulator and returns metrics, per-request rows and the event log."""
    cost_model = build_cost_model(config)
    kv = build_kv(config, cost_model)
    sched = build_scheduler(config)
    requests = build_workload(config)
    limits = RunLimits(
        max_context=max_context(config, cost_model),
        max_sim_time_s=float(_get(config, "sim.max_time_s") or math.inf),
    )
    log = run_replica(sched, kv, SimExecutor(cost_model), requests, limits=limits, on_progress=on_progress).freeze()
    metrics = summarize(
        log,
        slo_ttft_s=_get(config, "slo.ttft_s") or None,
        slo_tpot_s=_get(config, "slo.tpot_s") or None,
        price_per_hour_usd=cost_model.cost_usd_per_hour(),
    )
    metrics["num_kv_blocks"] = kv.num_blocks
    return Results(metrics, request_metrics(log).rows(), log, kv, sched)
