"""``jaxserve.LLM``: offline generation on a local Hugging Face model directory.

    llm = jaxserve.LLM("path/to/model", scheduler="sarathi", scheduler_options={"chunk_size": 256})
    outs = llm.generate(["Hello"], jaxserve.SamplingParams(max_new_tokens=32, temperature=0))
    outs[0].text, outs[0].token_ids

Every request goes through the same scheduler, paged KV cache and jitted step as served traffic
(``engine.Engine``); the completions come back in prompt order.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxserve import scheduler as schedulers
from jaxserve.engine.compilation import DEFAULT_CACHE_DIR, enable_persistent_cache
from jaxserve.engine.engine import Engine
from jaxserve.engine.esp_policy import EspPolicy
from jaxserve.engine.esp_runner import EspRunner
from jaxserve.engine.kv_sizing import kv_blocks_for
from jaxserve.engine.model_runner import ModelRunner, step_limits
from jaxserve.kv.config import KVConfig
from jaxserve.model import checkpoint
from jaxserve.model.config import ModelConfig
from jaxserve.model.loader import load_model
from jaxserve.model.tokenizer import Tokenizer
from jaxserve.parallel.mesh import sequence_mesh
from jaxserve.parallel.tensor_parallel import check_mesh_sizes, check_tensor_parallel, mesh_for
from jaxserve.request import Request, SamplingParams


@dataclasses.dataclass(frozen=True)
class Completion:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str | None  # None when the model directory has no tokenizer.json
    finish_reason: str  # "length", "stop", or "rejected: <reason>"
    num_preemptions: int = 0


class LLM:
    """A model, its tokenizer, a scheduler and an engine (see the module docstring).

    Options: ``scheduler`` (a registered name) and ``scheduler_options``; ``block_size``;
    ``num_blocks`` (else as many as ``kv_cache_gb`` holds, capped at what ``max_num_seqs``
    full-length sequences need); ``num_host_blocks`` (a host swap pool, for
    ``scheduler_options={"preemption_mode": "swap"}``); ``max_model_len`` (default: the model's, at most 4096); ``dtype``
    (override the checkpoint's); ``attention`` ("auto" | "grouped" | "ragged"); ``block_rows``
    (prefill rows per block); ``params_cache`` (a directory: restore converted parameters from it
    with orbax if present, else convert and save them there); ``compile_cache`` (jax's persistent
    compilation cache directory, "" off: a second process loads its step functions instead of
    compiling them); ``max_compiled_shapes`` (default: from the host's memory-map limit); ``seed``
    (for requests without one);
    ``stop_at_eos`` (add the model's EOS ids to every request's stop tokens); ``tp`` and ``sp``
    (tensor-parallel devices and devices the step's rows are split over, the config's
    ``parallel.tp``/``parallel.sp``: ``jaxserve.parallel.tensor_parallel``; ``kv_cache_gb`` is then
    per device); ``esp`` (LoongServe's elastic sequence parallelism over ``sp`` devices, each
    with its own KV pool of ``num_blocks / sp`` pages: ``engine.esp_runner``; needs ``tp = 1``) and
    ``esp_policy`` (``engine.esp_policy.EspPolicy``: prefill degree and decode placement);
    ``nano_batches`` (split each step into this many nano-batches whose attention and GEMMs may
    overlap, NanoFlow's intra-device parallelism: ``model/nano_batch.py``; 1: off; not with ``esp``);
    ``async_scheduling`` (schedule and pack step N+1 while the device runs step N, the same tokens:
    ``runtime/pipelined.py``; not with ``esp``).
    """

    def __init__(
        self,
        model_dir: str,
        *,
        scheduler: str = "vllm",
        scheduler_options: dict | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        num_host_blocks: int = 0,
        kv_cache_gb: float = 0.5,
        max_model_len: int | None = None,
        dtype: str | None = None,
        attention: str = "auto",
        block_rows: int = 32,
        params_cache: str | None = None,
        compile_cache: str = DEFAULT_CACHE_DIR,
        max_compiled_shapes: int | None = None,
        seed: int = 0,
        stop_at_eos: bool = True,
        tp: int = 1,
        sp: int = 1,
        esp: bool = False,
        esp_policy: EspPolicy | None = None,
        nano_batches: int = 1,
        async_scheduling: bool = False,
    ):
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
        self.model_dir = model_dir
        check_mesh_sizes(tp, sp, jax.device_count())
        if esp and tp != 1:
            raise ValueError(f"esp=True runs on sp devices with tp=1, got tp={tp}")
        if esp and nano_batches != 1:
            raise ValueError(f"nano_batches={nano_batches}: nano-batching does not run with esp=True (use 1)")
        if esp and async_scheduling:
            raise ValueError("async_scheduling=True does not run with esp=True")
        check_tensor_parallel(ModelConfig.from_dir(model_dir), tp)
        self.cfg, params = _load(model_dir, dtype, params_cache)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        options = dict(scheduler_options or {})
        self.scheduler = schedulers.make(scheduler, **options)
        self.max_model_len = int(max_model_len or min(self.cfg.max_position_embeddings, 4096))
        max_num_seqs = int(getattr(self.scheduler, "max_num_seqs", options.get("max_num_seqs", 256)))
        if num_blocks is None:
            num_blocks = kv_blocks_for(self.cfg, block_size, kv_cache_gb, self.max_model_len, max_num_seqs, tp)
            num_blocks *= sp if esp else 1  # a pool per ESP device
        if esp and num_blocks % sp:
            raise ValueError(f"num_blocks={num_blocks} must split evenly over sp={sp} ESP devices")
        self.kv = KVConfig(num_blocks=num_blocks, block_size=block_size, num_host_blocks=num_host_blocks)
        enable_persistent_cache(compile_cache)
        options = dict(
            max_model_len=self.max_model_len, block_rows=block_rows, attention=attention, seed=seed,
            max_compiled_shapes=max_compiled_shapes,
        )  # fmt: skip
        if esp:
            self.runner = EspRunner(self.cfg, params, self.kv, mesh=sequence_mesh(size=sp), policy=esp_policy, **options)
        else:
            self.runner = ModelRunner(self.cfg, params, self.kv, mesh=mesh_for(tp, sp), nano_batches=nano_batches, **options)
        self.engine = Engine(self.runner, self.scheduler, self.kv, async_scheduling=async_scheduling)
        self.stop_at_eos = stop_at_eos
        self._next_id = 0

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        sampling: SamplingParams | None = None,
        *,
        return_rejections: bool = False,
    ) -> list[Completion]:
        """Completes every prompt (text, or token ids) with ``sampling`` (default: 16 greedy tokens).

        A prompt the engine cannot serve (prompt + ``max_new_tokens`` over ``max_model_len`` or the KV
        cache, token ids outside the vocabulary, over the scheduler's step budget) raises
        ``ValueError`` naming it before anything runs, as vLLM does; with ``return_rejections`` it
        comes back instead as a Completion with no tokens and ``finish_reason="rejected: <why>"``."""
        sampling = sampling or SamplingParams(max_new_tokens=16, temperature=0.0)
        if self.stop_at_eos and self.cfg.eos_token_ids:
            stops = tuple(dict.fromkeys(sampling.stop_token_ids + self.cfg.eos_token_ids))
            sampling = dataclasses.replace(sampling, stop_token_ids=stops)
        requests = [
            Request(self._new_id(), prompt_token_ids=tuple(self._encode(p)), sampling=sampling, arrival_time=0.0)
            for p in prompts
        ]
        if not return_rejections:
            for i, r in enumerate(requests):
                reason = self._refusal(r)
                if reason is not None:
                    raise ValueError(f"prompt {i} (request {r.request_id!r}) cannot be served: {reason}")
        run = self.engine.serve(requests)
        rejected = {run.log.requests[i].request_id: reason for i, reason in run.log.rejected.items()}
        out = []
        for r in requests:
            f = run.finished.get(r.request_id)
            if f is None:
                reason = rejected.get(r.request_id, "not finished")
                out.append(Completion(r.request_id, r.prompt_token_ids, (), None, f"rejected: {reason}"))
                continue
            text = self.tokenizer.decode(f.output_token_ids) if self.tokenizer else None
            out.append(Completion(r.request_id, r.prompt_token_ids, f.output_token_ids, text, f.finish_reason, f.num_preemptions))
        return out

    def _refusal(self, request: Request) -> str | None:
        """Why the engine would reject ``request`` (the runner's and the scheduler's checks, on a
        throwaway state: both are free of side effects here), or None."""
        try:
            self.runner.register(request)
            self.scheduler.add_request(self.scheduler.init(self.kv), request, 0.0)
        except ValueError as e:
            return str(e)
        finally:
            self.runner.release(request.request_id)
        return None

    def warmup(self, max_decode_rows: int | None = None, max_blocks: int | None = None, mixed: bool = True) -> int:
        """Compiles the step for every bucket shape up to these sizes (defaults: the scheduler's
        ``max_num_seqs`` decode rows and its token budget in prefill blocks); returns the count."""
        max_seqs, budget = step_limits(self.scheduler)
        max_decode_rows = max_decode_rows or max_seqs
        max_blocks = max_blocks or math.ceil(budget / self.runner.spec.block_rows) + 1
        return self.runner.warmup(max_decode_rows, max_blocks, mixed=mixed)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir!r} has no tokenizer.json; pass prompts as token id lists")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def _new_id(self) -> str:
        self._next_id += 1
        return f"gen-{self._next_id - 1}"


def _load(model_dir: str, dtype: str | None, params_cache: str | None):
    if params_cache and checkpoint.has_params(params_cache):
        cfg = ModelConfig.from_dir(model_dir)
        if dtype is not None:
            cfg = cfg.replace(dtype=str(jnp.dtype(dtype)))
        return checkpoint.restore_params(params_cache, cfg)
    cfg, params = load_model(model_dir, dtype)
    if params_cache:
        checkpoint.save_params(params_cache, cfg, params)
    return cfg, params
