"""Several engines of one model for the server, built from a config: ``cluster.*`` keys (a
prefill/decode pool, Llumnix migration, a router, events) on the engine backend's keys, as
``jaxserve.cluster.config`` builds an engine cluster offline (each replica laid out on devices of
its own), and what the server reads of a model (``ServedModel``) without a ``jaxserve.LLM``.

    config = load_config("configs/distserve.py", ["cluster.pools.decode=1"])
    loop, model = cluster_serving(config, "/models/llama", max_queue=64)
    build_app(model, loop=loop)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import NamedTuple, Optional

from jaxserve.config import ConfigError, check_keys, override, parse_value


class ServedModel(NamedTuple):
    """What the server reads of a ``jaxserve.LLM`` (``server.build_app``'s ``llm``) when engines of
    a cluster serve the model: its directory, config and tokenizer, the context every replica
    serves, and the scheduler and KV pool of the first replica that takes arrivals (the server's
    admission check of a request)."""

    model_dir: str
    cfg: object
    tokenizer: object
    max_model_len: int
    scheduler: object
    kv: object
    stop_at_eos: bool


def load_config(path: str, sets: tuple[str, ...] | list[str] = ()):
    """The config of file ``path`` (its ``get_config()``, keys checked against configs/default.py)
    with ``KEY=VALUE`` overrides typed as ``--config.KEY=VALUE`` types them."""
    if not os.path.isfile(path):
        raise ConfigError(f"--cluster-config: no config file {path!r}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # configs/x.py imports configs.default
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        spec = importlib.util.spec_from_file_location("_jaxserve_served_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        from configs import default
    except Exception as e:  # noqa: BLE001 (a config file may raise anything: one line naming it)
        raise ConfigError(f"--cluster-config={path}: {type(e).__name__}: {e}") from None
    check_keys(config, default.get_config())
    values = {}
    for item in sets:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--cluster-set needs KEY=VALUE, got {item!r}")
        values[key] = parse_value(config, key, text)
    return override(config, values)


def engine_parts(config, model_dir: str):
    """``cluster.config.build_cluster_parts`` of ``config`` as real engines of ``model_dir``."""
    from jaxserve.cluster.config import build_cluster_parts

    return build_cluster_parts(override(config, {"backend": "engine", "model.path": model_dir}))


def served_model(specs, model_dir: str, stop_at_eos: bool = True) -> ServedModel:
    """The ``ServedModel`` of engine replicas ``specs`` (``engine_replica_spec``s) of ``model_dir``."""
    from jaxserve.model.tokenizer import Tokenizer

    first = next(s for s in specs if s.role != "decode")
    max_len = min(s.limits.max_context for s in specs)
    return ServedModel(model_dir, first.executor.cfg, Tokenizer.from_dir(model_dir), max_len, first.scheduler, first.kv,
                       stop_at_eos)  # fmt: skip


def cluster_serving(config, model_dir: str, *, max_queue: Optional[int] = None, stop_at_eos: bool = True):
    """``(ClusterLoop, ServedModel)``: the engines of ``config``'s cluster served in real time."""
    from jaxserve.serve.cluster_loop import ClusterLoop

    parts = engine_parts(config, model_dir)
    loop = ClusterLoop(parts.specs, parts.router, migration=parts.migration if parts.migration.mode != "off" else None,
                       pools=parts.pools, events=parts.events, max_queue=max_queue)  # fmt: skip
    return loop, served_model(parts.specs, model_dir, stop_at_eos)


def flag_config(options: dict, num_replicas: int, router: str, router_options: list[str]):
    """The engine-backend config of the CLI's engine flags (``options``: ``jaxserve.LLM``'s keyword
    arguments) for ``num_replicas`` colocated engines behind ``router``."""
    from configs import default

    values = {
        "scheduler.name": options["scheduler"], "kv.block_size": options["block_size"],
        "kv.num_blocks": options["num_blocks"] or 0, "kv.num_host_blocks": options["num_host_blocks"],
        "engine.kv_cache_gb": options["kv_cache_gb"], "model.max_context": options["max_model_len"] or 0,
        "engine.dtype": options["dtype"] or "auto", "engine.attention": options["attention"], "seed": options["seed"],
        "parallel.tp": options["tp"], "parallel.sp": options["sp"], "cluster.num_replicas": num_replicas,
        "cluster.router": router, "cluster.router_options": ",".join(router_options),
    }  # fmt: skip
    if "compile_cache" in options:
        values["engine.compile_cache"] = options["compile_cache"]
    values.update({f"scheduler.{k}": v for k, v in options["scheduler_options"].items()})
    return override(default.get_config(), values)


def warm_up(specs) -> int:
    """Compiles every reachable step shape of each engine replica (as ``jaxserve.LLM.warmup``)."""
    import math

    from jaxserve.engine.model_runner import step_limits

    total = 0
    for spec in specs:
        max_seqs, budget = step_limits(spec.scheduler)
        total += spec.executor.warmup(max_seqs, math.ceil(budget / spec.executor.spec.block_rows) + 1)
    return total
