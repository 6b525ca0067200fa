"""Tensor-parallel weight layout on one device (jaxserve.parallel.tensor_parallel): the shard-major
fused weights with replicated KV heads compute exactly what the checkpoint's layout computes, the
sharding rules give every parameter its Megatron role, and bad sizes are errors naming the key.
The sharded runs on 8 host devices are tests/engine/test_tensor_parallel.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxserve.model.config import ModelConfig
from jaxserve.model.llama import Attention, MLP, abstract_model, bind, params_of
from jaxserve.model.rope import inv_freq, rope_tables
from jaxserve.parallel.tensor_parallel import (
    TensorParallel,
    check_mesh_sizes,
    check_tensor_parallel,
    layout_params,
    param_specs,
    shard_major,
)

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=8, num_kv_heads=2,
                  head_dim=8, qkv_bias=True, o_bias=True)  # fmt: skip


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random host parameters (numpy: much faster than the model's eager initialisers)."""
    rng = np.random.default_rng(seed)
    shapes = params_of(abstract_model(cfg))
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def test_shard_major_interleaves_each_shards_slice_of_every_piece():
    a, b = np.arange(4), np.arange(10, 16)
    np.testing.assert_array_equal(shard_major([a, b], 2), [0, 1, 10, 11, 12, 2, 3, 13, 14, 15])
    np.testing.assert_array_equal(shard_major([a, b], 1), np.concatenate([a, b]))
    w = np.arange(12).reshape(6, 2)
    np.testing.assert_array_equal(shard_major([w[:2], w[2:]], 2), w[[0, 2, 3, 1, 4, 5]])


@pytest.mark.parametrize("tp, kv_heads", [(1, 2), (2, 2), (4, 4), (8, 8)])
def test_kv_heads_are_split_or_replicated_like_vllm(tp, kv_heads):
    layout = TensorParallel(CFG, tp)
    assert layout.kv_heads == kv_heads and layout.model_cfg.num_kv_heads == kv_heads
    # Cache head j holds checkpoint head j * 2 // kv_heads; kv_copy_of picks a cache head of each.
    np.testing.assert_array_equal(layout.kv_head_of, np.repeat([0, 1], kv_heads // 2))
    np.testing.assert_array_equal(layout.kv_head_of[layout.kv_copy_of], [0, 1])


def dense_attend(q, k, v, cache, batch):
    """Causal GQA attention over this call's rows only (no cache): enough to compare layouts."""
    group = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    s = jnp.einsum("thd,shd->hts", q, k) * q.shape[-1] ** -0.5
    s = jnp.where(jnp.tril(jnp.ones(s.shape[1:], bool)), s, -1e30)
    return jnp.einsum("hts,shd->thd", jax.nn.softmax(s, axis=-1), v), cache


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_the_tensor_parallel_layout_computes_the_same_layer(tp):
    """Each device's row block of the reordered weights holds whole heads and MLP columns, and the
    layer on the reordered weights (KV heads replicated when fewer than tp) equals the original."""
    params = random_params(CFG, seed=3)
    layout = TensorParallel(CFG, tp)
    plain = bind(CFG, params).layers[0]
    sharded = bind(layout.model_cfg, layout_params(layout, params), shards=tp).layers[0]
    assert isinstance(sharded.attn, Attention) and isinstance(sharded.mlp, MLP)
    x = np.random.default_rng(0).normal(size=(5, CFG.hidden_size)).astype(np.float32)

    @jax.jit  # one compilation instead of an eager dispatch per op
    def outputs(layer):
        cos, sin = rope_tables(jnp.arange(5), jnp.asarray(inv_freq(CFG)))
        return layer.attn(x, cos, sin, None, None, dense_attend)[0], layer.mlp(x)

    for got, want in zip(outputs(sharded), outputs(plain)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # Device i's block of q|k|v rows: q heads [i*8/tp, (i+1)*8/tp) and the KV head they read.
    qkv = np.asarray(layout_params(layout, params)["layers"][0]["attn"]["qkv_proj"]["weight"])
    d, hq, q_width = CFG.head_dim, CFG.num_heads // tp, CFG.num_heads * CFG.head_dim
    block = qkv.reshape(tp, -1, CFG.hidden_size)[tp - 1]
    original = np.asarray(params["layers"][0]["attn"]["qkv_proj"]["weight"])
    np.testing.assert_array_equal(block[: hq * d], original[q_width - hq * d : q_width])
    last_kv = CFG.num_kv_heads - 1  # the last device reads the last KV head
    np.testing.assert_array_equal(block[hq * d : hq * d + d], original[q_width + last_kv * d : q_width + (last_kv + 1) * d])


def test_every_parameter_gets_its_megatron_role():
    params = random_params(CFG)
    specs = param_specs(TensorParallel(CFG, 4), params)
    layer = specs["layers"][0]
    assert layer["attn"]["qkv_proj"] == {"weight": P("tp"), "bias": P("tp")}  # column-parallel
    assert layer["mlp"]["gate_up_proj"]["weight"] == P("tp")
    assert layer["attn"]["o_proj"] == {"weight": P(None, "tp"), "bias": P()}  # row-parallel
    assert layer["mlp"]["down_proj"]["weight"] == P(None, "tp")
    assert layer["input_norm"]["weight"] == layer["post_attn_norm"]["weight"] == specs["norm"]["weight"] == P()
    assert specs["embed"]["embedding"] == specs["lm_head"]["weight"] == P("tp")  # vocab-parallel: 4 | 96
    odd = CFG.replace(vocab_size=98)
    odd_specs = param_specs(TensorParallel(odd, 4), params_of(abstract_model(odd)))
    assert odd_specs["embed"]["embedding"] == odd_specs["lm_head"]["weight"] == P()  # 4 does not divide 98


@pytest.mark.parametrize("tp, sp, message", [
    (3, 1, "parallel.tp=3 does not divide the 8 devices jax sees"),
    (16, 1, "parallel.tp=16 is more devices than the 8 jax sees"),
    (0, 1, "parallel.tp must be an integer >= 1, got 0"),
    (2, 3, "parallel.sp=3 x parallel.tp=2 = 6 does not divide the 8 devices"),
    (4, 4, "parallel.sp=4 x parallel.tp=4 = 16 is more devices than the 8"),
    (2, True, "parallel.sp must be an integer >= 1, got True"),
])  # fmt: skip
def test_mesh_sizes_that_do_not_fit_the_devices_name_the_key(tp, sp, message):
    with pytest.raises(ValueError, match=message):
        check_mesh_sizes(tp, sp, 8, keys=("parallel.tp", "parallel.sp"))
    check_mesh_sizes(2, 4, 8, keys=("parallel.tp", "parallel.sp"))


@pytest.mark.parametrize("changes, tp, message", [
    ({}, 16, "tp=16 does not divide the model's 8 attention heads"),
    ({"num_heads": 6, "num_kv_heads": 3}, 2, "tp=2 neither divides the model's 3 KV heads nor is a multiple"),
    ({"intermediate_size": 44}, 8, "tp=8 does not divide the model's MLP width intermediate_size=44"),
])  # fmt: skip
def test_models_that_do_not_split_name_the_key(changes, tp, message):
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(CFG.replace(**changes), tp, key="tp")
    for ok in (1, 2, 4, 8):  # 8 > 2 KV heads: replicated
        check_tensor_parallel(CFG, ok)
