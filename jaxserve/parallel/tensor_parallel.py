"""Tensor parallelism (Megatron-LM style) of the Llama-family engine over a mesh axis named ``"tp"``.

Sharding rules (``PARAM_RULES``; every mesh axis other than ``tp`` holds replicas):

* **Column-parallel** q|k|v and gate|up: their fused ``[out, in]`` weights (and the q|k|v bias) are
  reordered shard-major (``shard_major``, split again in the model by ``llama.split_shards``) and
  sharded by rows, so device ``i`` computes q heads ``[i Hq/tp, (i+1) Hq/tp)``, their KV heads and
  MLP columns ``[i I/tp, (i+1) I/tp)`` with no communication.
* **Row-parallel** o and down: sharded on their input dimension; XLA adds one all-reduce after each
  (two per layer), which leaves the residual stream replicated.
* **Vocab-parallel** embedding and LM head (or the tied embedding) when ``tp`` divides the vocabulary,
  else replicated; the logits are gathered to the whole vocabulary before sampling (top-k/top-p sort
  it). Norms and the o bias are replicated.
* **KV cache** ``[Hkv', num_pages, page_size, D]`` sharded by KV heads. With fewer KV heads than
  ``tp`` each KV head is replicated ``tp / Hkv`` times (as vLLM does), ``Hkv' = tp``: every device
  holds the one KV head its q heads read. ``read_kv``/``write_kv`` payloads keep the checkpoint's
  ``Hkv`` heads (``kv_copy_of`` picks one replica, ``kv_head_of`` spreads them back), so runners of
  different ``tp`` exchange KV.
* **Attention** (KV write + attend) runs in a ``jax.shard_map`` over ``tp`` (``shard_attention``):
  each device on its own heads and KV pages, so the Pallas kernels on GPU/TPU see local shapes
  that XLA never has to partition.

Requirements (``check_tensor_parallel``): ``tp`` divides the device count, the attention heads and
the MLP width, and either divides the KV heads or is a multiple of them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, Sharding, SingleDeviceSharding

from jaxserve.model.config import ModelConfig
from jaxserve.model.llama import fused_widths
from jaxserve.parallel.mesh import SP_AXIS

TP_AXIS = "tp"


def check_mesh_sizes(tp: int, sp: int, num_devices: int, keys: tuple[str, str] = ("tp", "sp")) -> None:
    """Raises ``ValueError`` naming the key (``keys``: how the caller calls tp and sp) whose size
    is not an int >= 1, or makes the mesh larger than ``num_devices`` or not a divisor of it (the
    other devices are left for more meshes of the same shape)."""
    for key, size in zip(keys, (tp, sp)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {size!r}")
    for size, what in ((tp, f"{keys[0]}={tp}"), (tp * sp, f"{keys[1]}={sp} x {keys[0]}={tp} = {tp * sp}")):
        if size > num_devices:
            raise ValueError(f"{what} is more devices than the {num_devices} jax sees")
        if num_devices % size:
            raise ValueError(f"{what} does not divide the {num_devices} devices jax sees")


def check_tensor_parallel(cfg: ModelConfig, tp: int, key: str = "tp") -> None:
    """Raises ``ValueError`` naming ``key`` when ``cfg`` does not split over ``tp`` devices."""
    hq, hkv = cfg.num_heads, cfg.num_kv_heads
    if hq % tp:
        raise ValueError(f"{key}={tp} does not divide the model's {hq} attention heads")
    if hkv % tp and tp % hkv:
        raise ValueError(
            f"{key}={tp} neither divides the model's {hkv} KV heads nor is a multiple of them "
            "(KV heads are split across devices, or replicated when fewer than tp)"
        )
    if cfg.intermediate_size % tp:
        raise ValueError(f"{key}={tp} does not divide the model's MLP width intermediate_size={cfg.intermediate_size}")


def engine_mesh(tp: int = 1, sp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D mesh ``("sp", "tp")`` over the first ``sp * tp`` of ``devices`` (default
    ``jax.devices()``); ``tp`` neighbours are adjacent devices (the fastest links on a GPU node)."""
    devices = list(jax.devices() if devices is None else devices)
    check_mesh_sizes(tp, sp, len(devices))
    return Mesh(np.array(devices[: sp * tp]).reshape(sp, tp), (SP_AXIS, TP_AXIS))


def mesh_for(tp: int, sp: int, devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """``engine_mesh(tp, sp, devices)``, or None for ``tp = sp = 1`` with no ``devices``: the
    runner's plain one-device path. ``devices``: this runner's own devices (engine replicas of a
    cluster each pass their slice, so their meshes do not all land on the first ``tp * sp``)."""
    return None if tp == sp == 1 and devices is None else engine_mesh(tp, sp, devices)


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """How ``cfg`` is laid out over ``tp`` shards (see the module docstring)."""

    cfg: ModelConfig  # the checkpoint's
    tp: int

    @property
    def kv_heads(self) -> int:
        """KV heads in the cache: the checkpoint's, or ``tp`` when it has fewer (replicated)."""
        return max(self.cfg.num_kv_heads, self.tp)

    @property
    def model_cfg(self) -> ModelConfig:
        """The model the step runs: the same numbers with the replicated KV heads."""
        return self.cfg.replace(num_kv_heads=self.kv_heads)

    @property
    def kv_head_of(self) -> np.ndarray:
        """``[kv_heads]``: the checkpoint KV head each cache head holds."""
        return np.arange(self.kv_heads) * self.cfg.num_kv_heads // self.kv_heads

    @property
    def kv_copy_of(self) -> np.ndarray:
        """``[cfg.num_kv_heads]``: one cache head holding each checkpoint KV head."""
        return np.arange(self.cfg.num_kv_heads) * self.kv_heads // self.cfg.num_kv_heads

    @property
    def vocab_parallel(self) -> bool:
        return self.cfg.vocab_size % self.tp == 0


def shard_major(pieces: Sequence[np.ndarray], shards: int) -> np.ndarray:
    """Stacks ``pieces`` (each ``[n_i, ...]``, ``shards | n_i``) as shard 0's slice of each, then
    shard 1's, ...: the row order of a fused column-parallel weight (``llama.fused_widths``)."""
    split = [p.reshape(shards, p.shape[0] // shards, *p.shape[1:]) for p in pieces]
    return np.concatenate(split, axis=1).reshape(-1, *pieces[0].shape[1:])


def _qkv(layout: TensorParallel, w: np.ndarray) -> np.ndarray:
    """q|k|v rows (weight ``[out, in]`` or bias ``[out]``) in the tensor-parallel order, KV heads
    replicated to ``layout.kv_heads``."""
    cfg = layout.cfg
    q_w, kv_w, _ = fused_widths(cfg)["qkv_proj"]
    q, k, v = np.split(w, [q_w, q_w + kv_w])

    def spread(x):  # [Hkv * D, ...] -> [kv_heads * D, ...]
        heads = x.reshape(cfg.num_kv_heads, cfg.head_dim, *x.shape[1:])[layout.kv_head_of]
        return heads.reshape(-1, *x.shape[1:])

    return shard_major([q, spread(k), spread(v)], layout.tp)


def layout_params(layout: TensorParallel, params: dict) -> dict:
    """``params`` (``llama.params_of`` order, any arrays) as host numpy arrays in the
    tensor-parallel order: what ``bind(layout.model_cfg, ..., shards=layout.tp)`` reads."""
    out = jax.tree.map(np.asarray, params)
    for layer in out["layers"].values():
        qkv = layer["attn"]["qkv_proj"]
        for name in qkv:
            qkv[name] = _qkv(layout, qkv[name])
        gate_up = layer["mlp"]["gate_up_proj"]
        gate_up["weight"] = shard_major(np.split(gate_up["weight"], 2), layout.tp)
    return out


def param_rules(layout: TensorParallel) -> tuple[tuple[str, P], ...]:
    """``(path regex, PartitionSpec)`` pairs, first match wins; paths like ``layers/3/attn/o_proj/weight``."""
    vocab = P(TP_AXIS) if layout.vocab_parallel else P()
    return (
        (r"attn/qkv_proj/(weight|bias)$", P(TP_AXIS)),  # column-parallel (rows of [out, in])
        (r"mlp/gate_up_proj/weight$", P(TP_AXIS)),
        (r"attn/o_proj/weight$", P(None, TP_AXIS)),  # row-parallel
        (r"mlp/down_proj/weight$", P(None, TP_AXIS)),
        (r"^(embed/embedding|lm_head/weight)$", vocab),
        (r"", P()),  # norms, the o bias
    )


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def param_specs(layout: TensorParallel, params: dict) -> dict:
    """The ``PartitionSpec`` of every leaf of ``params`` (same tree) by ``param_rules``."""
    rules = [(re.compile(pattern), spec) for pattern, spec in param_rules(layout)]
    return jax.tree_util.tree_map_with_path(
        lambda keys, _: next(spec for pattern, spec in rules if pattern.search(_path(keys))), params
    )


def place_params(layout: TensorParallel, params: dict, mesh: Mesh) -> dict:
    """``params`` reordered (``layout_params``) and put on ``mesh`` by ``param_specs``."""
    host = layout_params(layout, params)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(layout, host))
    return jax.device_put(host, shardings)


def kv_sharding(mesh: Mesh) -> NamedSharding:
    """A layer's K or V pages ``[Hkv', num_pages, page_size, D]``: split by KV heads."""
    return NamedSharding(mesh, P(TP_AXIS))


def shard_attention(attend: Callable, mesh: Mesh) -> Callable:
    """``attend`` (an ``llama.AttendFn``) run per device on its ``tp`` shard of the heads and KV
    pages; the step's metadata is replicated. No collectives: heads are independent. Over ``sp``
    it is replicated: q, k, v rows are gathered, every ``sp`` rank writes the same K/V into its
    copy of the cache and attends every row, and the output is split by rows again."""
    heads, pages = P(None, TP_AXIS, None), P(TP_AXIS)
    # check_vma off: the attention's fori_loop starts its carries replicated and they become
    # per-device inside the loop; nothing in it communicates, so there is nothing to check.
    sharded = jax.shard_map(
        attend,
        mesh=mesh,
        in_specs=(heads, heads, heads, (pages, pages), P()),
        out_specs=(heads, (pages, pages)),
        check_vma=False,
    )
    if mesh.shape.get(SP_AXIS, 1) == 1:
        return sharded
    rows = NamedSharding(mesh, P(SP_AXIS, TP_AXIS, None))

    def attend_then_split(q, k, v, cache, batch):
        out, cache = sharded(q, k, v, cache, batch)
        return jax.lax.with_sharding_constraint(out, rows), cache

    return attend_then_split


class Placement(NamedTuple):
    """A model placed for the engine's step: what ``ModelRunner`` needs to know about devices."""

    cfg: ModelConfig  # the model the step runs (KV heads replicated under tp)
    shards: int  # the fused weights' shard-major order (``llama.bind(..., shards=)``)
    params: dict  # on the devices
    kv: Sharding  # of one layer's K or V pages
    replicated: Sharding  # of the step's small outputs (tokens, logits)
    split_rows: Callable  # the step's token ids -> split over "sp" (so every activation row is)
    wrap_attention: Callable  # AttendFn -> AttendFn
    gather: Callable  # the logits (vocab-sharded or not) -> replicated, before sampling
    kv_head_of: np.ndarray | None  # cache head -> checkpoint KV head; None: the same heads
    kv_copy_of: np.ndarray | None  # checkpoint KV head -> a cache head holding it; None: the same


def gather_logits(logits: jax.Array, *, vocab: Sharding | None, whole: Sharding) -> jax.Array:
    """``logits [N, V]`` replicated. With a vocab-parallel LM head, pinned to vocab shards first:
    otherwise XLA may gather the whole ``[V, H]`` head onto every device instead of the ``[N, V]``
    logits (it did for a tiny model, and a head can be a gigabyte)."""
    if vocab is not None:
        logits = jax.lax.with_sharding_constraint(logits, vocab)
    return jax.lax.with_sharding_constraint(logits, whole)


def _identity(x):
    return x


def single_device(cfg: ModelConfig, params: dict, device: jax.Device) -> Placement:
    """Everything committed to ``device`` (committed from the start: a step's outputs are, and a
    jit cache keyed on uncommitted inputs would compile every shape twice)."""
    here = SingleDeviceSharding(device)
    return Placement(cfg, 1, jax.device_put(params, device), here, here, _identity, _identity, _identity, None, None)


def on_mesh(cfg: ModelConfig, params: dict, mesh: Mesh) -> Placement:
    """``params`` sharded over ``mesh``'s ``"tp"`` axis and the step's rows over its ``"sp"`` axis
    if it has one (see the module docstring); ``engine_mesh`` builds one. Raises ``ValueError``
    when the mesh has other axes or the model does not split over ``tp``."""
    if TP_AXIS not in mesh.shape or set(mesh.shape) - {TP_AXIS, SP_AXIS}:
        raise ValueError(f"the mesh has axes {tuple(mesh.shape)}; the engine needs {TP_AXIS!r} and optionally {SP_AXIS!r}")
    layout = TensorParallel(cfg, mesh.shape[TP_AXIS])
    check_tensor_parallel(cfg, layout.tp, key="the mesh's tp")
    replicated = NamedSharding(mesh, P())
    vocab = NamedSharding(mesh, P(None, TP_AXIS)) if layout.vocab_parallel else None
    split_rows = _identity
    if mesh.shape.get(SP_AXIS, 1) > 1:
        split_rows = functools.partial(jax.lax.with_sharding_constraint, shardings=NamedSharding(mesh, P(SP_AXIS)))
    return Placement(
        cfg=layout.model_cfg,
        shards=layout.tp,
        params=place_params(layout, params, mesh),
        kv=kv_sharding(mesh),
        replicated=replicated,
        split_rows=split_rows,
        wrap_attention=functools.partial(shard_attention, mesh=mesh),
        gather=functools.partial(gather_logits, vocab=vocab, whole=replicated),
        kv_head_of=layout.kv_head_of,
        kv_copy_of=layout.kv_copy_of,
    )
