"""Hugging Face checkpoint -> jaxserve parameters.

``load_model(model_dir)`` reads ``config.json`` and the ``*.safetensors`` weights (one file or
sharded with an index), places each HF tensor where ``hf_layout`` says (linear weights keep HF's
``[out, in]`` layout; q/k/v and gate/up go to row ranges of the fused projections), checks every
shape, converts to the requested dtype and returns ``(ModelConfig, params)`` where ``params`` is the
nested dict of arrays the engine jits over (``llama.bind`` turns it back into a module). A missing,
unexpected or misshapen tensor is an error naming it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.model.config import CheckpointError, ModelConfig
from jaxserve.model.llama import abstract_model, fused_widths
from jaxserve.model.safetensors_io import iter_tensors

# HF module name within a layer -> jaxserve module path (unfused linears and norms).
_LAYER_MODULES = {
    "self_attn.o_proj": ("attn", "o_proj"),
    "mlp.down_proj": ("mlp", "down_proj"),
    "input_layernorm": ("input_norm",),
    "post_attention_layernorm": ("post_attn_norm",),
}
# The HF linears each fused jaxserve projection stacks, in the order of its weight's rows.
_FUSED_MODULES = {
    ("attn", "qkv_proj"): ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp", "gate_up_proj"): ("mlp.gate_proj", "mlp.up_proj"),
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": ("embed", "embedding"),
    "model.norm.weight": ("norm", "weight"),
    "lm_head.weight": ("lm_head", "weight"),
}
_LAYER = re.compile(r"^model\.layers\.\d+\.(.+)\.(weight|bias)$")
# Every HF module name within a layer, fused or not (to tell a misfit tensor from an unexpected one).
_HF_LAYER_MODULES = frozenset(_LAYER_MODULES).union(*_FUSED_MODULES.values())
# Buffers some exporters write that carry no parameters (recomputed from the config).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


class TensorSlot(NamedTuple):
    """Where a HF tensor lives in ``params``: the leaf's path and, for a piece of a fused
    projection, its ``[start, stop)`` range along the output (first) axis."""

    path: tuple
    rows: tuple[int, int] | None = None


def _expected(cfg: ModelConfig, dtype=None) -> dict[tuple, object]:
    """Every parameter leaf's path -> its abstract array (shape, dtype)."""
    _, state = nnx.split(abstract_model(cfg, dtype))
    return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def hf_layout(cfg: ModelConfig, paths=None) -> dict[str, TensorSlot]:
    """HF tensor name -> TensorSlot, for exactly the tensors a checkpoint of ``cfg`` holds (the
    parameter ``paths`` default to the model's)."""
    paths = _expected(cfg) if paths is None else paths
    # (HF module, jaxserve module, row range) of every tensor pair in a layer.
    pieces = [(hf_module, module, None) for hf_module, module in _LAYER_MODULES.items()]
    widths = fused_widths(cfg)
    for module, hf_modules in _FUSED_MODULES.items():
        bounds = np.cumsum((0,) + widths[module[-1]]).tolist()
        pieces += [(hf, module, (bounds[j], bounds[j + 1])) for j, hf in enumerate(hf_modules)]
    layout = {name: TensorSlot(path) for name, path in _GLOBAL_TENSORS.items() if path in paths}
    for i in range(cfg.num_layers):
        for hf_module, module, rows in pieces:
            for leaf in ("weight", "bias"):
                path = ("layers", i) + module + (leaf,)
                if path in paths:
                    layout[f"model.layers.{i}.{hf_module}.{leaf}"] = TensorSlot(path, rows)
    return layout


def _hf_shape(slot: TensorSlot, leaf_shape: tuple) -> tuple:
    """The shape of the HF tensor that fills ``slot`` of a leaf of ``leaf_shape``."""
    if slot.rows is None:
        return tuple(leaf_shape)
    return (slot.rows[1] - slot.rows[0],) + tuple(leaf_shape[1:])


def params_from_tensors(cfg: ModelConfig, tensors, dtype=None, *, source: str = "checkpoint"):
    """The nested ``params`` dict from ``(hf_name, numpy array)`` pairs; see the module docstring.
    A leaf goes to the device as soon as its last piece has arrived (one host copy at a time)."""
    expected = _expected(cfg, dtype)
    layout = hf_layout(cfg, expected)
    pending: dict[tuple, set[str]] = {path: set() for path in expected}  # names still to come
    for name, slot in layout.items():
        pending[slot.path].add(name)
    assembling: dict[tuple, np.ndarray] = {}  # fused leaves with pieces still missing
    done: dict[tuple, jax.Array] = {}
    for name, array in tensors:
        slot = layout.get(name)
        if slot is None:
            if _IGNORED.search(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue  # a tied checkpoint may still store the head; it equals the embedding
            m = _LAYER.match(name)
            if (m and m.group(1) in _HF_LAYER_MODULES) or name == "lm_head.weight":
                raise CheckpointError(
                    f"{source}: tensor {name!r} does not fit the config (e.g. a layer index beyond num_hidden_layers or a bias the config disables)"
                )
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (not part of a {cfg.model_type} model)")
        target = expected[slot.path]
        want = _hf_shape(slot, target.shape)
        if tuple(array.shape) != want:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, the config implies {want}")
        pending[slot.path].discard(name)
        if slot.rows is None:
            done[slot.path] = jnp.asarray(np.asarray(array, target.dtype))
            continue
        buffer = assembling.setdefault(slot.path, np.empty(target.shape, target.dtype))
        buffer[slice(*slot.rows)] = array
        if not pending[slot.path]:
            done[slot.path] = jnp.asarray(assembling.pop(slot.path))
    missing = [name for name in layout if name in pending[layout[name].path]]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{more}")
    params: dict = {}
    for path, value in done.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return params


def hf_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """The HF tensors (name -> array as HF stores it) of ``params``: the inverse of the loader."""
    out = {}
    for name, slot in hf_layout(cfg).items():
        node = params
        for key in slot.path:
            node = node[key]
        array = np.asarray(node)
        out[name] = np.ascontiguousarray(array[slice(*slot.rows)] if slot.rows else array)
    return out


def load_model(model_dir: str, dtype=None):
    """``(ModelConfig, params)`` from a HF model directory; ``dtype`` overrides the
    checkpoint's ``torch_dtype`` (e.g. ``"float32"`` for exact comparisons on CPU)."""
    cfg = ModelConfig.from_dir(model_dir)
    if dtype is not None:
        cfg = cfg.replace(dtype=str(jnp.dtype(dtype)))
    return cfg, params_from_tensors(cfg, iter_tensors(model_dir), source=model_dir)
