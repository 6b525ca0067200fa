"""``simulate(config) -> Results``: build model, hardware, KV, scheduler and workload from a config
and run the discrete-event simulation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

from jaxserve.calibration.profile_format import load_profile
from jaxserve.config import ConfigError, Results, _get, build_scheduler, build_workload
from jaxserve.kv.config import KVConfig
from jaxserve.metrics import request_metrics, summarize
from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.hardware import get_hardware
from jaxserve.sim.models import get_model
from jaxserve.sim.profiled_cost_model import ProfiledCostModel
from jaxserve.runtime import RunLimits, run_replica
from jaxserve.sim.executor import SimExecutor


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


def max_context(config, cost_model: RooflineCostModel) -> Optional[int]:
    value = int(_get(config, "model.max_context", 0) or 0)
    return value if value > 0 else cost_model.model.max_position_embeddings


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
