"""ModelConfig: the shape of a Llama-family decoder, read from a Hugging Face ``config.json``.

Covers Llama 2/3 (incl. ``rope_scaling``), Mistral and Qwen2 (bias on q/k/v). Both config dialects
are read: transformers 5.x nests ``rope_theta``/``rope_type`` under ``rope_parameters``; checkpoints
saved by 4.x carry top-level ``rope_theta`` and ``rope_scaling``. Anything the model cannot honour
(an unknown architecture, a rope type it does not implement, a non-SiLU activation) is an error
naming the field, not a silently different model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
MODEL_TYPES = frozenset(ARCHITECTURES.values())
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
# ModelConfig fields whose Hugging Face config.json name differs (for error messages).
_HF_FIELDS = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}


class CheckpointError(ValueError):
    """A checkpoint directory, config field or tensor that jaxserve cannot load (message names it)."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``linear`` divides positions by ``factor``; ``llama3`` rescales the
    low frequencies as Llama 3.1 does (``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (names follow the HF config fields)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = (
        False  # bias on the q/k/v projections (Qwen2; Llama with attention_bias)
    )
    o_bias: bool = False  # bias on the output projection (Llama with attention_bias)
    sliding_window: int | None = None
    model_type: str = "llama"
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                hf_name = _HF_FIELDS.get(name)
                also = f" ({hf_name!r} in config.json)" if hf_name else ""
                raise CheckpointError(
                    f"config field {name!r}{also} must be a positive integer, got {value!r}"
                )
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"config fields num_attention_heads={self.num_heads} and num_key_value_heads={self.num_kv_heads}: "
                "the first must be a multiple of the second (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise CheckpointError(
                f"config field head_dim={self.head_dim} must be even for RoPE"
            )
        if self.dtype not in DTYPES:
            raise CheckpointError(
                f"config field torch_dtype={self.dtype!r}; expected one of {DTYPES}"
            )
        if self.rope_scaling.rope_type not in ROPE_TYPES:
            raise CheckpointError(
                f"config field rope_scaling.rope_type={self.rope_scaling.rope_type!r} is not supported; "
                f"jaxserve implements {ROPE_TYPES}"
            )

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += h
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + self.vocab_size * h + head + h

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Reads a HF ``config.json`` dict; errors name ``source`` and the offending field."""
        try:
            return _from_hf(cls, hf)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None

    @classmethod
    def from_dir(cls, model_dir: str) -> ModelConfig:
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{model_dir!r} has no config.json (expected a Hugging Face model directory)"
            )
        try:
            with open(path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(hf, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_hf(hf, source=path)


def _require(hf: dict, key: str):
    if key not in hf:
        raise CheckpointError(f"missing required field {key!r}")
    return hf[key]


def _model_type(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = hf.get("model_type")
    if model_type in MODEL_TYPES:
        return model_type
    raise CheckpointError(
        f"unsupported architecture (architectures={archs!r}, model_type={model_type!r}); "
        f"jaxserve supports {sorted(ARCHITECTURES)}"
    )


def _rope(hf: dict) -> tuple[float, RopeScaling]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise CheckpointError(
            "fields 'rope_parameters' / 'rope_scaling' must be objects"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    kwargs = {"rope_type": rope_type}
    for key in (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ):
        if key in merged and merged[key] is not None:
            kwargs[key] = merged[key]
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"field rope_scaling.rope_type={rope_type!r} is not supported; jaxserve implements {ROPE_TYPES}"
        )
    return float(theta), RopeScaling(**kwargs)


def _from_hf(cls, hf: dict) -> ModelConfig:
    model_type = _model_type(hf)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(
            f"field hidden_act={act!r} is not supported (Llama-family models use 'silu')"
        )
    hidden = _require(hf, "hidden_size")
    heads = _require(hf, "num_attention_heads")
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or (
        hidden // heads
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0
        else None
    )
    theta, scaling = _rope(hf)
    dtype = hf.get("torch_dtype", hf.get("dtype", "float32")) or "float32"
    eos = hf.get("eos_token_id")
    eos_ids = (
        tuple(eos)
        if isinstance(eos, (list, tuple))
        else (() if eos is None else (eos,))
    )
    if hf.get("mlp_bias"):
        raise CheckpointError("field mlp_bias=true is not supported")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise CheckpointError(
            "field use_sliding_window=true is not supported for qwen2 (per-layer windows)"
        )
    window = hf.get("sliding_window") if model_type == "mistral" else None
    attention_bias = bool(hf.get("attention_bias", False))
    return cls(
        vocab_size=_require(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_require(hf, "intermediate_size"),
        num_layers=_require(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        sliding_window=int(window) if window else None,
        model_type=model_type,
        dtype=str(dtype),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )
