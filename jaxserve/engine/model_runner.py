"""ModelRunner: executes BatchPlans on a jit-compiled Llama-family model with a paged KV cache.

``execute(plan) -> StepOutput`` does what the plan asks before the step (copy-on-write page copies,
swap-out to and swap-in from a host pool), packs the plan into bucketed arrays
(``engine/packing.py``), runs one jitted step (model + sampling) with the per-layer caches donated,
and returns the sampled tokens and the step's measured wall time (a bucket shape's first use
compiles it first, outside the timed part, so no step time contains a compilation; at most
``max_compiled_shapes`` stay compiled, see ``engine/compilation.py``). The runner keeps no scheduling
state: block tables, token ids and positions all come from the plan; it only needs each request's
sampling parameters (``register``/``release``).
"""

from __future__ import annotations

import functools
import time
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.engine.compilation import default_max_compiled_shapes
from jaxserve.engine.packing import HostBatch, PackSpec, RequestSampling, pack, warmup_batches
from jaxserve.kv.config import KVConfig
from jaxserve.model.attention import ATTENTION_IMPLS, default_attention_impl, paged_attention
from jaxserve.model.config import ModelConfig
from jaxserve.model.llama import bind
from jaxserve.model.nano_batch import nano_split
from jaxserve.model.sampling import sample
from jaxserve.parallel.tensor_parallel import Placement, on_mesh, single_device
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import Request
from jaxserve.runtime.executor import Executor
from jaxserve.runtime.step_geometry import StepGeometry, bucket, bucket_sizes


def _step_fn(
    params,
    caches,
    token_ids,
    attn,
    logits_rows,
    sampling,
    *,
    cfg,
    shards,
    split_rows,
    wrap_attention,
    gather,
    impl,
    chunk_pages,
    all_logits,
    block_rows,
    nano_batches,
    on_trace,
):
    on_trace()  # runs once per compilation: counts them
    model = bind(cfg, params, shards=shards)
    attend = functools.partial(
        paged_attention,
        impl=impl,
        sm_scale=cfg.head_dim**-0.5,
        sliding_window=cfg.sliding_window,
        chunk_pages=chunk_pages,
    )
    # Nano-batch boundaries follow from the bucket shape: no compiled shape of their own.
    nano = nano_split(attn.num_decode_rows, attn.num_blocks, block_rows, nano_batches)
    hidden, caches = model(split_rows(token_ids), caches, attn, wrap_attention(attend), nano=nano)
    logits = gather(model.logits(hidden[logits_rows]))  # the whole vocabulary: sampling sorts it
    tokens = sample(logits, *sampling)
    return tokens, caches, (gather(model.logits(hidden)) if all_logits else None)


def _copy_pages(caches, src, dst):
    """Copies pages ``src -> dst`` in every layer; ``dst == num_pages`` entries are padding (dropped)."""
    return tuple(
        (
            k.at[:, dst].set(k[:, src], mode="drop"),
            v.at[:, dst].set(v[:, src], mode="drop"),
        )
        for k, v in caches
    )


def _gather_pages(caches, src):
    """``[L, 2, Hkv, n, page_size, D]``: the pages ``src`` of every layer (for swap-out)."""
    return jnp.stack([jnp.stack([k[:, src], v[:, src]]) for k, v in caches])


def _scatter_pages(caches, pages, dst):
    """Writes ``pages [L, 2, Hkv, n, page_size, D]`` to ``dst`` (swap-in; padding dst dropped)."""
    return tuple(
        (
            k.at[:, dst].set(pages[i, 0], mode="drop"),
            v.at[:, dst].set(pages[i, 1], mode="drop"),
        )
        for i, (k, v) in enumerate(caches)
    )


def default_seed(request_id: str, engine_seed: int) -> int:
    """A request's sampling seed when it sets none: stable across runs and batch compositions."""
    return (zlib.crc32(request_id.encode()) + 1_000_003 * engine_seed) % (1 << 32)


class ModelRunner(Executor):
    """See the module docstring. ``max_model_len`` bounds prompt + output tokens per request;
    ``buckets_per_octave`` (decode rows, prefill blocks) trades compilations for padding
    (``packing.bucket``); ``max_compiled_shapes`` (default: from the process's memory-map limit)
    bounds the step shapes kept compiled: a new shape past it drops every compiled step and starts
    over (with jax's persistent cache on, a dropped shape's next compilation is a file read).
    ``mesh``: a ``jax.sharding.Mesh`` with a ``"tp"`` axis to run tensor-parallel on
    (``jaxserve.parallel.tensor_parallel``); None: everything on the first device.
    ``nano_batches``: split each step's rows into this many nano-batches whose attention and GEMMs
    (and collectives) may overlap (``model/nano_batch.py``; the same logits); 1: off."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: dict,
        kv: KVConfig,
        *,
        max_model_len: int | None = None,
        block_rows: int = 32,
        attention: str = "auto",
        chunk_pages: int = 8,
        seed: int = 0,
        buckets_per_octave: tuple[int, int] = (2, 4),
        max_compiled_shapes: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
        nano_batches: int = 1,
    ):
        self.cfg = cfg
        nano_split(0, 0, block_rows, nano_batches)  # ValueError naming nano_batches if it is bad
        self.nano_batches = nano_batches
        self.kv = kv
        self.max_model_len = int(
            max_model_len
            or min(cfg.max_position_embeddings, kv.num_blocks * kv.block_size)
        )
        impl = default_attention_impl() if attention == "auto" else attention
        if impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention={attention!r}; expected 'auto' or one of {sorted(ATTENTION_IMPLS)}"
            )
        self.attention = impl
        self.chunk_pages = int(chunk_pages)
        self.seed = int(seed)
        # Slack of one block of rows: the ragged layout may address a chunk's padded rows past its end.
        pages = -(-(self.max_model_len + block_rows) // kv.block_size)
        pages = -(-pages // chunk_pages) * chunk_pages
        self.spec = PackSpec(
            num_pages=kv.num_blocks,
            page_size=kv.block_size,
            pages_per_seq=pages,
            block_rows=block_rows,
            decode_per_octave=buckets_per_octave[0],
            blocks_per_octave=buckets_per_octave[1],
        )
        self.geometry: StepGeometry = self.spec.geometry(impl, self.chunk_pages)
        dtype = jnp.dtype(cfg.dtype)
        self.mesh = mesh
        place = self._place(cfg, params, mesh)
        self.params = place.params
        # Under tensor parallelism the cache may hold more KV heads than the checkpoint (replicas
        # when fewer than tp); read_kv/write_kv payloads keep the checkpoint's heads.
        self._kv_head_of, self._kv_copy_of = place.kv_head_of, place.kv_copy_of
        shape = self._cache_shape(place)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=place.kv)
        self.caches = tuple((zeros(), zeros()) for _ in range(cfg.num_layers))
        self._cache_shardings = tuple((place.kv, place.kv) for _ in range(cfg.num_layers))
        host_shape = (cfg.num_layers, 2, place.cfg.num_kv_heads, kv.num_host_blocks, kv.block_size, cfg.head_dim)
        self.host_pages = np.zeros(host_shape, dtype) if kv.num_host_blocks else None
        cap = default_max_compiled_shapes() if max_compiled_shapes is None else max_compiled_shapes
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise ValueError(f"max_compiled_shapes must be an int >= 1, got {max_compiled_shapes!r}")
        self.max_compiled_shapes = cap
        self.num_compilations = 0  # step functions traced (each trace is one compilation)
        self.compile_seconds = 0.0  # wall time of every shape's first runs (compilation included)
        self.num_evictions = 0  # times the compiled steps were dropped to stay under the cap
        self._compiled: set[tuple[tuple[int, int], bool]] = set()  # (shape, all_logits) compiled now
        self._sampling: dict[str, RequestSampling] = {}
        self._kv_copy_ready: set[int] = set()  # block-count buckets whose KV gather/scatter is compiled
        jit = functools.partial(
            jax.jit, donate_argnums=(1,), out_shardings=(place.replicated, self._cache_shardings, place.replicated)
        )
        self._steps = {
            flag: jit(
                functools.partial(
                    _step_fn,
                    cfg=place.cfg,
                    shards=place.shards,
                    split_rows=place.split_rows,
                    wrap_attention=place.wrap_attention,
                    gather=place.gather,
                    impl=impl,
                    chunk_pages=chunk_pages,
                    all_logits=flag,
                    block_rows=block_rows,
                    nano_batches=nano_batches,
                    on_trace=self._count_trace,
                )
            )
            for flag in (False, True)
        }
        self._copy = jax.jit(_copy_pages, donate_argnums=(0,), out_shardings=self._cache_shardings)
        self._scatter = jax.jit(_scatter_pages, donate_argnums=(0,), out_shardings=self._cache_shardings)
        self._gather = jax.jit(_gather_pages)
        self._input_gather = jax.jit(_gather_inputs, out_shardings=place.replicated)
        self._ids_sharding = place.replicated
        self._input_gather_ready: set[tuple[int, int]] = set()  # (rows, previous slots) compiled

    def _count_trace(self):
        self.num_compilations += 1

    # -- what a subclass with another KV layout overrides (engine/esp_runner.py) ----------------
    def _place(self, cfg: ModelConfig, params: dict, mesh) -> Placement:
        """The model on its devices: the first device, or ``mesh`` (tensor parallel)."""
        return single_device(cfg, params, jax.devices()[0]) if mesh is None else on_mesh(cfg, params, mesh)

    def _cache_shape(self, place: Placement) -> tuple[int, ...]:
        """One layer's K (or V) pages: ``[Hkv, num_pages, page_size, D]``."""
        return (place.cfg.num_kv_heads, self.kv.num_blocks, self.kv.block_size, self.cfg.head_dim)

    def _pack(self, plan: BatchPlan) -> HostBatch:
        """The plan as the step's host arrays (``packing.pack``)."""
        return pack(plan, self.spec, self._sampling)

    def _warmup_batches(self, shape: tuple[int, int]) -> tuple[HostBatch, ...]:
        """Padding-only batches of ``shape`` that run every path of the step (``packing.warmup_batches``)."""
        return warmup_batches(shape, self.spec)

    # -- requests ------------------------------------------------------------------------------
    def register(self, request: Request) -> None:
        sp = request.sampling
        if request.max_total_tokens > self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: prompt + max_new_tokens = {request.max_total_tokens} "
                f"exceeds max_model_len={self.max_model_len}"
            )
        if not request.has_real_tokens:
            raise ValueError(
                f"request {request.request_id!r} has only a prompt length; the engine needs token ids"
            )
        vocab = self.cfg.vocab_size
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"request {request.request_id!r}: prompt token id {bad[0]} is outside the vocabulary [0, {vocab})"
            )
        seed = (
            sp.seed
            if sp.seed is not None
            else default_seed(request.request_id, self.seed)
        )
        self._sampling[request.request_id] = RequestSampling(
            request.prompt_len, sp.temperature, sp.top_k, sp.top_p, seed % (1 << 32)
        )

    def release(self, request_id: str) -> None:
        self._sampling.pop(request_id, None)

    # -- execution -----------------------------------------------------------------------------
    def execute(self, plan: BatchPlan) -> StepOutput:
        return self._execute(plan, all_logits=False)[0]

    def execute_with_logits(
        self, plan: BatchPlan
    ) -> tuple[StepOutput, dict[str, np.ndarray]]:
        """Also returns float32 logits ``[num_new_tokens, vocab]`` of every row of every request."""
        return self._execute(plan, all_logits=True)

    def _execute(self, plan: BatchPlan, all_logits: bool):
        return self.collect(self.launch(self.prepare(plan, all_logits)))

    # -- a step in three parts, for a loop that schedules step N+1 while step N runs -----------
    # (``runtime/pipelined.py``): ``prepare`` (memory ops, packing, a first use's compilation),
    # ``launch`` (dispatch: returns at once, the device runs on) and ``collect`` (waits for the
    # sampled tokens). ``execute`` is the three back to back. Every call chains on ``self.caches``,
    # so the device runs launched steps and memory ops in call order whatever the host does.
    def prepare(self, plan: BatchPlan, all_logits: bool = False) -> "PreparedStep":
        """Applies ``plan``'s swaps and copies (ordered after every step launched before), packs it
        and compiles its bucket shape on first use. Call ``launch`` on the result before preparing
        another plan."""
        start = time.perf_counter()
        self._apply_memory_ops(plan)
        if plan.num_seqs == 0:
            return PreparedStep(plan, None, all_logits, start, 0.0)
        batch = self._pack(plan)
        compile_s = self._compile(batch.shape_key, all_logits)
        return PreparedStep(plan, batch, all_logits, start, compile_s)

    def launch(self, prepared: "PreparedStep", patch: tuple[np.ndarray, np.ndarray] | None = None,
               after: tuple[np.ndarray, np.ndarray, "LaunchedStep"] | None = None) -> "LaunchedStep":
        """Dispatches the prepared step and returns without waiting for it. The input ids of some
        decode rows are placeholders in the plan (the previous step's tokens): ``patch = (plan
        rows, token ids)`` writes them on the host; ``after = (plan rows, indices, launched)`` takes
        them on the device from entries ``indices`` (plan order) of the tokens of ``launched``, which
        may still be running: nothing waits. ``compile_s`` of the result: a first use's compilation
        of that gather."""
        batch = prepared.batch
        if batch is None:
            return LaunchedStep(prepared, None, None, 0.0)
        compile_s = 0.0
        if patch is not None and len(patch[0]):
            rows, ids = patch
            token_ids = batch.token_ids.copy()
            token_ids[batch.first_rows[rows]] = ids
            batch = batch._replace(token_ids=token_ids)
        if after is not None and len(after[0]):
            rows, index, prev = after
            prev_slots = np.fromiter((slot for _, slot in prev.prepared.batch.sampled), np.int32)
            src = np.full(len(batch.token_ids), -1, np.int32)
            src[batch.first_rows[rows]] = prev_slots[index]
            compile_s = self._ready_input_gather(len(src), prev.tokens.shape[0])
            batch = batch._replace(token_ids=self._input_gather(batch.token_ids, src, prev.tokens))
        tokens, self.caches, logits = self._run(batch, prepared.all_logits)
        return LaunchedStep(prepared, tokens, logits, compile_s)

    def _ready_input_gather(self, num_rows: int, num_prev: int) -> float:
        """Compiles the input gather for ``num_rows`` rows from ``num_prev`` slots on first use (on
        zeros, independent of any step); returns the seconds it took."""
        if (num_rows, num_prev) in self._input_gather_ready:
            return 0.0
        start = time.perf_counter()
        prev = jnp.zeros(num_prev, jnp.int32)
        jax.block_until_ready(self._input_gather(np.zeros(num_rows, np.int32), np.full(num_rows, -1, np.int32), prev))
        self._input_gather_ready.add((num_rows, num_prev))
        elapsed = time.perf_counter() - start
        self.compile_seconds += elapsed
        return elapsed

    @staticmethod
    def is_done(launched: "LaunchedStep") -> bool:
        """Whether a launched step's tokens are ready (``collect`` would not wait)."""
        return launched.tokens is None or launched.tokens.is_ready()

    def collect(self, launched: "LaunchedStep"):
        """Waits for a launched step: ``(StepOutput, per-request logits)`` (logits only for a step
        prepared with ``all_logits``). The duration runs from ``prepare`` to now, less compilation."""
        prepared = launched.prepared
        plan, batch = prepared.plan, prepared.batch
        if batch is None:
            return StepOutput({}, duration_s=time.perf_counter() - prepared.start), {}
        tokens = np.asarray(launched.tokens)
        slots = np.fromiter((slot for _, slot in batch.sampled), np.int64, len(batch.sampled))
        per_request = {}
        if prepared.all_logits:
            per_request = self._split_logits(plan, batch, np.asarray(launched.logits))
        duration = time.perf_counter() - prepared.start - prepared.compile_s
        return StepOutput.for_plan(plan, tokens[slots], duration_s=duration), per_request

    def _compile(self, shape: tuple[int, int], all_logits: bool) -> float:
        """Compiles a bucket shape on its first use, by steps on padding rows that run each of its
        data-dependent paths (``packing.warmup_batches``; no KV changes); returns the seconds that
        took (0 if already compiled), which the step's measured time leaves out: a step's duration
        is its run time, never a compilation or a first run."""
        if (shape, all_logits) in self._compiled:
            return 0.0
        start = time.perf_counter()
        if len(self._compiled) >= self.max_compiled_shapes:
            self._evict_compiled()
        for batch in self._warmup_batches(shape):
            tokens, self.caches, _ = self._run(batch, all_logits)
        tokens.block_until_ready()  # the caches were donated: keep the returned ones
        self._compiled.add((shape, all_logits))
        elapsed = time.perf_counter() - start
        self.compile_seconds += elapsed
        return elapsed

    def _evict_compiled(self) -> None:
        """Drops every compiled step shape (jit caches cannot drop one entry; the memory maps of
        the executables go with them)."""
        for step in self._steps.values():
            step.clear_cache()
        self._compiled.clear()
        self.num_evictions += 1

    @property
    def num_compiled_shapes(self) -> int:
        """Step shapes compiled and kept now (at most ``max_compiled_shapes``)."""
        return len(self._compiled)

    def _run(self, batch: HostBatch, all_logits: bool):
        # Input ids committed where the step's tokens live, as ids gathered from a previous step's
        # tokens on the device are (``launch(after=)``): one compiled step serves both.
        token_ids = batch.token_ids
        if isinstance(token_ids, np.ndarray):
            token_ids = jax.device_put(token_ids, self._ids_sharding)
        return self._steps[all_logits](
            self.params,
            self.caches,
            token_ids,
            batch.attn,
            batch.logits_rows,
            tuple(batch.sampling),
        )

    @staticmethod
    def _split_logits(
        plan: BatchPlan, batch: HostBatch, logits: np.ndarray
    ) -> dict[str, np.ndarray]:
        rows = zip(
            plan.request_ids, batch.first_rows.tolist(), plan.num_new_tokens.tolist()
        )
        return {rid: logits[first : first + n] for rid, first, n in rows}

    def _apply_memory_ops(self, plan: BatchPlan) -> None:
        if plan.swap_out_blocks:
            k = len(plan.swap_out_blocks)
            src = np.zeros(bucket(k), np.int32)
            src[:k] = [d for d, _ in plan.swap_out_blocks]
            host = [h for _, h in plan.swap_out_blocks]
            self.host_pages[:, :, :, host] = np.asarray(self._gather(self.caches, src))[
                :, :, :, :k
            ]
        if plan.swap_in_blocks:
            n = bucket(len(plan.swap_in_blocks))
            dst = np.full(n, self.spec.num_pages, np.int32)
            dst[: len(plan.swap_in_blocks)] = [d for _, d in plan.swap_in_blocks]
            pages = np.zeros(
                self.host_pages.shape[:3] + (n,) + self.host_pages.shape[4:],
                self.host_pages.dtype,
            )
            pages[:, :, :, : len(plan.swap_in_blocks)] = self.host_pages[
                :, :, :, [h for h, _ in plan.swap_in_blocks]
            ]
            self.caches = self._scatter(self.caches, pages, dst)
        if plan.copy_blocks:
            n = bucket(len(plan.copy_blocks))
            src = np.zeros(n, np.int32)
            dst = np.full(n, self.spec.num_pages, np.int32)
            src[: len(plan.copy_blocks)] = [s for s, _ in plan.copy_blocks]
            dst[: len(plan.copy_blocks)] = [d for _, d in plan.copy_blocks]
            self.caches = self._copy(self.caches, src, dst)

    # -- KV contents, for moving a request to another runner (migration, phase hand-off) ---------
    def read_kv(self, blocks) -> np.ndarray:
        """``[L, 2, Hkv, len(blocks), page_size, D]``: the pages ``blocks`` of every layer, on the host."""
        blocks = [int(b) for b in blocks]
        self._check_pages(blocks)
        src = np.zeros(bucket(max(len(blocks), 1)), np.int32)
        src[: len(blocks)] = blocks
        pages = np.asarray(self._gather(self.caches, src))[:, :, :, : len(blocks)]
        return pages if self._kv_copy_of is None else pages[:, :, self._kv_copy_of]

    def write_kv(self, blocks, payload) -> None:
        """Writes ``payload`` (another runner's ``read_kv`` of as many blocks) into pages ``blocks``."""
        blocks = [int(b) for b in blocks]
        self._check_pages(blocks)
        want = (self.cfg.num_layers, 2, self.cfg.num_kv_heads, len(blocks), self.kv.block_size, self.cfg.head_dim)
        if payload is None or tuple(payload.shape) != want:
            got = None if payload is None else tuple(payload.shape)
            raise ValueError(f"write_kv: a payload of shape {want} is needed for {len(blocks)} blocks, got {got}")
        if payload.dtype != self.host_dtype:
            raise ValueError(f"write_kv: the payload is {payload.dtype}, this runner's KV is {self.host_dtype}")
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"write_kv: blocks {blocks} name a block twice")
        if not blocks:
            return
        n = bucket(len(blocks))
        dst = np.full(n, self.spec.num_pages, np.int32)
        dst[: len(blocks)] = blocks
        if self._kv_head_of is not None:
            payload = payload[:, :, self._kv_head_of]
        pages = np.zeros(payload.shape[:3] + (n,) + want[4:], self.host_dtype)
        pages[:, :, :, : len(blocks)] = payload
        self.caches = self._scatter(self.caches, pages, dst)

    def prepare_kv_copy(self, num_blocks: int) -> None:
        """Compiles the gather and scatter of ``num_blocks`` blocks' bucket (on padding pages:
        nothing changes), so a timed copy contains no compilation."""
        n = bucket(max(int(num_blocks), 1))
        if n in self._kv_copy_ready:
            return
        heads = self.caches[0][0].shape[0]  # the cache's (replicated under tensor parallelism)
        pages = np.zeros((self.cfg.num_layers, 2, heads, n, self.kv.block_size, self.cfg.head_dim), self.host_dtype)
        jax.block_until_ready(self._gather(self.caches, np.zeros(n, np.int32)))
        self.caches = self._scatter(self.caches, pages, np.full(n, self.spec.num_pages, np.int32))
        jax.block_until_ready(self.caches)
        self._kv_copy_ready.add(n)

    @property
    def host_dtype(self):
        return np.dtype(jnp.dtype(self.cfg.dtype))

    def _check_pages(self, blocks) -> None:
        bad = [b for b in blocks if not 0 <= b < self.kv.num_blocks]
        if bad:
            raise ValueError(f"KV block {bad[0]} is outside this runner's pool [0, {self.kv.num_blocks})")

    def warmup(self, max_decode_rows: int, max_blocks: int, mixed: bool = True, on_progress=None) -> int:
        """Compiles the bucket shapes up to these sizes (decode-only, prefill-only and, with
        ``mixed``, both), smallest first and at most ``max_compiled_shapes`` of them (more would
        only be dropped again); returns how many it ran. ``on_progress(done, total, shape)`` is
        called after each. Runs on padding rows only: no KV changes."""
        shapes = bucket_shapes(self.spec, max_decode_rows, max_blocks, mixed)[: self.max_compiled_shapes]
        for i, shape in enumerate(shapes):
            self._compile(shape, all_logits=False)
            if on_progress is not None:
                on_progress(i + 1, len(shapes), shape)
        return len(shapes)


class PreparedStep(NamedTuple):
    """A plan whose memory ops ran and whose arrays are packed (``batch`` None: no rows);
    ``start``: ``time.perf_counter()`` when preparing began; ``compile_s``: its shape's compilation."""

    plan: BatchPlan
    batch: HostBatch | None
    all_logits: bool
    start: float
    compile_s: float


class LaunchedStep(NamedTuple):
    """A dispatched step: its device arrays of sampled tokens (per slot) and logits (or None), and
    the seconds ``launch`` spent compiling (left out of step times)."""

    prepared: PreparedStep
    tokens: object
    logits: object
    compile_s: float = 0.0


def _gather_inputs(token_ids, src, prev_tokens):
    """``token_ids`` with row ``i`` replaced by ``prev_tokens[src[i]]`` where ``src[i] >= 0``."""
    return jnp.where(src >= 0, prev_tokens[jnp.maximum(src, 0)].astype(token_ids.dtype), token_ids)


def bucket_shapes(spec, max_decode_rows: int, max_blocks: int, mixed: bool = True) -> list[tuple[int, int]]:
    """Every ``(decode rows, prefill blocks)`` bucket shape of a step up to these sizes (decode-only,
    prefill-only and, with ``mixed``, both), smallest first: what a full warm-up would compile."""
    decodes = bucket_sizes(max_decode_rows, spec.min_decode_rows, spec.decode_per_octave)
    blocks = bucket_sizes(max_blocks, spec.min_blocks, spec.blocks_per_octave)
    shapes = [(d, b) for d in decodes for b in blocks if (d or b) and (mixed or not (d and b))]
    return sorted(shapes, key=lambda s: (s[0] + s[1] * spec.block_rows, s))


def step_limits(scheduler) -> tuple[int, int]:
    """``(max_num_seqs, token budget per step)`` of a scheduler, for sizing warm-up (policies that
    do not declare them get vLLM's defaults of 256 sequences and 2048 tokens)."""
    budget = getattr(scheduler, "chunk_size", None) or getattr(scheduler, "max_num_batched_tokens", 2048)
    return int(getattr(scheduler, "max_num_seqs", 256)), int(budget)
