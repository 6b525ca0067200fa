"""Fast reload: converted parameters saved and restored with ``orbax-checkpoint``.

Converting a HF checkpoint means reading safetensors, fusing q/k/v and gate/up and casting;
for a large model that is most of the start-up time. ``save_params`` writes the converted nested
dict once; ``restore_params`` reads it straight into the target dtype and sharding (one device by
default, or any ``jax.sharding.Sharding`` per leaf), skipping the conversion. A small
``jaxserve.json`` beside it records the ModelConfig it was made from, so a stale cache (different
model or dtype) is refused rather than silently used.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp

from jaxserve.model.config import CheckpointError, ModelConfig, RopeScaling
from jaxserve.model.llama import abstract_model

META_FILE = "jaxserve.json"
PARAMS_DIR = "params"
# The parameter tree's layout version: 2 fuses q|k|v and gate|up (``llama.fused_widths``) and keeps
# linear weights in HF's [out, in] layout.
FORMAT = 2


def _config_dict(cfg: ModelConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return ModelConfig(**d)


def save_params(directory: str, cfg: ModelConfig, params: dict) -> None:
    """Writes ``params`` (and ``cfg``) under ``directory`` (created; must not hold a checkpoint yet)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(directory, PARAMS_DIR), params)
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump({"format": FORMAT, "config": _config_dict(cfg)}, f, indent=1)


def has_params(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, META_FILE)) and os.path.isdir(os.path.join(directory, PARAMS_DIR))


def saved_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
        fmt, config = meta["format"], meta["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a jaxserve parameter cache ({e})") from None
    if fmt != FORMAT:
        raise CheckpointError(
            f"{path}: parameter cache has layout format {fmt!r}, this jaxserve reads {FORMAT}; "
            "delete the cache directory and it is rebuilt from the checkpoint"
        )
    try:
        return _config_from_dict(config)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a jaxserve parameter cache ({e})") from None


def restore_params(directory: str, cfg: ModelConfig | None = None, sharding: jax.sharding.Sharding | None = None):
    """``(ModelConfig, params)`` restored from ``directory`` straight into ``sharding`` (default: the
    first device). If ``cfg`` is given the saved config must equal it."""
    directory = os.path.abspath(directory)
    saved = saved_config(directory)
    if cfg is not None and saved != cfg:
        changed = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(saved, f.name)]
        raise CheckpointError(f"{directory}: parameter cache was made for a different model (fields {changed} differ)")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = _abstract_params(saved, sharding)
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(os.path.join(directory, PARAMS_DIR), abstract)
    return saved, params


def _abstract_params(cfg: ModelConfig, sharding) -> dict:
    from flax import nnx

    shapes = nnx.to_pure_dict(nnx.split(abstract_model(cfg))[1])
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
