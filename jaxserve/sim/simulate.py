"""``simulate(config) -> Results``: build model, hardware, KV, scheduler and workload from a config
and run the discrete-event simulation.

``build_sim(config)`` reads the config and builds everything (a ``SimRun``); ``run_sim`` runs it.
Experiments that serve something one workload config cannot say (several clients' streams, each
built from a config, merged) pass those requests to ``build_sim``. Every key is read with ``jaxserve.config.get``, so a
key missing from the config raises ``ConfigError``; none has a default here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional

from jaxserve.calibration.profile_format import load_profile
from jaxserve.config import ConfigError, Results, build_scheduler, build_workload, get, positive_or_none, slo_targets
from jaxserve.kv.config import KVConfig
from jaxserve.metrics import request_metrics, summarize
from jaxserve.request import Request
from jaxserve.runtime import ProgressHook, RunLimits, run_replica
from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.executor import SimExecutor
from jaxserve.sim.fast_loop import run_fast, why_not_fast
from jaxserve.sim.hardware import get_hardware
from jaxserve.sim.models import get_model
from jaxserve.sim.overlap_cost_model import NanoSchedule, OverlapCostModel
from jaxserve.sim.power import ClockError
from jaxserve.sim.profiled_cost_model import ProfiledCostModel

COST_MODELS = ("roofline", "profiled")
_EFFICIENCIES = ("mfu", "mbu", "step_overhead_s")  # roofline-only hardware keys; unset: the cited values
_CLOCK_KEYS = ("frequency_mhz", "power_cap_w")  # roofline-only too; unset: the top clock, no cap


def _hardware(config):
    try:
        return get_hardware(get(config, "hardware.name", str))
    except ValueError as e:
        raise ConfigError(f"hardware.name: {e}") from None


def build_cost_model(config) -> RooflineCostModel | ProfiledCostModel:
    kind = get(config, "sim.cost_model", str)
    if kind not in COST_MODELS:
        raise ConfigError(f"sim.cost_model must be one of {COST_MODELS}, got {kind!r}")
    asynchronous = get(config, "sim.async_scheduling", bool)
    schedule = _nano_schedule(config)
    if kind == "profiled":
        if asynchronous or schedule.num_nano > 1:
            raise ConfigError("sim.async_scheduling / sim.nano_batches: the profiled cost model measures whole steps "
                              "as the engine ran them; these apply to sim.cost_model='roofline' only")  # fmt: skip
        return build_profiled_cost_model(config)
    try:
        model = get_model(get(config, "model.name", str))
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    hardware = _hardware(config)
    options = {key: get(config, f"hardware.{key}", int) for key in ("tp", "pp")}
    for key in _EFFICIENCIES:
        value = get(config, f"hardware.{key}", float, optional=True)
        if value is not None:  # unset keeps the cost model's cited value
            options[key] = value
    for key in _CLOCK_KEYS:  # unset: the top clock, no cap
        options[key] = get(config, f"hardware.{key}", int if key == "frequency_mhz" else float, optional=True)
    options["async_scheduling"] = asynchronous
    if schedule.num_nano > 1:  # NanoFlow: the overlap-aware model (pp 1, no power cap: it says so)
        cls, options["schedule"] = OverlapCostModel, schedule
    else:
        cls = RooflineCostModel
    try:
        return cls(model, hardware, dtype=get(config, "model.dtype", str), **options)
    except ClockError as e:
        raise ConfigError(f"hardware.{e.argument}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"hardware/model: {e}") from None


def _nano_schedule(config) -> NanoSchedule:
    """``sim.nano_batches`` / ``sim.nano_*_share`` -> a NanoSchedule (1 nano-batch: unsplit)."""
    keys = ("sim.nano_batches", "sim.nano_memory_share", "sim.nano_network_share")
    values = (get(config, keys[0], int), get(config, keys[1], float), get(config, keys[2], float))
    try:
        return NanoSchedule(*values) if values[0] > 1 else NanoSchedule(values[0])
    except ValueError as e:
        raise ConfigError(f"{'/'.join(keys)}: {e}") from None


def build_profiled_cost_model(config) -> ProfiledCostModel:
    """``sim.cost_model="profiled"``: step times fitted to ``sim.profile``; the model and the machine
    are the profile's (``model.name`` and ``hardware.name`` are not used): memory, power and price come
    from the profiled machine's entry in jaxserve.sim.hardware, or are unknown when it has none.
    ``hardware.mfu``/``mbu``/``step_overhead_s``/``frequency_mhz``/``power_cap_w`` do not apply (the
    profile measured the step at its clock), so setting one is an error."""
    path = get(config, "sim.profile", str, optional=True)
    if not path:
        raise ConfigError("sim.profile: sim.cost_model='profiled' needs a profile file (python -m jaxserve.profile)")
    for key in ("tp", "pp"):
        if get(config, f"hardware.{key}", int) != 1:
            raise ConfigError(f"hardware.{key}: a profile measures one device; profiled cost models need {key}=1")
    for key in (*_EFFICIENCIES, *_CLOCK_KEYS):
        if get(config, f"hardware.{key}", optional=True) is not None:
            raise ConfigError(f"hardware.{key}: does not apply to sim.cost_model='profiled' (the profile measured the step)")
    jitter = get(config, "sim.profile_jitter", bool)
    seed = get(config, "seed", int)
    try:
        profile = load_profile(str(path))
    except OSError as e:
        raise ConfigError(f"sim.profile: cannot read {path!r} ({e.strerror or e})") from None
    except ValueError as e:
        raise ConfigError(f"sim.profile: {e}") from None
    try:
        return ProfiledCostModel.from_profile(profile, jitter=jitter, jitter_seed=seed)
    except ValueError as e:
        raise ConfigError(f"sim.profile: {e}") from None


def build_kv(config, cost_model: RooflineCostModel | ProfiledCostModel) -> KVConfig:
    block_size = get(config, "kv.block_size", int)
    num_blocks = get(config, "kv.num_blocks", int)
    fraction = get(config, "kv.memory_fraction", float)
    num_host_blocks = get(config, "kv.num_host_blocks", int)
    if num_blocks <= 0:  # 0: size the pool from memory, as vLLM does
        try:
            num_blocks = cost_model.kv_capacity_blocks(block_size, gpu_memory_utilization=fraction)
        except ValueError as e:
            raise ConfigError(f"kv: {e}") from None
    try:
        return KVConfig(num_blocks, block_size, num_host_blocks)
    except ValueError as e:
        raise ConfigError(f"kv: {e}") from None


def max_context(config, cost_model: RooflineCostModel | ProfiledCostModel) -> int:
    """``model.max_context``; 0 means the model's ``max_position_embeddings``."""
    value = get(config, "model.max_context", int)
    if value < 0:
        raise ConfigError(f"model.max_context must be >= 0 (0: the model's), got {value}")
    return value if value > 0 else cost_model.model.max_position_embeddings


def max_sim_time_s(config) -> float:
    """``sim.max_time_s``; unset means no limit."""
    value = positive_or_none(config, "sim.max_time_s")
    return math.inf if value is None else value


@dataclasses.dataclass(frozen=True)
class SimRun:
    """Everything a simulation needs, built from a config by ``build_sim``."""

    cost_model: RooflineCostModel | ProfiledCostModel
    kv: KVConfig
    scheduler: object
    requests: tuple[Request, ...]
    limits: RunLimits
    slo: dict  # summarize's slo_ttft_s / slo_tpot_s
    fast_loop: bool = True  # sim.fast_loop: run_fast when why_not_fast allows it

    @property
    def why_not_fast(self) -> Optional[str]:
        """Why ``run_sim`` uses the general loop (None: the fast loop runs it)."""
        if not self.fast_loop:
            return "sim.fast_loop is off"
        return why_not_fast(self.scheduler, self.kv, self.cost_model, self.limits, self.requests)


def build_sim(config, requests: Optional[Sequence[Request]] = None) -> SimRun:
    """Reads ``config`` (an ml_collections.ConfigDict, see configs/default.py) and builds the run;
    ``requests``, when given, are served instead of the config's workload (which is then not read):
    e.g. several clients' streams, each built from a config, merged."""
    cost_model = build_cost_model(config)
    return SimRun(
        cost_model=cost_model,
        kv=build_kv(config, cost_model),
        scheduler=build_scheduler(config),
        requests=tuple(build_workload(config) if requests is None else requests),
        limits=RunLimits(max_context=max_context(config, cost_model), max_sim_time_s=max_sim_time_s(config)),
        slo=slo_targets(config),
        fast_loop=get(config, "sim.fast_loop", bool),
    )


def unmodelled_metrics(cost_model: RooflineCostModel | ProfiledCostModel) -> dict[str, str]:
    """``summarize``'s ``unmodelled``: energy and cost keys the cost model cannot give, with why."""
    out = {}
    if not cost_model.models_energy:
        why = (f"the profiled machine {cost_model.machine!r} is not in jaxserve.sim.hardware"
               if cost_model.hardware is None else f"hardware {cost_model.machine!r} has no published power figures")
        out.update(energy_j=why, energy_j_per_token=why)
    if cost_model.cost_usd_per_hour() is None:
        out["cost_usd_per_mtok"] = f"the profiled machine {cost_model.machine!r} has no known price"
    return out


def run_sim(run: SimRun, on_progress: Optional[ProgressHook] = None) -> Results:
    """Simulates ``run``: metrics, per-request rows and the event log."""
    if run.why_not_fast is None:  # the same log, from the loop on counts
        log = run_fast(run.scheduler, run.kv, run.cost_model, run.requests, limits=run.limits, on_progress=on_progress)
    else:
        log = run_replica(run.scheduler, run.kv, SimExecutor(run.cost_model), list(run.requests), limits=run.limits,
                          on_progress=on_progress)  # fmt: skip
    log = log.freeze()
    cost_model = run.cost_model
    metrics = summarize(log, **run.slo, price_per_hour_usd=cost_model.cost_usd_per_hour(),
                        unmodelled=unmodelled_metrics(cost_model),
                        idle_power_w=cost_model.idle_power_w() if cost_model.models_energy else None)
    metrics["num_kv_blocks"] = run.kv.num_blocks
    return Results(metrics, request_metrics(log).rows(), log, run.kv, run.scheduler)


def simulate(config, on_progress: Optional[ProgressHook] = None) -> Results:
    """Runs the experiment ``config`` in the simulator (``run_sim(build_sim(config))``)."""
    return run_sim(build_sim(config), on_progress)
