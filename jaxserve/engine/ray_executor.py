"""RayExecutor: a ModelRunner in a Ray actor, behind the Executor protocol.

The scheduler, the replica loop and the cluster stay in the driver process (pure values, as
everywhere else); only the executor is remote, as vLLM's Ray executor is. ``RayExecutor.start``
creates an actor that loads a local Hugging Face checkpoint directory and builds a ``ModelRunner``
over a ``KVConfig`` *in the actor's process* (jax on CPU there unless told otherwise); every
protocol method (``execute``, ``register``, ``release``, ``read_kv``, ``write_kv``) is one call to
it. An exception raised in the actor surfaces here as itself (a ``ValueError`` from ``register``
stays a ``ValueError`` with its own message, so a replica rejects the request with that reason).

    executor = RayExecutor.start(model_dir, KVConfig(64, 16), max_model_len=512, num_cpus=1)
    spec = ReplicaSpec(scheduler, executor.kv, executor, RunLimits(max_context=executor.max_model_len))
    ...
    executor.shutdown()

A step's ``duration_s`` is the runner's own measurement in the actor (the same as in process); the
round trip around it (pickling the plan, the call, the tokens back) is added up in
``overhead_seconds``, not put on the clock. Ray is optional (``pip install -e ".[ray]"``) and
imported only here, when an executor is started.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from jaxserve.kv.config import KVConfig
from jaxserve.plan import BatchPlan, SampledTokens, StepOutput
from jaxserve.request import Request
from jaxserve.runtime.executor import Executor

RAY_MISSING = 'the Ray executor needs the optional "ray" extra: pip install -e ".[ray]"'


def import_ray():
    """The ``ray`` module, or ImportError saying which extra installs it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"{RAY_MISSING} ({e})") from e
    return ray


def init_local_ray(num_cpus: int = 2, **options) -> None:
    """Starts a quiet local Ray instance with ``num_cpus`` logical CPUs (each executor reserves
    ``num_cpus`` of them, 1 by default), unless this process is already connected to one.
    ``options`` go to ``ray.init`` (e.g. ``address="auto"`` to join a running cluster)."""
    ray = import_ray()
    if ray.is_initialized():
        return
    settings = dict(
        num_cpus=num_cpus,
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=False,  # actors' jax/XLA chatter stays in Ray's log files
        logging_level="warning",
    )
    settings.update(options)
    if "address" in options:
        settings.pop("num_cpus", None)  # a running cluster's resources are its own
    ray.init(**settings)


class _RunnerActor:
    """The actor's side: one ModelRunner, built by ``build`` (not ``__init__``, so that a failure
    to load the model reaches the driver as the original exception rather than a dead actor)."""

    def __init__(self):
        self.runner = None

    def build(self, model_dir: str, kv: KVConfig, dtype, compile_cache, runner_options: dict) -> dict:
        import jax

        from jaxserve.engine.compilation import enable_persistent_cache
        from jaxserve.engine.model_runner import ModelRunner
        from jaxserve.model.loader import load_model

        if compile_cache:
            enable_persistent_cache(compile_cache)
        cfg, params = load_model(model_dir, dtype)
        self.runner = ModelRunner(cfg, params, kv, **runner_options)
        r = self.runner
        return {
            "cfg": r.cfg,
            "kv": r.kv,
            "max_model_len": r.max_model_len,
            "spec": r.spec,
            "attention": r.attention,
            "backend": jax.default_backend(),
            "pid": os.getpid(),
        }

    def register(self, request: Request) -> None:
        self.runner.register(request)

    def release(self, request_id: str) -> None:
        self.runner.release(request_id)

    def execute(self, plan: BatchPlan) -> tuple[np.ndarray, float, float]:
        """The sampled tokens (one per sampling row, plan order), duration and energy: the driver
        rebuilds the StepOutput around its own plan rather than receive the plan back."""
        out = self.runner.execute(plan)
        return _token_array(plan, out), out.duration_s, out.energy_j

    def read_kv(self, blocks: list[int]) -> Optional[np.ndarray]:
        return self.runner.read_kv(blocks)

    def write_kv(self, blocks: list[int], payload: Optional[np.ndarray]) -> None:
        self.runner.write_kv(blocks, payload)

    def prepare_kv_copy(self, num_blocks: int) -> None:
        self.runner.prepare_kv_copy(num_blocks)

    def warmup(self, max_decode_rows: int, max_blocks: int, mixed: bool) -> int:
        return self.runner.warmup(max_decode_rows, max_blocks, mixed=mixed)

    def stats(self) -> dict:
        r = self.runner
        return {
            "num_compilations": r.num_compilations,
            "num_compiled_shapes": r.num_compiled_shapes,
            "compile_seconds": r.compile_seconds,
            "num_evictions": r.num_evictions,
        }


def _token_array(plan: BatchPlan, out: StepOutput) -> np.ndarray:
    tokens = out.token_ids
    if type(tokens) is SampledTokens:
        return np.asarray(tokens.array, np.int64)
    ids = [rid for rid, s in zip(plan.request_ids, plan.samples_token.tolist()) if s]
    return np.fromiter((tokens[rid] for rid in ids), np.int64, len(ids))


class RayExecutor(Executor):
    """A handle to a ``_RunnerActor`` (see the module docstring). Build one with ``start``.

    ``max_model_len``, ``kv``, ``cfg`` and ``spec`` are the actor's runner's, read once at start;
    ``num_compilations`` and the other counters are asked of the actor when read."""

    def __init__(self, actor, info: dict, ray_module):
        self._actor = actor
        self._ray = ray_module
        self.cfg = info["cfg"]
        self.kv: KVConfig = info["kv"]
        self.max_model_len: int = info["max_model_len"]
        self.spec = info["spec"]
        self.attention: str = info["attention"]
        self.backend: str = info["backend"]  # jax's platform in the actor ("cpu" unless told otherwise)
        self.pid: int = info["pid"]  # the actor's process
        self.overhead_seconds = 0.0  # round trips of execute beyond the actor's step time

    @classmethod
    def start(
        cls,
        model_dir: str,
        kv: KVConfig,
        *,
        dtype: str | None = None,
        compile_cache: str | None = None,
        num_cpus: float = 1,
        env: dict[str, str] | None = None,
        actor_options: dict | None = None,
        timeout_s: float = 600.0,
        **runner_options,
    ) -> "RayExecutor":
        """An actor holding ``ModelRunner(cfg, params, kv, **runner_options)`` for the checkpoint in
        ``model_dir`` (loaded there by ``model.loader.load_model(model_dir, dtype)``).

        ``compile_cache``: jax's persistent compilation cache directory in the actor (``None``:
        off). ``num_cpus``: logical CPUs the actor reserves. ``env``: environment variables of the
        actor's process, over ``JAX_PLATFORMS=cpu``. ``actor_options``: further ``.options(...)``
        of the actor. Starts a local Ray instance (``init_local_ray``) if none is connected.
        Raises what loading or building raised in the actor, or TimeoutError if the actor found no
        room within ``timeout_s`` (e.g. every CPU reserved by other executors)."""
        ray = import_ray()
        init_local_ray()
        options = {
            "num_cpus": num_cpus,
            "max_concurrency": 1,  # steps and KV reads/writes in the order they were sent
            "runtime_env": {"env_vars": {"JAX_PLATFORMS": "cpu", **(env or {})}},
            **(actor_options or {}),
        }
        actor = ray.remote(_RunnerActor).options(**options).remote()
        try:
            info = _get(ray, actor.build.remote(model_dir, kv, dtype, compile_cache, runner_options), timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor)
            raise TimeoutError(
                f"the Ray actor for {model_dir!r} did not start within {timeout_s} s (it reserves "
                f"num_cpus={num_cpus}; free now: {ray.available_resources()})"
            ) from None
        except BaseException:
            ray.kill(actor)
            raise
        return cls(actor, info, ray)

    # -- the Executor protocol -------------------------------------------------------------------
    def register(self, request: Request) -> None:
        self._call("register", request)

    def release(self, request_id: str) -> None:
        self._call("release", request_id)

    def execute(self, plan: BatchPlan) -> StepOutput:
        start = time.perf_counter()
        tokens, duration_s, energy_j = self._call("execute", plan)
        out = StepOutput.for_plan(plan, tokens, duration_s, energy_j)
        self.overhead_seconds += max(0.0, time.perf_counter() - start - duration_s)
        return out

    def read_kv(self, blocks: Sequence[int]) -> Optional[np.ndarray]:
        return self._call("read_kv", [int(b) for b in blocks])

    def write_kv(self, blocks: Sequence[int], payload: Optional[np.ndarray]) -> None:
        self._call("write_kv", [int(b) for b in blocks], payload)

    def prepare_kv_copy(self, num_blocks: int) -> None:
        self._call("prepare_kv_copy", int(num_blocks))

    # -- the rest of ModelRunner's surface that front doors read ----------------------------------
    def warmup(self, max_decode_rows: int, max_blocks: int, mixed: bool = True, on_progress=None) -> int:
        """The runner's ``warmup`` in the actor (``on_progress`` is not called: it cannot cross)."""
        return self._call("warmup", max_decode_rows, max_blocks, mixed)

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    num_compilations = property(lambda self: self.stats()["num_compilations"])
    num_compiled_shapes = property(lambda self: self.stats()["num_compiled_shapes"])
    compile_seconds = property(lambda self: self.stats()["compile_seconds"])
    num_evictions = property(lambda self: self.stats()["num_evictions"])

    def shutdown(self) -> None:
        """Ends the actor (and its process); the executor is unusable afterwards. Idempotent."""
        if self._actor is not None:
            self._ray.kill(self._actor)
            self._actor = None

    def _call(self, method: str, *args):
        if self._actor is None:
            raise RuntimeError("this RayExecutor was shut down")
        return _get(self._ray, getattr(self._actor, method).remote(*args))


def _get(ray, ref, timeout_s: float | None = None):
    """``ray.get``, re-raising an exception raised in the actor as itself (its type and message),
    with the actor's traceback as a note."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if not isinstance(cause, Exception) or isinstance(cause, ray.exceptions.RayError):
            raise
        remote = re.sub(r"\x1b\[[0-9;]*m", "", getattr(e, "traceback_str", None) or str(e))
        cause.add_note(f"raised in a Ray actor: {remote}")
        raise cause from None
