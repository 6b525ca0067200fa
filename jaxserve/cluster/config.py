"""A simulated cluster from a config: ``cluster.*`` keys (configs/default.py) on top of the
single-replica keys, which describe every replica unless ``cluster.replicas`` overrides some.

* ``cluster.num_replicas``: replicas at the start.
* ``cluster.router`` and ``cluster.router_options`` (``"max_waiting=4,w_q=1"``; values typed by
  the router's fields).
* ``cluster.replicas``: per-replica overrides, ``"1:hardware.name=h100-sxm,scheduler.name=sarathi;
  3:kv.num_blocks=2000"`` — any replica key (model, hardware, scheduler, kv), checked like
  ``--config`` overrides.
* ``cluster.events``: ``"fail:2@30,drain:1@60,add@90,remove:3@120"`` (kind, replica, time in
  seconds); an added replica is built from the base keys and takes the next index.
* ``cluster.migration.*``: Llumnix's migration (mode off | live | recompute, the policy's
  thresholds, the link, the live stages).
* ``cluster.pools.*``: phase pools (``handoff.py``): the first ``prefill`` replicas compute prompts,
  the next ``decode`` ones only decode, the rest are mixed; each pool's replica keys
  (``prefill_overrides`` / ``decode_overrides``, under ``cluster.replicas``' per-replica ones), the
  link, its scope and overlap, and how a decode replica is picked.

With ``backend="engine"`` every replica is a real engine (``model.path`` loaded once per replica,
its KV pool and runner built as the single-engine backend builds them), driven by the same cluster
code on the engines' measured-time clock; length-only workloads get random prompt ids.

Every error is a ConfigError naming the key and the bad part.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Optional

from jaxserve.cluster.cluster import EVENT_KINDS, Cluster, ClusterEvent, ReplicaSpec
from jaxserve.cluster.fast_cluster import FastCluster, why_not_fast_cluster
from jaxserve.cluster.handoff import DECODE_PICKS, LINK_SCOPES, PoolSettings, handoff_metrics
from jaxserve.cluster.kv_transfer import OVERLAPS, KVLink
from jaxserve.cluster.migration import MODES, MigrationSettings, fill_downtimes, migration_metrics
from jaxserve.cluster.migration_policy import LlumnixPolicy
from jaxserve.cluster.routers import registry as router_registry
from jaxserve.config import (ConfigError, Results, build_scheduler, build_workload, get, override, parse_value,
                             slo_targets)
from jaxserve.metrics import request_metrics, summarize
from jaxserve.runtime import ProgressHook, RunLimits
from jaxserve.sim.executor import SimExecutor
from jaxserve.sim.simulate import build_cost_model, build_kv, max_context, max_sim_time_s, unmodelled_metrics

REPLICA_SECTIONS = ("model", "hardware", "scheduler", "kv", "parallel")  # what cluster.replicas may override (parallel: engine replicas)


def is_cluster(config) -> bool:
    """Whether the config asks for more than one replica or for cluster events."""
    return get(config, "cluster.num_replicas", int) != 1 or bool(get(config, "cluster.events", str)) \
        or get(config, "cluster.router", str) != "round_robin" or bool(get(config, "cluster.replicas", str)) \
        or get(config, "cluster.migration.mode", str) != "off" or any(pool_sizes(config))


def _pairs(text: str, key: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or not name.strip():
            raise ConfigError(f"{key}: expected name=value, got {part!r}")
        out[name.strip()] = value.strip()
    return out


def _typed(value: str, kind, key: str):
    kind = typing.get_origin(kind) or kind
    try:
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError
            return value.lower() == "true"
        if kind in (int, float, str):
            return kind(value)
    except ValueError:
        raise ConfigError(f"{key} must be {kind.__name__}, got {value!r}") from None
    raise ConfigError(f"{key} cannot be set from the command line (a {kind!r} option)")


def build_router(config):
    name = get(config, "cluster.router", str)
    if name not in router_registry.available():
        raise ConfigError(f"cluster.router: unknown router {name!r}; available: {', '.join(router_registry.available())}")
    constructor = router_registry.constructor(name)
    fields = [f.name for f in dataclasses.fields(constructor)] if dataclasses.is_dataclass(constructor) else []
    hints = typing.get_type_hints(constructor)
    options = {}
    for option, text in _pairs(get(config, "cluster.router_options", str), "cluster.router_options").items():
        if option not in fields:
            raise ConfigError(f"cluster.router_options: router {name!r} has no option {option!r}; "
                              f"options: {', '.join(fields) or 'none'}")
        options[option] = _typed(text, hints[option], f"cluster.router_options.{option}")
    try:
        return router_registry.make(name, **options)
    except ValueError as e:
        raise ConfigError(f"cluster.router_options: {e}") from None


def pool_sizes(config) -> tuple[int, int]:
    """``(prefill, decode)`` replica counts of the phase pools (0, 0: no pools)."""
    sizes = get(config, "cluster.pools.prefill", int), get(config, "cluster.pools.decode", int)
    for key, value in zip(("prefill", "decode"), sizes):
        if value < 0:
            raise ConfigError(f"cluster.pools.{key} must be >= 0, got {value}")
    return sizes


def roles(config) -> list[str]:
    """Each starting replica's role: prefill, then decode, then mixed (``cluster.pools.*``)."""
    n = get(config, "cluster.num_replicas", int)
    prefill, decode = pool_sizes(config)
    if prefill + decode > n:
        raise ConfigError(f"cluster.pools: {prefill} prefill + {decode} decode replicas > cluster.num_replicas={n}")
    out = ["prefill"] * prefill + ["decode"] * decode + ["mixed"] * (n - prefill - decode)
    if set(out) in ({"prefill"}, {"decode"}):
        raise ConfigError(f"cluster.pools: {out[0]} replicas alone cannot serve both phases (prefill={prefill}, "
                          f"decode={decode}, cluster.num_replicas={n}): add decode or mixed replicas, or prefill or "
                          "mixed ones")
    return out


def _replica_values(config, text: str, key: str) -> dict:
    """``key=value,...`` of replica keys (``REPLICA_SECTIONS``), typed like the base config's."""
    values = {}
    for name, value in _pairs(text, key).items():
        if name.split(".")[0] not in REPLICA_SECTIONS:
            raise ConfigError(f"{key}: {name!r} is not a replica key (sections: {', '.join(REPLICA_SECTIONS)})")
        try:
            values[name] = parse_value(config, name, value)  # typed as the CLI types --config.<name>
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    return values


def replica_configs(config) -> list:
    """One config per starting replica: the base with its pool's overrides
    (``cluster.pools.<role>_overrides``), then its own ``cluster.replicas`` ones."""
    n = get(config, "cluster.num_replicas", int)
    if n < 1:
        raise ConfigError(f"cluster.num_replicas must be >= 1, got {n}")
    pools = {role: _replica_values(config, get(config, f"cluster.pools.{role}_overrides", str),
                                   f"cluster.pools.{role}_overrides") for role in ("prefill", "decode")}  # fmt: skip
    overrides: dict[int, dict] = {}
    for part in filter(None, (p.strip() for p in get(config, "cluster.replicas", str).split(";"))):
        index, colon, rest = part.partition(":")
        if not colon or not index.strip().isdigit():
            raise ConfigError(f"cluster.replicas: expected '<replica>:key=value,...', got {part!r}")
        i = int(index)
        if i >= n:
            raise ConfigError(f"cluster.replicas: override for replica {i}, but cluster.num_replicas is {n} (replicas 0..{n - 1})")
        overrides[i] = _replica_values(config, rest, f"cluster.replicas[{i}]")
    return [override(config, {**pools.get(role, {}), **overrides.get(i, {})}) for i, role in enumerate(roles(config))]


def replica_spec(config, name: str, role: str = "mixed") -> ReplicaSpec:
    cost_model = build_cost_model(config)
    kv = build_kv(config, cost_model)
    bytes_per_block = kv.block_size * getattr(cost_model, "kv_bytes_per_token_device", 0.0)
    model = getattr(cost_model, "model", None)
    return ReplicaSpec(build_scheduler(config), kv, SimExecutor(cost_model),
                       RunLimits(max_context=max_context(config, cost_model)), name, bytes_per_block, role,
                       getattr(model, "num_layers", 1))  # fmt: skip


def lay_out_devices(configs: list) -> list:
    """Engine replicas' configs with ``parallel.first_device`` set so that their meshes sit one
    after another from the first config's value, each on its own tp x sp devices; when the devices
    run out the layout wraps round to device 0 and later replicas share devices (fine on host CPU
    devices; on accelerators they then share memory)."""
    import jax

    out, start = [], get(configs[0], "parallel.first_device", int) if configs else 0
    for c in configs:
        width = get(c, "parallel.tp", int) * get(c, "parallel.sp", int)
        if start + width > jax.device_count():
            start = 0
        out.append(override(c, {"parallel.first_device": start}))
        start += width
    return out


def engine_replica_spec(config, name: str, role: str = "mixed") -> ReplicaSpec:
    """A real-engine replica from ``config`` (the engine backend's keys; its model loaded)."""
    from jaxserve.engine.model_runner import step_limits
    from jaxserve.engine.serve_config import build_runner, engine_settings

    scheduler = build_scheduler(config)
    settings = engine_settings(config)
    if settings.async_scheduling:  # cluster members step synchronously (runtime.Replica)
        raise ConfigError(f"engine.async_scheduling: engine clusters step their replicas synchronously (replica {name!r}); set it false")
    runner, kv = build_runner(settings, step_limits(scheduler)[0])
    return ReplicaSpec(scheduler, kv, runner, RunLimits(max_context=runner.max_model_len), name, 0.0, role,
                       runner.cfg.num_layers)  # fmt: skip


SPEC_BUILDERS = {"sim": replica_spec, "engine": engine_replica_spec}


def build_pools(config) -> PoolSettings:
    """``cluster.pools.*`` -> PoolSettings; a bad value is a ConfigError naming its key."""
    try:
        link = KVLink.named(get(config, "cluster.pools.link", str))
    except ValueError as e:
        raise ConfigError(f"cluster.pools.link: {e}") from None
    gb_s = get(config, "cluster.pools.link_gb_s", float, optional=True)
    if gb_s is not None:
        if not gb_s > 0:
            raise ConfigError(f"cluster.pools.link_gb_s must be > 0 GB/s, got {gb_s!r}")
        link = dataclasses.replace(link, bandwidth=gb_s * 1e9, name=f"{link.name} at {gb_s:g} GB/s")
    values = {}
    for key, allowed in (("link_scope", LINK_SCOPES), ("overlap", OVERLAPS), ("decode_pick", DECODE_PICKS)):
        values[key] = get(config, f"cluster.pools.{key}", str)
        if values[key] not in allowed:
            raise ConfigError(f"cluster.pools.{key} must be one of {', '.join(allowed)}, got {values[key]!r}")
    return PoolSettings(link, **values)


def build_migration(config) -> MigrationSettings:
    """``cluster.migration.*`` -> MigrationSettings; a bad value is a ConfigError naming its key."""
    mode = get(config, "cluster.migration.mode", str)
    if mode not in MODES:
        raise ConfigError(f"cluster.migration.mode must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        link = KVLink.named(get(config, "cluster.migration.link", str))
    except ValueError as e:
        raise ConfigError(f"cluster.migration.link: {e}") from None
    try:
        policy = LlumnixPolicy(get(config, "cluster.migration.source_below", float),
                               get(config, "cluster.migration.destination_above", float),
                               get(config, "cluster.migration.headroom_blocks", int))  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"cluster.migration.source_below/destination_above/headroom_blocks: {e}") from None
    values = {k: get(config, f"cluster.migration.{k}", t) for k, t in
              (("interval_s", float), ("max_stages", int), ("final_stage_blocks", int))}  # fmt: skip
    for key, value in values.items():
        if not value > 0:
            raise ConfigError(f"cluster.migration.{key} must be > 0, got {value!r}")
    return MigrationSettings(mode, policy, link=link, **values)


def build_events(config, num_replicas: int, build_spec=replica_spec) -> list[ClusterEvent]:
    text = get(config, "cluster.events", str)
    parsed = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        what, at, time = part.partition("@")
        kind, colon, index = what.partition(":")
        kind = kind.strip()
        try:
            t = float(time)
        except ValueError:
            t = math.nan
        if not at or kind not in EVENT_KINDS or not t >= 0 or (kind == "add") == bool(colon):
            raise ConfigError(f"cluster.events: expected '<{'|'.join(EVENT_KINDS[1:])}>:<replica>@<seconds>' or "
                              f"'add@<seconds>', got {part!r}")
        if kind != "add" and not index.strip().isdigit():
            raise ConfigError(f"cluster.events: {part!r}: the replica must be an index, got {index!r}")
        parsed.append((t, kind, None if kind == "add" else int(index)))
    events, count = [], num_replicas
    for t, kind, index in sorted(parsed, key=lambda e: e[0]):
        if kind == "add":
            events.append(ClusterEvent(t, "add", spec=build_spec(config, f"replica {count}")))
            count += 1
        elif index >= count:
            raise ConfigError(f"cluster.events: {kind}:{index}@{t:g} names replica {index}, but only replicas "
                              f"0..{count - 1} exist by then")
        else:
            events.append(ClusterEvent(t, kind, replica=index))
    return events


@dataclasses.dataclass(frozen=True)
class ClusterSim:
    """Everything a cluster run needs (simulated replicas, or real engines with
    ``backend="engine"``), built from a config by ``build_cluster_sim``."""

    configs: tuple
    specs: tuple[ReplicaSpec, ...]
    router: object
    events: tuple[ClusterEvent, ...]
    requests: tuple
    max_sim_time_s: float
    slo: dict
    migration: MigrationSettings = MigrationSettings("off")
    pools: PoolSettings = PoolSettings()
    fast_loop: bool = True  # sim.fast_loop: FastCluster when why_not_fast_cluster allows it

    @property
    def why_not_fast(self) -> Optional[str]:
        """Why ``run_cluster_sim`` uses the general ``Cluster`` (None: ``FastCluster`` runs it)."""
        if not self.fast_loop:
            return "sim.fast_loop is off"
        return why_not_fast_cluster(self.specs, self.router, events=self.events, migration=self.migration,
                                    max_sim_time_s=self.max_sim_time_s, requests=self.requests)  # fmt: skip

    @property
    def cost_model(self):
        """Replica 0's cost model (titles; None for real engines)."""
        return getattr(self.specs[0].executor, "cost_model", None)

    @property
    def is_engine(self) -> bool:
        return self.cost_model is None


class ClusterParts(typing.NamedTuple):
    """A cluster's makings from a config (``build_cluster_parts``): per-replica configs and specs,
    the router, the events, migration and pool settings."""

    configs: tuple
    specs: tuple
    router: object
    events: tuple
    migration: MigrationSettings
    pools: PoolSettings


def build_cluster_parts(config) -> ClusterParts:
    """The replicas (simulated, or real engines with ``backend="engine"``, laid out on devices of
    their own), router, events, migration and pools of ``config``; ConfigError names a bad key."""
    backend = get(config, "backend", str)
    if backend not in SPEC_BUILDERS:
        raise ConfigError(f"backend must be one of {', '.join(SPEC_BUILDERS)}, got {backend!r}")
    build_spec = SPEC_BUILDERS[backend]
    configs = replica_configs(config)
    if backend == "engine":
        configs = lay_out_devices(configs)
    router, migration, pools = build_router(config), build_migration(config), build_pools(config)  # (cheap checks first)
    if migration.mode != "off" and any(pool_sizes(config)):
        raise ConfigError("cluster.migration.mode and cluster.pools: migration between the replicas of phase pools is "
                          "not supported; set cluster.migration.mode='off' or cluster.pools.prefill=decode=0")
    specs = tuple(build_spec(c, f"{role} {i}" if role != "mixed" else f"replica {i}", role)
                  for i, (c, role) in enumerate(zip(configs, roles(config))))  # fmt: skip
    events = tuple(build_events(config, len(specs), build_spec))
    return ClusterParts(tuple(configs), specs, router, events, migration, pools)


def build_cluster_sim(config) -> ClusterSim:
    parts = build_cluster_parts(config)
    requests = tuple(build_workload(config))
    if get(config, "backend", str) == "engine":
        from jaxserve.engine.serve_config import with_token_ids

        vocab_size = parts.specs[0].executor.cfg.vocab_size
        requests = tuple(with_token_ids(list(requests), vocab_size, get(config, "workload.seed", int)))
    return ClusterSim(parts.configs, parts.specs, parts.router, parts.events, requests, max_sim_time_s(config),
                      slo_targets(config), parts.migration, parts.pools, get(config, "sim.fast_loop", bool))  # fmt: skip


def run_cluster_sim(run: ClusterSim, on_progress: Optional[ProgressHook] = None) -> Results:
    """Simulates ``run``: metrics (with ``per_replica``), per-request rows, the shared log."""
    # A simulated step that raises is a bug; a real engine's is a fault (the replica fails, its requests go on).
    if run.why_not_fast is None:  # the same log, from replicas on counts
        cluster = FastCluster(run.specs, run.router)
        log = cluster.run(run.requests, on_progress=on_progress).freeze()
    else:
        cluster = Cluster(run.specs, run.router, max_sim_time_s=run.max_sim_time_s, migration=run.migration,
                          step_errors="fail" if run.is_engine else "raise", pools=run.pools)  # fmt: skip
        log = cluster.run(list(run.requests), run.events, on_progress=on_progress).freeze()
    members = cluster.members
    if run.is_engine:
        from jaxserve.engine.serve_config import ENGINE_UNMODELLED

        metrics = summarize(log, **run.slo, unmodelled=ENGINE_UNMODELLED)
    else:
        cost_models = [m.spec.executor.cost_model for m in members]
        prices = [cm.cost_usd_per_hour() for cm in cost_models]
        price = None if any(p is None for p in prices) else sum(prices)  # every replica for the whole run
        idle = ({m.index: cm.idle_power_w() for m, cm in zip(members, cost_models)}
                if all(cm.models_energy for cm in cost_models) else None)  # fmt: skip
        metrics = summarize(log, **run.slo, price_per_hour_usd=price, unmodelled=unmodelled_metrics(run.cost_model),
                            idle_power_w=idle)  # fmt: skip
    metrics["num_kv_blocks"] = sum(m.spec.kv.num_blocks for m in members)
    metrics["num_replicas"] = len(members)
    records = cluster.migrator.records if cluster.migrator is not None else []
    fill_downtimes(records, log)
    metrics.update(migration_metrics(records))
    if metrics["migration_downtime_s"] is None:
        metrics.setdefault("unavailable", {})["migration_downtime_s"] = (
            "no migration completed" if run.migration.mode != "off" else "cluster.migration.mode is 'off'")
    metrics["migration_mode"] = run.migration.mode
    if cluster.handoff is not None:
        metrics.update(handoff_metrics(cluster.handoff.records))
    metrics["per_replica"] = {
        str(m.index): {"status": m.status, "role": m.role, "num_steps": int((log.step_replica == m.index).sum()),
                       "num_placed": sum(1 for _, _, i in cluster.placements if i == m.index),
                       "busy_s": float(log.step_duration_s[log.step_replica == m.index].sum())}
        for m in members
    }  # fmt: skip
    replica_of = {}
    for _, rid, i in cluster.placements:
        replica_of[rid] = i  # the last replica it was placed on
    rows = request_metrics(log).rows()
    for i, (row, info) in enumerate(zip(rows, log.requests)):
        row["replica"] = replica_of.get(info.request_id, "")
        row["retries"] = int(log.retries[i])
    return Results(metrics, rows, log, members[0].spec.kv, members[0].spec.scheduler)
