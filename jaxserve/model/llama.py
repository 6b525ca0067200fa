"""A Llama-family decoder in Flax NNX (Llama 2/3, Mistral, Qwen2) that reads and writes a paged KV cache.

The engine calls it inside one ``jax.jit`` over pure arrays (``nnx.split`` outside, ``nnx.merge``
inside), with the per-layer caches donated. Numerics follow Hugging Face ``transformers``: RMSNorm in
float32 then cast, RoPE rotate-half, SiLU-gated MLP, float32 softmax.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxserve.model.attention import AttentionBatch
from jaxserve.model.config import ModelConfig
from jaxserve.model.nano_batch import NanoSplit
from jaxserve.model.rope import apply_rope, inv_freq, rope_tables

Cache = tuple[
    jax.Array, jax.Array
]  # (k_pages, v_pages), each [num_kv_heads, num_pages, page_size, head_dim]
# (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], cache, batch) -> (out [T, Hq, D], cache with k, v
# written): ``attention.paged_attention``, or that wrapped in a shard_map by tensor parallelism.
# The rows of k, v are those batch.slot_page / slot_offset address, q's those its positions and
# attention metadata do; a nano-batched step writes all rows with one call and none with the others.
AttendFn = Callable[
    [jax.Array, jax.Array, jax.Array, Cache, AttentionBatch], tuple[jax.Array, Cache]
]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(
            jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps
        )
        return self.weight[...] * normed.astype(x.dtype)


class Linear(nnx.Module):
    """``y = x @ weight.T + bias`` with ``weight [out, in]``, the layout HF checkpoints store: for a
    single row (a decode step's GEMV) XLA CPU reads ``[out, in]`` 1.0-1.4x faster than ``[in, out]``
    (most for narrow outputs such as the down projection), and a GEMM does not mind."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.lecun_normal(in_axis=1, out_axis=0)
        self.weight = nnx.Param(init(rngs.params(), (d_out, d_in), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = lax.dot_general(x, self.weight[...], (((x.ndim - 1,), (1,)), ((), ())))
        return y if self.bias is None else y + self.bias[...]


def fused_widths(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Output widths of the pieces each fused projection stacks, in the order of its weight's rows.
    Fusing q|k|v and gate|up makes two weight reads per layer out of five: a decode step is a chain
    of GEMVs, and on CPU each costs a fixed dispatch on top of its bytes (fusing saved ~12 % of a
    batch-1 step in a paired test).

    With ``shards`` > 1 (tensor parallelism) the rows are shard-major: shard ``i``'s slice of every
    piece (its q heads, k heads, v heads; its gate and up columns), then shard ``i + 1``'s, so a
    weight split into ``shards`` equal row blocks gives each device whole pieces of its own
    (``jaxserve.parallel.tensor_parallel.shard_major``); ``shards`` = 1 is the plain order."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"qkv_proj": (q, kv, kv), "gate_up_proj": (cfg.intermediate_size, cfg.intermediate_size)}


def split_shards(y: jax.Array, shards: int, widths: tuple[int, ...]) -> list[jax.Array]:
    """Splits a fused projection's output ``y [T, shards * sum(widths)]`` (shard-major, see
    ``fused_widths``; ``widths`` per shard) into its pieces ``[T, shards * w]`` in plain order. The
    reshape keeps the shard axis leading, so under tensor parallelism no device needs another's
    columns."""
    T = y.shape[0]
    cuts = [sum(widths[: i + 1]) for i in range(len(widths) - 1)]
    if shards == 1:  # the one-device step keeps its plain 2-D slices (its HLO is unchanged)
        return jnp.split(y, cuts, axis=-1)
    return [p.reshape(T, shards * w) for p, w in zip(jnp.split(y.reshape(T, shards, -1), cuts, axis=-1), widths)]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, shards: int = 1):
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.shards = shards
        self.qkv_proj = Linear(h, sum(fused_widths(cfg)["qkv_proj"]), cfg.qkv_bias, dtype, rngs)
        self.o_proj = Linear(cfg.num_heads * d, h, cfg.o_bias, dtype, rngs)

    def __call__(
        self, x, cos, sin, cache: Cache, batch: AttentionBatch, attend: AttendFn
    ):
        return self.attend(self.project(x, cos, sin), cache, batch, attend)

    def project(self, x, cos, sin) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The GEMM half before attention: ``x [T, H]`` -> ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` (RoPE applied)."""
        T, d, s = x.shape[0], self.head_dim, self.shards
        q, k, v = split_shards(
            self.qkv_proj(x),
            s,
            (self.num_heads // s * d, self.num_kv_heads // s * d, self.num_kv_heads // s * d),
        )
        q = apply_rope(q.reshape(T, self.num_heads, d), cos, sin)
        k = apply_rope(k.reshape(T, self.num_kv_heads, d), cos, sin)
        return q, k, v.reshape(T, self.num_kv_heads, d)

    def attend(self, qkv, cache: Cache, batch: AttentionBatch, attend: AttendFn):
        """KV write + attention (``attend``) and the output projection: ``(out [T, H], cache)``."""
        q = qkv[0]
        out, cache = attend(*qkv, cache, batch)
        return self.o_proj(out.reshape(q.shape[0], self.num_heads * self.head_dim)), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, shards: int = 1):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.shards, self.width = shards, i // shards  # MLP columns per shard
        self.gate_up_proj = Linear(h, 2 * i, False, dtype, rngs)
        self.down_proj = Linear(i, h, False, dtype, rngs)

    def __call__(self, x):
        gate, up = split_shards(self.gate_up_proj(x), self.shards, (self.width, self.width))
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, shards: int = 1):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype, rngs, shards)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs, shards)

    def __call__(self, x, cos, sin, cache, batch, attend):
        return self.finish(x, self.project(x, cos, sin), cache, batch, attend)

    def project(self, x, cos, sin):
        """The layer up to attention (norm, q|k|v GEMM, RoPE): ``(q, k, v)``."""
        return self.attn.project(self.input_norm(x), cos, sin)

    def finish(self, x, qkv, cache, batch, attend):
        """The rest of the layer from ``project``'s ``qkv``: KV write, attention, o, residual, MLP."""
        attn_out, cache = self.attn.attend(qkv, cache, batch, attend)
        return self.feed_forward(x + attn_out), cache

    def feed_forward(self, h):
        """The MLP half with its residual: ``h + mlp(norm(h))``."""
        return h + self.mlp(self.post_attn_norm(h))


class LlamaForCausalLM(nnx.Module):
    """``__call__(token_ids [T], caches, batch, attend) -> (hidden [T, H], caches)``;
    ``logits(hidden [N, H]) -> [N, vocab]`` in float32. ``shards``: the row order of the fused
    weights (``fused_widths``); the shapes do not depend on it."""

    def __init__(self, cfg: ModelConfig, *, dtype=None, rngs: nnx.Rngs, shards: int = 1):
        dtype = jnp.dtype(dtype or cfg.dtype)
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [DecoderLayer(cfg, dtype, rngs, shards) for _ in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, rngs)
        )

    def __call__(
        self,
        token_ids,
        caches: tuple[Cache, ...],
        batch: AttentionBatch,
        attend: AttendFn,
        nano: NanoSplit | None = None,
    ):
        x = self.embed(token_ids)
        cos, sin = rope_tables(
            batch.positions, jnp.asarray(inv_freq(self.cfg))
        )  # a trace-time constant
        if nano is not None:
            return self._nano_batched(x, cos, sin, caches, batch, attend, nano)
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, cos, sin, cache, batch, attend)
            new_caches.append(cache)
        return self.norm(x), tuple(new_caches)

    def _nano_batched(self, x, cos, sin, caches, batch, attend, nano: NanoSplit):
        """The same step as nano-batches (``model/nano_batch.py``). In each layer every nano-batch's
        q|k|v GEMM, then one KV write of all rows (with nano-batch 0's attention call), then the
        nano-batches' attention calls, writing nothing, each read-only on the same cache: a write
        per nano-batch would make XLA copy the whole cache before it (the next nano-batch's write
        must not clobber what the previous one's attention still reads; measured: one copy per
        layer's K and V). Nano-batch ``i + 1``'s attention is traced right after ``i``'s and
        before ``i``'s o / MLP GEMMs, with no data dependence between them (nor on the next
        layer's q|k|v GEMM of ``i``), so a backend that runs independent operations at once (GPU
        streams, XLA's latency-hiding scheduler; under tp, ``i``'s all-reduces too) may overlap
        them."""
        n = len(nano.parts)
        xs = [nano.take(x, i) for i in range(n)]
        rope = [(nano.take(cos, i), nano.take(sin, i)) for i in range(n)]
        reads = [nano.batch(batch, i) for i in range(n)]
        # Nano-batch 0's call writes every row's K/V; the others write none (zero rows).
        writes = [reads[0]._replace(slot_page=batch.slot_page, slot_offset=batch.slot_offset)]
        writes += [b._replace(slot_page=b.slot_page[:0], slot_offset=b.slot_offset[:0]) for b in reads[1:]]
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            qkv = []
            for i in range(n):
                with jax.named_scope(f"nano{i}_qkv"):  # names the HLO ops by nano-batch (docs' schedule)
                    qkv.append(layer.project(xs[i], *rope[i]))
            k, v = nano.merge([t[1] for t in qkv]), nano.merge([t[2] for t in qkv])
            outs = [None] * n
            with jax.named_scope("nano0_attn"):
                outs[0], cache = layer.attn.attend((qkv[0][0], k, v), cache, writes[0], attend)
            for i in range(n):
                if i + 1 < n:
                    with jax.named_scope(f"nano{i + 1}_attn"):
                        q = qkv[i + 1][0]
                        outs[i + 1], cache = layer.attn.attend((q, k[:0], v[:0]), cache, writes[i + 1], attend)
                with jax.named_scope(f"nano{i}_mlp"):
                    xs[i] = layer.feed_forward(xs[i] + outs[i])
            new_caches.append(cache)
        return self.norm(nano.merge(xs)), tuple(new_caches)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.embed.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)


def abstract_model(cfg: ModelConfig, dtype=None, shards: int = 1) -> LlamaForCausalLM:
    """The model with shape-only parameters (no memory, no random init), to be filled by a loader."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0), shards=shards))


def bind(cfg: ModelConfig, params: dict, dtype=None, shards: int = 1) -> LlamaForCausalLM:
    """The module holding ``params`` (a nested dict as ``params_of`` returns, fused rows in
    ``shards``-major order); cheap inside ``jit``."""
    graphdef, state = nnx.split(abstract_model(cfg, dtype, shards))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def params_of(model: LlamaForCausalLM) -> dict:
    """The model's parameters as a nested dict of arrays (what the engine jits over and orbax saves)."""
    return nnx.to_pure_dict(nnx.split(model)[1])


def random_model(cfg: ModelConfig, seed: int = 0, dtype=None) -> LlamaForCausalLM:
    """A randomly initialised model (tests and benchmarks that need no checkpoint)."""
    return LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
