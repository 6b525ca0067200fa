"""Reading an experiment config (``configs/*.py``, an ml_collections ConfigDict): what both
backends build the same way (the scheduler, the workload) and what they return (``Results``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jaxserve.scheduler as scheduler_registry
from jaxserve.kv.config import KVConfig
from jaxserve.runtime.events import FrozenLog
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


def build_scheduler(config):
    options = _as_dict(_get(config, "scheduler"))
    name = options.pop("name", None)
    try:
        return scheduler_registry.make(name, **options)
    except ValueError as e:
        raise ConfigError(f"scheduler: {e}") from None


def build_workload(config) -> list:
    """The config's requests (length-only unless the trace carries token ids)."""
    try:
        return workload_from_config(_get(config, "workload"))
    except FileNotFoundError as e:
        raise ConfigError(str(e) if "trace_path" in str(e) else f"workload.trace_path: {e}") from None
    except ValueError as e:
        raise ConfigError(f"workload: {e}") from None
