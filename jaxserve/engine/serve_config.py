"""``run_engine(config) -> Results``: the experiment CLI's ``backend="engine"``.

Builds the same scheduler and workload as the simulator from a config, loads the model from
``model.path`` (a local HF directory), serves the workload on the engine and summarises the event
log with the same ``metrics.summarize``, so ``metrics.json`` has the same keys for both backends.
Length-only workloads (traces, synthetic lengths) get random prompt token ids drawn with
``workload.seed``; requests run to their ``max_new_tokens`` (no stop tokens), as in the simulator.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import numpy as np

from jaxserve.config import ConfigError, Results, _get, build_scheduler, build_workload
from jaxserve.engine.engine import Engine
from jaxserve.engine.kv_sizing import kv_blocks_for
from jaxserve.engine.model_runner import ModelRunner, step_limits
from jaxserve.kv.config import KVConfig
from jaxserve.metrics import request_metrics, summarize
from jaxserve.model.config import CheckpointError
from jaxserve.model.loader import load_model
from jaxserve.request import Request
from jaxserve.runtime.limits import RunLimits

DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # fmt: skip


def with_token_ids(requests: list[Request], vocab_size: int, seed: int) -> list[Request]:
    """Requests known only by length get uniformly random prompt ids (reproducible per seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in requests:
        if r.has_real_tokens:
            out.append(r)
            continue
        ids = tuple(rng.integers(0, vocab_size, size=r.prompt_len).tolist())
        out.append(dataclasses.replace(r, prompt_token_ids=ids, prompt_len=None))
    return out


def build_runner(config) -> tuple[ModelRunner, KVConfig]:
    path = _get(config, "model.path")
    if not path:
        raise ConfigError("model.path: backend='engine' needs a local Hugging Face model directory")
    if not os.path.isdir(path):
        raise ConfigError(f"model.path: {path!r} is not a directory")
    dtype_key = str(_get(config, "engine.dtype", "auto"))
    if dtype_key not in DTYPES:
        raise ConfigError(f"engine.dtype must be one of {sorted(DTYPES)}, got {dtype_key!r}")
    try:
        cfg, params = load_model(path, DTYPES[dtype_key])
    except CheckpointError as e:
        raise ConfigError(f"model.path: {e}") from None
    block_size = int(_get(config, "kv.block_size", 16))
    max_len = int(_get(config, "model.max_context", 0) or 0) or min(cfg.max_position_embeddings, 4096)
    num_blocks = int(_get(config, "kv.num_blocks", 0) or 0)
    if num_blocks <= 0:
        max_seqs = int(_get(config, "scheduler.max_num_seqs", 256))
        num_blocks = kv_blocks_for(cfg, block_size, float(_get(config, "engine.kv_cache_gb", 0.5)), max_len, max_seqs)
    try:
        kv = KVConfig(num_blocks, block_size, int(_get(config, "kv.num_host_blocks", 0) or 0))
        runner = ModelRunner(
            cfg, params, kv, max_model_len=max_len, block_rows=int(_get(config, "engine.block_rows", 32)),
            attention=str(_get(config, "engine.attention", "auto")), seed=int(_get(config, "seed", 0)),
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"engine/kv: {e}") from None
    return runner, kv


def run_engine(config, on_progress: Callable[[float, int], None] | None = None) -> Results:
    """Serves the config's workload on the real engine; see the module docstring."""
    sched = build_scheduler(config)
    runner, kv = build_runner(config)
    requests = with_token_ids(build_workload(config), runner.cfg.vocab_size, int(_get(config, "workload.seed", 0)))
    if _get(config, "engine.warmup", True):
        max_decode, budget = step_limits(sched)
        budget_blocks = math.ceil(budget / runner.spec.block_rows)
        max_blocks = min(budget_blocks + max_decode, 4 * budget_blocks)
        runner.warmup(min(max_decode, len(requests)), max_blocks, mixed=True)
    limits = RunLimits(max_context=runner.max_model_len, max_sim_time_s=float(_get(config, "sim.max_time_s") or math.inf))
    run = Engine(runner, sched, kv).serve(requests, limits=limits, on_progress=on_progress)
    log = run.log.freeze()
    metrics = summarize(log, slo_ttft_s=_get(config, "slo.ttft_s") or None, slo_tpot_s=_get(config, "slo.tpot_s") or None)
    metrics["num_kv_blocks"] = kv.num_blocks
    metrics["num_compilations"] = runner.num_compilations
    return Results(metrics, request_metrics(log).rows(), log, kv, sched)
