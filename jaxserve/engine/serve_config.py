"""``run_engine(config) -> Results``: the experiment CLI's ``backend="engine"``.

Builds the same scheduler and workload as the simulator from a config, loads the model from
``model.path`` (a local HF directory), serves the workload on the engine and summarises the event
log with the same ``metrics.summarize``, so ``metrics.json`` has the same keys for both backends.
Length-only workloads (traces, synthetic lengths) get random prompt token ids drawn with
``workload.seed``; requests run to their ``max_new_tokens`` (no stop tokens), as in the simulator.
``engine_settings(config)`` reads every engine key without loading anything; ``build_engine``
also builds the scheduler and workload and loads the model; ``serve_engine`` runs what it built.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from jaxserve.config import ConfigError, Results, build_scheduler, build_workload, get, positive_or_none, slo_targets
from jaxserve.engine.compilation import enable_persistent_cache
from jaxserve.engine.engine import Engine
from jaxserve.engine.esp_policy import EspPolicy
from jaxserve.engine.esp_runner import EspRunner
from jaxserve.engine.kv_sizing import kv_blocks_for
from jaxserve.engine.model_runner import ModelRunner, step_limits
from jaxserve.kv.config import KVConfig
from jaxserve.metrics import request_metrics, summarize
from jaxserve.model.config import CheckpointError, ModelConfig
from jaxserve.model.loader import load_model
from jaxserve.parallel.mesh import sequence_mesh
from jaxserve.parallel.tensor_parallel import check_mesh_sizes, check_tensor_parallel, mesh_for
from jaxserve.request import Request
from jaxserve.runtime import ProgressHook
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


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Every config key the engine backend reads beyond the scheduler and workload (which both
    backends build alike), read by ``engine_settings`` before any model is loaded."""

    model_path: str
    dtype: str | None  # a jnp dtype name; None: the checkpoint's torch_dtype
    block_size: int
    max_context: int  # 0: the model's max_position_embeddings, at most 4096
    num_blocks: int  # 0: as many as kv_cache_gb holds (no more than the batch can use)
    num_host_blocks: int
    kv_cache_gb: float
    block_rows: int
    attention: str
    seed: int
    warmup: bool
    compile_cache: str  # "" : off
    max_compiled_shapes: int | None  # None: default_max_compiled_shapes()
    token_seed: int  # workload.seed: the random prompt ids of length-only requests
    max_time_s: float  # sim.max_time_s: stop after this many measured seconds (inf: never)
    slo: dict  # summarize's slo_ttft_s / slo_tpot_s
    tp: int  # parallel.tp: tensor-parallel devices
    sp: int  # parallel.sp: devices the step's rows are split over (with esp: the ESP devices)
    first_device: int  # parallel.first_device: the runner's devices are jax.devices()[first : first + tp*sp]
    esp_policy: EspPolicy | None  # parallel.esp: LoongServe's elastic SP over the sp devices; None: off
    nano_batches: int = 1  # engine.nano_batches: nano-batches per step (NanoFlow's overlap); 1: off
    async_scheduling: bool = False  # engine.async_scheduling: schedule step N+1 while step N runs

    @property
    def devices(self) -> list | None:
        """This runner's own devices; None (the first tp*sp) keeps the one-device path mesh-free."""
        if self.first_device == 0:
            return None
        return jax.devices()[self.first_device : self.first_device + self.tp * self.sp]


def engine_settings(config) -> EngineSettings:
    """Reads and checks the engine's keys; ConfigError names the first bad one."""
    path = get(config, "model.path", str)
    if not path:
        raise ConfigError("model.path: backend='engine' needs a local Hugging Face model directory")
    if not os.path.isdir(path):
        raise ConfigError(f"model.path: {path!r} is not a directory")
    dtype_key = get(config, "engine.dtype", str)
    if dtype_key not in DTYPES:
        raise ConfigError(f"engine.dtype must be one of {sorted(DTYPES)}, got {dtype_key!r}")
    max_context = get(config, "model.max_context", int)
    if max_context < 0:
        raise ConfigError(f"model.max_context must be >= 0 (0: the model's), got {max_context}")
    kv_cache_gb = get(config, "engine.kv_cache_gb", float)
    if not kv_cache_gb > 0:
        raise ConfigError(f"engine.kv_cache_gb must be > 0, got {kv_cache_gb}")
    max_time_s = positive_or_none(config, "sim.max_time_s")
    tp, sp = get(config, "parallel.tp", int), get(config, "parallel.sp", int)
    try:
        check_mesh_sizes(tp, sp, jax.device_count(), keys=("parallel.tp", "parallel.sp"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    first_device = get(config, "parallel.first_device", int)
    if not 0 <= first_device <= jax.device_count() - tp * sp:
        raise ConfigError(f"parallel.first_device must be in [0, {jax.device_count() - tp * sp}] so that its "
                          f"tp x sp = {tp * sp} devices exist ({jax.device_count()} here), got {first_device}")  # fmt: skip
    esp_policy = None
    if get(config, "parallel.esp", bool):
        if tp != 1:
            raise ConfigError(f"parallel.esp runs on parallel.sp devices with parallel.tp=1, got parallel.tp={tp}")
        pages = get(config, "parallel.esp_decode_pages_per_device", int)
        try:
            esp_policy = EspPolicy(get(config, "parallel.esp_prefill_tokens_per_device", int), pages or None)
        except ValueError as e:
            raise ConfigError(f"parallel.esp_*: {e}") from None
    nano_batches = get(config, "engine.nano_batches", int)
    if nano_batches < 1:
        raise ConfigError(f"engine.nano_batches must be >= 1 (1: off), got {nano_batches}")
    if nano_batches > 1 and esp_policy is not None:
        raise ConfigError(f"engine.nano_batches={nano_batches} does not run with parallel.esp (use 1)")
    async_scheduling = get(config, "engine.async_scheduling", bool)
    if async_scheduling and esp_policy is not None:
        raise ConfigError("engine.async_scheduling does not run with parallel.esp (set it false)")
    max_shapes = get(config, "engine.max_compiled_shapes", int)
    if max_shapes < 0:
        raise ConfigError(f"engine.max_compiled_shapes must be >= 0 (0: from the host's memory-map limit), got {max_shapes}")
    return EngineSettings(
        model_path=path,
        dtype=DTYPES[dtype_key],
        block_size=get(config, "kv.block_size", int),
        max_context=max_context,
        num_blocks=get(config, "kv.num_blocks", int),
        num_host_blocks=get(config, "kv.num_host_blocks", int),
        kv_cache_gb=kv_cache_gb,
        block_rows=get(config, "engine.block_rows", int),
        attention=get(config, "engine.attention", str),
        seed=get(config, "seed", int),
        warmup=get(config, "engine.warmup", bool),
        compile_cache=get(config, "engine.compile_cache", str),
        max_compiled_shapes=max_shapes or None,
        token_seed=get(config, "workload.seed", int),
        max_time_s=math.inf if max_time_s is None else max_time_s,
        slo=slo_targets(config),
        tp=tp,
        sp=sp,
        first_device=first_device,
        esp_policy=esp_policy,
        nano_batches=nano_batches,
        async_scheduling=async_scheduling,
    )


def build_runner(settings: EngineSettings, max_num_seqs: int) -> tuple[ModelRunner, KVConfig]:
    """Loads the model and builds its runner and KV pool (``max_num_seqs`` bounds a pool sized
    from memory: no more pages than that many full-length sequences need). Turns on the persistent
    compilation cache (``engine.compile_cache``) first."""
    enable_persistent_cache(settings.compile_cache)
    try:
        checkpoint_cfg = ModelConfig.from_dir(settings.model_path)
    except CheckpointError as e:
        raise ConfigError(f"model.path: {e}") from None
    try:  # before loading the weights: the heads or MLP width may not split over parallel.tp
        check_tensor_parallel(checkpoint_cfg, settings.tp, key="parallel.tp")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        cfg, params = load_model(settings.model_path, settings.dtype)
    except CheckpointError as e:
        raise ConfigError(f"model.path: {e}") from None
    max_len = settings.max_context or min(cfg.max_position_embeddings, 4096)
    num_blocks = settings.num_blocks
    if num_blocks <= 0:
        num_blocks = kv_blocks_for(cfg, settings.block_size, settings.kv_cache_gb, max_len, max_num_seqs, settings.tp)
        num_blocks *= settings.sp if settings.esp_policy else 1  # a pool per ESP device
    options = dict(max_model_len=max_len, block_rows=settings.block_rows, attention=settings.attention,
                   seed=settings.seed, max_compiled_shapes=settings.max_compiled_shapes)  # fmt: skip
    try:
        kv = KVConfig(num_blocks, settings.block_size, settings.num_host_blocks)
        if settings.esp_policy is not None:
            mesh = sequence_mesh(settings.devices, size=settings.sp)
            runner = EspRunner(cfg, params, kv, mesh=mesh, policy=settings.esp_policy, **options)
        else:
            mesh = mesh_for(settings.tp, settings.sp, settings.devices)
            runner = ModelRunner(cfg, params, kv, mesh=mesh, nano_batches=settings.nano_batches, **options)
    except ValueError as e:
        raise ConfigError(f"engine/kv: {e}") from None
    return runner, kv


@dataclasses.dataclass(frozen=True)
class EngineRun:
    """Everything an engine run needs, built from a config by ``build_engine`` (the model loaded)."""

    settings: EngineSettings
    runner: ModelRunner
    kv: KVConfig
    scheduler: object
    requests: tuple[Request, ...]


def build_engine(config) -> EngineRun:
    """Reads ``config``, builds the scheduler and workload, loads the model."""
    settings = engine_settings(config)
    sched = build_scheduler(config)
    workload = build_workload(config)
    runner, kv = build_runner(settings, step_limits(sched)[0])
    requests = with_token_ids(workload, runner.cfg.vocab_size, settings.token_seed)
    return EngineRun(settings, runner, kv, sched, tuple(requests))


def warmup_limits(run: EngineRun) -> tuple[int, int]:
    """``(decode rows, prefill blocks)`` a full warm-up of ``run`` compiles up to: the scheduler's
    batch size (at most the number of requests), and its token budget in blocks plus one per
    sequence (each prefill chunk is padded to whole blocks), at most 4x the budget's blocks."""
    max_decode, budget = step_limits(run.scheduler)
    budget_blocks = math.ceil(budget / run.runner.spec.block_rows)
    return min(max_decode, len(run.requests)), min(budget_blocks + max_decode, 4 * budget_blocks)


def serve_engine(run: EngineRun, on_progress: ProgressHook | None = None, on_warmup=None) -> Results:
    """Warms the runner up (``engine.warmup``; ``on_warmup(done, total, shape)`` per compiled
    shape) and serves ``run``'s requests: metrics, rows, log."""
    runner, sched = run.runner, run.scheduler
    if run.settings.warmup:
        max_decode, max_blocks = warmup_limits(run)
        runner.warmup(max_decode, max_blocks, mixed=True, on_progress=on_warmup)
    limits = RunLimits(max_context=runner.max_model_len, max_sim_time_s=run.settings.max_time_s)
    served = Engine(runner, sched, run.kv, async_scheduling=run.settings.async_scheduling).serve(list(run.requests), limits=limits, on_progress=on_progress)
    log = served.log.freeze()
    metrics = summarize(log, **run.settings.slo, unmodelled=ENGINE_UNMODELLED)
    metrics["num_kv_blocks"] = run.kv.num_blocks
    metrics["num_compilations"] = runner.num_compilations
    metrics["num_compiled_shapes"] = runner.num_compiled_shapes
    metrics["compile_s"] = runner.compile_seconds
    metrics["num_compile_evictions"] = runner.num_evictions
    return Results(metrics, request_metrics(log).rows(), log, run.kv, sched)


ENGINE_UNMODELLED = {
    "energy_j": "the engine measures time, not power",
    "energy_j_per_token": "the engine measures time, not power",
    "cost_usd_per_mtok": "the engine has no price for its machine (the simulator's hardware table has)",
}


def run_engine(config, on_progress: ProgressHook | None = None, on_warmup=None) -> Results:
    """Serves the config's workload on the real engine (``serve_engine(build_engine(config))``)."""
    return serve_engine(build_engine(config), on_progress, on_warmup)
