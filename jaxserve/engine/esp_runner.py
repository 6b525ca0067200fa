"""``EspRunner``: the ModelRunner under LoongServe's elastic sequence parallelism (ESP).

The runner's devices form one ESP group (a 1-D ``"sp"`` mesh of ``n`` devices). Each device holds
its own paged KV pool of ``num_blocks / n`` pages (plus ``stage_pages`` staging pages); the
scheduler and BatchPlan are those of one device with ``num_blocks`` blocks, and the engine decides
where each block's page lives (``esp_pages``, by the pure policy ``esp_policy``):

* a long prefill (``prefill_degree``) is split over ``k`` devices: its new pages are staged zig-zag
  over them, and each device attends over what it stages (plus earlier KV where it lies);
* its KV rows are written, in the same step, straight into the pages of the devices that will
  decode it (proactive scale-down: the policy packs the request onto as few devices as hold it);
* a decode whose KV spans several devices is attended by all of them, partials combined by
  log-sum-exp (multi-master decode); when its devices fill up, new pages go to the emptiest device
  (scale-up).

Weights are replicated over the group and the dense layers' rows split over it. Tokens equal the
single-device runner's (the attention only sums in another order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.engine.esp_packing import esp_batch, esp_warmup_batch
from jaxserve.engine.esp_pages import EspPages
from jaxserve.engine.esp_policy import EspPolicy
from jaxserve.engine.model_runner import ModelRunner
from jaxserve.engine.packing import HostBatch
from jaxserve.kv.config import KVConfig
from jaxserve.model.config import ModelConfig
from jaxserve.parallel.esp_attention import batch_specs, esp_attention
from jaxserve.parallel.mesh import SP_AXIS
from jaxserve.parallel.tensor_parallel import Placement
from jaxserve.plan import BatchPlan
from jaxserve.request import Request
from jaxserve.runtime.step_geometry import bucket


def _gather_at(caches, dev, page):
    """``[L, 2, Hkv, m, page_size, D]``: page ``page[i]`` of device ``dev[i]``, every layer."""
    return jnp.stack([jnp.stack([jnp.swapaxes(k[dev, :, page], 0, 1), jnp.swapaxes(v[dev, :, page], 0, 1)]) for k, v in caches])


def _scatter_at(caches, pages, dev, page):
    """Writes ``pages [L, 2, Hkv, m, page_size, D]`` to page ``page[i]`` of device ``dev[i]``
    (an out-of-range page drops: padding)."""
    return tuple(
        (
            k.at[dev, :, page].set(jnp.swapaxes(pages[i, 0], 0, 1), mode="drop"),
            v.at[dev, :, page].set(jnp.swapaxes(pages[i, 1], 0, 1), mode="drop"),
        )
        for i, (k, v) in enumerate(caches)
    )


def _copy_at(caches, src_dev, src_page, dst_dev, dst_page):
    return _scatter_at(caches, _gather_at(caches, src_dev, src_page), dst_dev, dst_page)


def esp_placement(cfg: ModelConfig, params: dict, mesh: Mesh) -> Placement:
    """``params`` replicated over ``mesh`` (``"sp"`` only), the step's rows split over it for the
    dense layers, and attention by ``esp_attention``; a layer's pages ``[n, Hkv, pages, page_size,
    D]`` split over ``"sp"`` on the first axis."""
    if tuple(mesh.shape) != (SP_AXIS,):
        raise ValueError(f"the ESP mesh must have the one axis {SP_AXIS!r}, got {tuple(mesh.shape)}")
    replicated = NamedSharding(mesh, P())

    def wrap_attention(attend):
        # attend is paged_attention with its options bound; ESP keeps the options, not the kernel
        options = {name: attend.keywords[name] for name in ("sm_scale", "sliding_window", "chunk_pages")}
        return esp_attention(mesh, **options)

    def identity(x):
        return x

    return Placement(
        cfg=cfg,
        shards=1,
        params=jax.device_put(params, replicated),
        kv=NamedSharding(mesh, P(SP_AXIS)),
        replicated=replicated,
        split_rows=functools.partial(jax.lax.with_sharding_constraint, shardings=NamedSharding(mesh, P(SP_AXIS))),
        wrap_attention=wrap_attention,
        gather=identity,
        kv_head_of=None,
        kv_copy_of=None,
    )


class EspRunner(ModelRunner):
    """See the module docstring. ``mesh``: a 1-D ``"sp"`` mesh (``parallel.mesh.sequence_mesh``)
    whose size divides ``kv.num_blocks``; ``policy``: the ESP policy; ``stage_pages``: staging pages
    per device (default: one sequence's page-table width). Other options as ``ModelRunner``'s
    (``attention`` picks nothing here: the step always attends with ``parallel.esp_attention``)."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: dict,
        kv: KVConfig,
        *,
        mesh: Mesh,
        policy: EspPolicy | None = None,
        stage_pages: int | None = None,
        **options,
    ):
        n = mesh.shape.get(SP_AXIS, 0)
        if n < 1 or kv.num_blocks % n:
            raise ValueError(f"kv.num_blocks={kv.num_blocks} must split evenly over the {n} ESP devices")
        self.num_devices = n
        self.pages_per_device = kv.num_blocks // n
        self._stage_option = stage_pages
        super().__init__(cfg, params, kv, mesh=mesh, **options)
        self.pages = EspPages(n, self.pages_per_device, self.stage_pages, kv.block_size, policy or EspPolicy())
        self._gather_at = jax.jit(_gather_at)
        self._scatter_at = jax.jit(_scatter_at, donate_argnums=(0,), out_shardings=self._cache_shardings)
        self._copy_at = jax.jit(_copy_at, donate_argnums=(0,), out_shardings=self._cache_shardings)
        self.last_rows = []  # the last step's RowPages, one per plan row

    @property
    def local_pages(self) -> int:
        """Pages of one device's cache: its pool, then its staging pages (the next index drops)."""
        return self.pages_per_device + self.stage_pages

    def _place(self, cfg, params, mesh) -> Placement:
        return esp_placement(cfg, params, mesh)

    def _cache_shape(self, place: Placement) -> tuple[int, ...]:
        # called by ModelRunner.__init__ once ``spec`` exists
        self.stage_pages = self.spec.pages_per_seq if self._stage_option is None else int(self._stage_option)
        return (self.num_devices, place.cfg.num_kv_heads, self.local_pages, self.kv.block_size, self.cfg.head_dim)

    # -- requests ------------------------------------------------------------------------------
    def register(self, request: Request) -> None:
        super().register(request)
        self.pages.register(request.request_id, request.prompt_len, request.max_total_tokens)

    def release(self, request_id: str) -> None:
        super().release(request_id)
        self.pages.release(request_id)

    def set_prefill_degree(self, request_id: str, degree: int | None) -> None:
        """Prefill a registered request over ``degree`` devices (None: as the policy says)."""
        self.pages.set_prefill_degree(request_id, degree)

    # -- the step ------------------------------------------------------------------------------
    def _pack(self, plan: BatchPlan) -> HostBatch:
        host = super()._pack(plan)
        rows = self.last_rows = self.pages.prepare(plan)  # kept for inspection
        return esp_batch(
            plan, host, rows, num_devices=self.num_devices, local_pages=self.local_pages, entries=self.spec.pages_per_seq
        )

    def _warmup_batches(self, shape):
        kw = {"num_devices": self.num_devices, "local_pages": self.local_pages, "entries": self.spec.pages_per_seq}
        return tuple(esp_warmup_batch(b, **kw) for b in super()._warmup_batches(shape))

    def _run(self, batch: HostBatch, all_logits: bool):
        # Committed inputs: left to itself, XLA may give a small uncommitted input an "sp" split
        # its shape does not divide.
        mesh = self.mesh
        per_device = jax.tree.map(lambda spec: NamedSharding(mesh, spec), batch_specs())
        attn = jax.device_put(batch.attn, per_device)
        rest = jax.device_put((batch.token_ids, batch.logits_rows, tuple(batch.sampling)), NamedSharding(mesh, P()))
        return self._steps[all_logits](self.params, self.caches, rest[0], attn, rest[1], rest[2])

    def _addresses(self, blocks, drop: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(devices, pages)`` of bound logical ``blocks``, padded to a bucket with dropped slots."""
        m = bucket(max(len(blocks), 1))
        dev = np.zeros(m, np.int32)
        page = np.full(m, self.local_pages if drop else 0, np.int32)
        for i, b in enumerate(blocks):
            dev[i], page[i] = self.pages.where(int(b))
        return dev, page

    def _read(self, blocks) -> np.ndarray:
        dev, page = self._addresses(blocks, drop=False)
        return np.asarray(self._gather_at(self.caches, dev, page))[:, :, :, : len(blocks)]

    def _write(self, blocks, payload: np.ndarray) -> None:
        dev, page = self._addresses(blocks)
        pages = np.zeros(payload.shape[:3] + (len(page),) + payload.shape[4:], payload.dtype)
        pages[:, :, :, : len(blocks)] = payload
        self.caches = self._scatter_at(self.caches, pages, dev, page)

    def _apply_memory_ops(self, plan: BatchPlan) -> None:
        """Swap-outs (read, then the requests' pages freed), preempted requests' pages freed,
        swap-ins and copy-on-write copies (each destination bound next to its source)."""
        if plan.swap_out_blocks:
            src = [s for s, _ in plan.swap_out_blocks]
            self.host_pages[:, :, :, [h for _, h in plan.swap_out_blocks]] = self._read(src)
        for rid in plan.preempted + plan.swapped_out:
            self.pages.drop_kv(rid)
        if plan.swap_in_blocks:
            dst = [d for _, d in plan.swap_in_blocks]
            for b in dst:
                self.pages.bind_anywhere(b)
            self._write(dst, self.host_pages[:, :, :, [h for h, _ in plan.swap_in_blocks]])
        if plan.copy_blocks:
            src_dev, src_page = self._addresses([s for s, _ in plan.copy_blocks], drop=False)
            for s, d in plan.copy_blocks:
                self.pages.bind_anywhere(d, near=self.pages.where(s)[0])
            dst_dev, dst_page = self._addresses([d for _, d in plan.copy_blocks])
            self.caches = self._copy_at(self.caches, src_dev, src_page, dst_dev, dst_page)

    # -- KV contents (migration, phase hand-off) -------------------------------------------------
    def read_kv(self, blocks) -> np.ndarray:
        blocks = [int(b) for b in blocks]
        self._check_pages(blocks)
        return self._read(blocks) if blocks else np.zeros(self._payload_shape(0), self.host_dtype)

    def write_kv(self, blocks, payload) -> None:
        """Binds ``blocks`` (each on the emptiest device) and writes ``payload`` into them."""
        blocks = [int(b) for b in blocks]
        self._check_pages(blocks)
        want = self._payload_shape(len(blocks))
        if payload is None or tuple(payload.shape) != want or payload.dtype != self.host_dtype:
            got = None if payload is None else (tuple(payload.shape), payload.dtype)
            raise ValueError(f"write_kv: a {self.host_dtype} payload of shape {want} is needed, got {got}")
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"write_kv: blocks {blocks} name a block twice")
        if blocks:
            for b in blocks:
                self.pages.bind_anywhere(b)
            self._write(blocks, payload)

    def prepare_kv_copy(self, num_blocks: int) -> None:
        n = bucket(max(int(num_blocks), 1))
        if n in self._kv_copy_ready:
            return
        dev, page = np.zeros(n, np.int32), np.full(n, self.local_pages, np.int32)
        jax.block_until_ready(self._gather_at(self.caches, dev, np.zeros(n, np.int32)))
        self.caches = self._scatter_at(self.caches, np.zeros(self._payload_shape(n), self.host_dtype), dev, page)
        jax.block_until_ready(self.caches)
        self._kv_copy_ready.add(n)

    def _payload_shape(self, n: int) -> tuple[int, ...]:
        return (self.cfg.num_layers, 2, self.cfg.num_kv_heads, n, self.kv.block_size, self.cfg.head_dim)
