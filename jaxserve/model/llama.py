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

from jaxserve.model.attention import AttentionBatch, write_kv
from jaxserve.model.config import ModelConfig
from jaxserve.model.rope import apply_rope, inv_freq, rope_tables

Cache = tuple[
    jax.Array, jax.Array
]  # (k_pages, v_pages), each [num_kv_heads, num_pages, page_size, head_dim]
AttendFn = Callable[
    [jax.Array, Cache, AttentionBatch], jax.Array
]  # q [T, Hq, D] -> [T, Hq, D]


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


def _linear(d_in: int, d_out: int, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            d,
        )
        self.q_proj = _linear(h, cfg.num_heads * d, cfg.qkv_bias, dtype, rngs)
        self.k_proj = _linear(h, cfg.num_kv_heads * d, cfg.qkv_bias, dtype, rngs)
        self.v_proj = _linear(h, cfg.num_kv_heads * d, cfg.qkv_bias, dtype, rngs)
        self.o_proj = _linear(cfg.num_heads * d, h, cfg.o_bias, dtype, rngs)

    def __call__(
        self, x, cos, sin, cache: Cache, batch: AttentionBatch, attend: AttendFn
    ):
        T = x.shape[0]
        q = apply_rope(
            self.q_proj(x).reshape(T, self.num_heads, self.head_dim), cos, sin
        )
        k = apply_rope(
            self.k_proj(x).reshape(T, self.num_kv_heads, self.head_dim), cos, sin
        )
        v = self.v_proj(x).reshape(T, self.num_kv_heads, self.head_dim)
        cache = write_kv(cache, k, v, batch)
        out = attend(q, cache, batch)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim)), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(h, i, False, dtype, rngs)
        self.up_proj = _linear(h, i, False, dtype, rngs)
        self.down_proj = _linear(i, h, False, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, cos, sin, cache, batch, attend):
        attn_out, cache = self.attn(self.input_norm(x), cos, sin, cache, batch, attend)
        x = x + attn_out
        return x + self.mlp(self.post_attn_norm(x)), cache


class LlamaForCausalLM(nnx.Module):
    """``__call__(token_ids [T], caches, batch, attend) -> (hidden [T, H], caches)``;
    ``logits(hidden [N, H]) -> [N, vocab]`` in float32."""

    def __init__(self, cfg: ModelConfig, *, dtype=None, rngs: nnx.Rngs):
        dtype = jnp.dtype(dtype or cfg.dtype)
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, rngs)
        )

    def __call__(
        self,
        token_ids,
        caches: tuple[Cache, ...],
        batch: AttentionBatch,
        attend: AttendFn,
    ):
        x = self.embed(token_ids)
        cos, sin = rope_tables(
            batch.positions, jnp.asarray(inv_freq(self.cfg))
        )  # a trace-time constant
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, cos, sin, cache, batch, attend)
            new_caches.append(cache)
        return self.norm(x), tuple(new_caches)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.embed.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)


def abstract_model(cfg: ModelConfig, dtype=None) -> LlamaForCausalLM:
    """The model with shape-only parameters (no memory, no random init), to be filled by a loader."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def bind(cfg: ModelConfig, params: dict, dtype=None) -> LlamaForCausalLM:
    """The module holding ``params`` (a nested dict as ``params_of`` returns); cheap inside ``jit``."""
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def params_of(model: LlamaForCausalLM) -> dict:
    """The model's parameters as a nested dict of arrays (what the engine jits over and orbax saves)."""
    return nnx.to_pure_dict(nnx.split(model)[1])


def random_model(cfg: ModelConfig, seed: int = 0, dtype=None) -> LlamaForCausalLM:
    """A randomly initialised model (tests and benchmarks that need no checkpoint)."""
    return LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
