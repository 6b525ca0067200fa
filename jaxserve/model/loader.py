"""Hugging Face checkpoint -> jaxserve parameters.

``load_model(model_dir)`` reads ``config.json`` and the ``*.safetensors`` weights (one file or
sharded with an index), maps each HF tensor name to the NNX parameter it fills (transposing linear
weights from HF's ``[out, in]`` to ``[in, out]``), checks every shape, converts to the requested
dtype and returns ``(ModelConfig, params)`` where ``params`` is the nested dict of arrays the engine
jits over (``llama.bind`` turns it back into a module). A missing, unexpected or misshapen tensor is an error naming it.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.model.config import CheckpointError, ModelConfig
from jaxserve.model.llama import abstract_model
from jaxserve.model.safetensors_io import iter_tensors

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": ("attn", "q_proj", "kernel"),
    "self_attn.k_proj.weight": ("attn", "k_proj", "kernel"),
    "self_attn.v_proj.weight": ("attn", "v_proj", "kernel"),
    "self_attn.o_proj.weight": ("attn", "o_proj", "kernel"),
    "self_attn.q_proj.bias": ("attn", "q_proj", "bias"),
    "self_attn.k_proj.bias": ("attn", "k_proj", "bias"),
    "self_attn.v_proj.bias": ("attn", "v_proj", "bias"),
    "self_attn.o_proj.bias": ("attn", "o_proj", "bias"),
    "mlp.gate_proj.weight": ("mlp", "gate_proj", "kernel"),
    "mlp.up_proj.weight": ("mlp", "up_proj", "kernel"),
    "mlp.down_proj.weight": ("mlp", "down_proj", "kernel"),
    "input_layernorm.weight": ("input_norm", "weight"),
    "post_attention_layernorm.weight": ("post_attn_norm", "weight"),
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": ("embed", "embedding"),
    "model.norm.weight": ("norm", "weight"),
    "lm_head.weight": ("lm_head", "kernel"),
}
# Buffers some exporters write that carry no parameters (recomputed from the config).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def param_path(name: str) -> tuple | None:
    """The NNX parameter path a HF tensor fills, or None if the name is not a Llama-family tensor."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_TENSORS:
        return ("layers", int(m.group(1))) + _LAYER_TENSORS[m.group(2)]
    return None


def _flat_abstract(graph_state) -> dict[tuple, jax.ShapeDtypeStruct]:
    return {
        tuple(path): var.get_value() for path, var in nnx.to_flat_state(graph_state)
    }


def params_from_tensors(
    cfg: ModelConfig, tensors, dtype=None, *, source: str = "checkpoint"
):
    """The nested ``params`` dict from ``(hf_name, numpy array)`` pairs; see the module docstring."""
    _, abstract = nnx.split(abstract_model(cfg, dtype))
    expected = _flat_abstract(abstract)
    filled: dict[tuple, np.ndarray] = {}
    for name, array in tensors:
        path = param_path(name)
        if path is None:
            if _IGNORED.search(name) or (name == "lm_head.weight"):
                continue
            raise CheckpointError(
                f"{source}: unexpected tensor {name!r} (not part of a {cfg.model_type} model)"
            )
        if path not in expected:
            if path[0] == "lm_head" and cfg.tie_word_embeddings:
                continue  # a tied checkpoint may still store the head; it equals the embedding
            raise CheckpointError(
                f"{source}: tensor {name!r} does not fit the config (e.g. a layer index beyond num_hidden_layers or a bias the config disables)"
            )
        target = expected[path]
        value = array.T if path[-1] == "kernel" else array
        if tuple(value.shape) != tuple(target.shape):
            hf_shape = tuple(array.shape)
            want = (
                tuple(target.shape[::-1])
                if path[-1] == "kernel"
                else tuple(target.shape)
            )
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {hf_shape}, the config implies {want}"
            )
        filled[path] = np.asarray(value, dtype=target.dtype)
    missing = [p for p in expected if p not in filled]
    if missing:
        names = [hf_name(p) for p in missing[:5]]
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing tensor(s) {names}{more}")
    params: dict = {}
    for path, value in filled.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value)
    return params


def hf_name(path: tuple) -> str:
    """The HF tensor name of an NNX parameter path (the inverse of ``param_path``)."""
    for name, p in _GLOBAL_TENSORS.items():
        if p == path:
            return name
    for suffix, p in _LAYER_TENSORS.items():
        if path[2:] == p:
            return f"model.layers.{path[1]}.{suffix}"
    return ".".join(map(str, path))


def load_model(model_dir: str, dtype=None):
    """``(ModelConfig, params)`` from a HF model directory; ``dtype`` overrides the
    checkpoint's ``torch_dtype`` (e.g. ``"float32"`` for exact comparisons on CPU)."""
    cfg = ModelConfig.from_dir(model_dir)
    if dtype is not None:
        cfg = cfg.replace(dtype=str(jnp.dtype(dtype)))
    return cfg, params_from_tensors(cfg, iter_tensors(model_dir), source=model_dir)
