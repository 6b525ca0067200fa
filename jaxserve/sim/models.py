"""Model shapes for the cost models, read from Hugging Face ``config.json`` values.

``ModelSpec`` keeps only what decides cost: layer count and widths, attention heads (GQA/MQA),
MLP kind, vocabulary, biases and norms (for exact parameter counts). Units: parameters, bytes,
FLOPs (one multiply-add = 2 FLOPs).

``ModelSpec.from_hf_config`` reads the Llama family (Llama, Mistral, Qwen2, Yi), OPT and Falcon
configs, in both HF dialects (transformers 4.x top-level ``rope_theta`` / ``rope_scaling``, 5.x
``rope_parameters``) and Falcon's original RW key names (``n_head``, ``n_layer``, ``n_head_kv``).
``MODELS`` holds the published configs of the models the seed papers evaluate.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

from jaxserve.sim.hardware import DTYPE_BYTES
from jaxserve.sim.tables import lookup

MLP_MATRICES = {"swiglu": 3, "gelu": 2, "relu": 2}  # gate+up+down vs up+down


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's shape. ``head_dim`` may differ from ``hidden_size / num_heads``."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    mlp: str = "swiglu"  # "swiglu" | "gelu" | "relu"
    tie_word_embeddings: bool = False
    parallel_attn: bool = False  # attention and MLP read the same input (GPT-J/Falcon): one TP all-reduce per layer
    qkv_bias: bool = False
    linear_bias: bool = False  # every linear layer has a bias (OPT)
    norm: str = "rms"  # "rms" (weight only) | "layer" (weight + bias)
    norms_per_layer: int = 2
    final_norm: bool = True  # OPT-350m (post-LN) has no final layer norm
    learned_positions: int = 0  # rows of a learned position table (OPT: max_position_embeddings + 2)
    embed_dim: int | None = None  # OPT word_embed_proj_dim when it differs from hidden_size
    rope_theta: float | None = None

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelSpec.{name} must be an int >= 1, got {value!r}")
        if self.mlp not in MLP_MATRICES:
            raise ValueError(f"ModelSpec.mlp must be one of {sorted(MLP_MATRICES)}, got {self.mlp!r}")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"ModelSpec.norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelSpec.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    # -- parameter counts ----------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def _embed_dim(self) -> int:
        return self.embed_dim or self.hidden_size

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's linear layers (q, k, v, o and the MLP matrices)."""
        h = self.hidden_size
        attn = h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h
        return attn + MLP_MATRICES[self.mlp] * h * self.intermediate_size

    @property
    def layer_params(self) -> int:
        """All parameters of one layer: matmuls, biases, norms."""
        h, inter = self.hidden_size, self.intermediate_size
        biases = 0
        if self.qkv_bias or self.linear_bias:
            biases += self.q_dim + 2 * self.kv_dim
        if self.linear_bias:
            up = (MLP_MATRICES[self.mlp] - 1) * inter  # up (and gate) outputs
            biases += h + up + h  # o, up(/gate), down
        norm_params = (2 if self.norm == "layer" else 1) * h
        return self.layer_matmul_params + biases + self.norms_per_layer * norm_params

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self._embed_dim

    @property
    def num_params(self) -> int:
        """Every parameter, counting tied embeddings once."""
        e = self._embed_dim
        embed = self.vocab_size * e + self.learned_positions * self.hidden_size
        if e != self.hidden_size:  # OPT project_in / project_out
            embed += 2 * e * self.hidden_size
        final_norm = (2 if self.norm == "layer" else 1) * self.hidden_size if self.final_norm else 0
        head = 0 if self.tie_word_embeddings else self.lm_head_params
        return embed + self.num_layers * self.layer_params + final_norm + head

    @property
    def matmul_params(self) -> int:
        """Linear-layer weights every token passes through (all layers; not the LM head)."""
        return self.num_layers * self.layer_matmul_params

    def weight_bytes(self, dtype: str = "bf16") -> int:
        """Bytes of all weights stored in ``dtype``."""
        return self.num_params * _dtype_bytes(dtype)

    def kv_bytes_per_token(self, dtype: str = "bf16", tp: int = 1, num_layers: int | None = None) -> int:
        """KV-cache bytes of one token on one of ``tp`` tensor-parallel devices: 2 (K and V) x
        layers (``num_layers``, default all: a pipeline stage holds fewer) x KV heads per device
        (replicated when tp > KV heads, as vLLM does) x head_dim x bytes."""
        layers = self.num_layers if num_layers is None else num_layers
        return 2 * layers * max(self.num_kv_heads // tp, 1) * self.head_dim * _dtype_bytes(dtype)

    # -- FLOPs -----------------------------------------------------------------------------------
    def linear_flops_per_token(self) -> int:
        """GEMM FLOPs of one token through every layer: 2 x matmul parameters (LM head excluded)."""
        return 2 * self.matmul_params

    def lm_head_flops_per_token(self) -> int:
        """FLOPs of the vocabulary projection for one sampled row."""
        return 2 * self.lm_head_params

    def attention_flops(self, num_computed: float, num_new: float) -> float:
        """Attention-score FLOPs (QK^T and PV, all layers) for ``num_new`` new tokens of a sequence
        with ``num_computed`` tokens already in KV, causal within the chunk: new token i (0-based)
        sees ``num_computed + i + 1`` keys, so the pairs are n·(c + (n+1)/2), each 4·head_dim FLOPs
        per query head per layer. Works on numpy arrays elementwise."""
        pairs = num_new * (num_computed + (num_new + 1) / 2)
        return 4.0 * self.num_layers * self.num_heads * self.head_dim * pairs

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], name: str | None = None) -> ModelSpec:
        """Builds a spec from a ``config.json`` dict; ``ValueError`` naming a missing or unsupported
        field. ``model_type`` picks the reader (inferred from OPT/Falcon-only keys when absent)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping (a parsed config.json), got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type is None:
            if "ffn_dim" in config:
                model_type = "opt"
            elif any(k in config for k in ("n_head", "multi_query", "new_decoder_architecture", "n_head_kv")):
                model_type = "falcon"
            else:
                raise ValueError("config is missing 'model_type' and has no OPT/Falcon-specific keys to infer it from")
        model_type = str(model_type).lower()
        reader = _READERS.get(model_type)
        if reader is None:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(_READERS))}")
        return reader(config, name or config.get("_name_or_path") or model_type)


def _dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}") from None


def _req(config: Mapping[str, Any], *keys: str) -> Any:
    """The first present key of ``keys`` (aliases across dialects); names the first if none is."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    alias = f" (or {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""
    raise ValueError(f"config.json is missing {keys[0]!r}{alias}")


def _int(config: Mapping[str, Any], *keys: str) -> int:
    value = _req(config, *keys)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"config.json field {keys[0]!r} must be an int, got {value!r}")
    return value


def _rope_theta(config: Mapping[str, Any]) -> float | None:
    """transformers 5.x nests rope settings in ``rope_parameters``; 4.x keeps ``rope_theta`` on top."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    return None


def _llama_like(config: Mapping[str, Any], name: str) -> ModelSpec:
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json field 'hidden_act' must be 'silu' for a Llama-family model, got {act!r}")
    if config.get("num_local_experts") or config.get("num_experts"):
        raise ValueError("mixture-of-experts configs (num_local_experts/num_experts) are not supported")
    head_dim = config.get("head_dim") or hidden // heads
    qkv_bias = bool(config.get("attention_bias", config.get("model_type") == "qwen2"))
    return ModelSpec(
        name=name,
        num_layers=_int(config, "num_hidden_layers"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,  # absent in MHA-era configs
        head_dim=head_dim,
        intermediate_size=_int(config, "intermediate_size"),
        vocab_size=_int(config, "vocab_size"),
        max_position_embeddings=_int(config, "max_position_embeddings"),
        mlp="swiglu",
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        linear_bias=bool(config.get("mlp_bias", False)),
        norm="rms",
        rope_theta=_rope_theta(config),
    )


def _opt(config: Mapping[str, Any], name: str) -> ModelSpec:
    hidden = _int(config, "hidden_size")
    act = config.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise ValueError(f"config.json field 'activation_function' must be 'relu' or 'gelu' for OPT, got {act!r}")
    max_pos = _int(config, "max_position_embeddings")
    embed_dim = config.get("word_embed_proj_dim") or hidden
    heads = _int(config, "num_attention_heads")
    return ModelSpec(
        name=name,
        num_layers=_int(config, "num_hidden_layers"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=_int(config, "ffn_dim"),
        vocab_size=_int(config, "vocab_size"),
        max_position_embeddings=max_pos,
        mlp=act,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        linear_bias=bool(config.get("enable_bias", True)),
        norm="layer",
        learned_positions=max_pos + 2,  # OPTLearnedPositionalEmbedding offsets positions by 2
        final_norm=bool(config.get("do_layer_norm_before", True)),
        embed_dim=embed_dim if embed_dim != hidden else None,
    )


def _falcon(config: Mapping[str, Any], name: str) -> ModelSpec:
    hidden = _int(config, "hidden_size", "n_embed")
    heads = _int(config, "num_attention_heads", "n_head")
    new_arch = bool(config.get("new_decoder_architecture", False))
    parallel = bool(config.get("parallel_attn", True))
    if new_arch:  # grouped KV heads (Falcon-40B/180B)
        kv_heads = config.get("num_kv_heads") or config.get("n_head_kv") or heads
    elif config.get("multi_query", True):  # Falcon-7B: one shared KV head
        kv_heads = 1
    else:
        kv_heads = heads
    # HF FalconDecoderLayer: the new architecture has ln_attn + ln_mlp; the old parallel one a single
    # input_layernorm; a sequential block has input + post-attention norms.
    norms = 2 if new_arch or not parallel else 1
    return ModelSpec(
        name=name,
        num_layers=_int(config, "num_hidden_layers", "n_layer"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=config.get("head_dim") or hidden // heads,
        intermediate_size=config.get("ffn_hidden_size") or 4 * hidden,
        vocab_size=_int(config, "vocab_size"),
        max_position_embeddings=config.get("max_position_embeddings") or 2048,  # HF FalconConfig default
        mlp="gelu",
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        parallel_attn=parallel,
        qkv_bias=bool(config.get("bias", False)),
        linear_bias=bool(config.get("bias", False)),
        norm="layer",
        norms_per_layer=norms,
        rope_theta=None if config.get("alibi") else _rope_theta(config) or 10000.0,
    )


_READERS = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "yi": _llama_like,
    "opt": _opt,
    "falcon": _falcon,
    "refinedweb": _falcon,
    "refinedwebmodel": _falcon,
}


# --- published configs ------------------------------------------------------------------------------
# The fields of each checkpoint's config.json that shape cost (the rest — token ids, init ranges,
# torch_dtype — do not). Values as published on the Hugging Face hub at the URL above each entry.
HF_CONFIGS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType({
    # https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json
    "llama-2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "hidden_act": "silu", "rms_norm_eps": 1e-05,
                   "tie_word_embeddings": False},
    # https://huggingface.co/meta-llama/Llama-2-13b-hf/blob/main/config.json
    "llama-2-13b": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "hidden_act": "silu", "rms_norm_eps": 1e-05,
                    "tie_word_embeddings": False},
    # https://huggingface.co/meta-llama/Llama-2-70b-hf/blob/main/config.json
    "llama-2-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "hidden_act": "silu", "rms_norm_eps": 1e-05,
                    "tie_word_embeddings": False},
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "hidden_act": "silu", "rms_norm_eps": 1e-05,
                   "rope_theta": 500000.0, "tie_word_embeddings": False},
    # https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/config.json
    "llama-3-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                    "max_position_embeddings": 8192, "hidden_act": "silu", "rms_norm_eps": 1e-05,
                    "rope_theta": 500000.0, "tie_word_embeddings": False},
    # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                   "max_position_embeddings": 32768, "hidden_act": "silu", "rms_norm_eps": 1e-05,
                   "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False},
    # https://huggingface.co/01-ai/Yi-34B/blob/main/config.json
    "yi-34b": {"model_type": "llama", "hidden_size": 7168, "intermediate_size": 20480, "num_hidden_layers": 60,
               "num_attention_heads": 56, "num_key_value_heads": 8, "vocab_size": 64000,
               "max_position_embeddings": 4096, "hidden_act": "silu", "rms_norm_eps": 1e-05,
               "rope_theta": 5000000.0, "tie_word_embeddings": False},
    # https://huggingface.co/facebook/opt-13b/blob/main/config.json
    "opt-13b": {"model_type": "opt", "hidden_size": 5120, "ffn_dim": 20480, "num_hidden_layers": 40,
                "num_attention_heads": 40, "vocab_size": 50272, "max_position_embeddings": 2048,
                "word_embed_proj_dim": 5120, "activation_function": "relu", "do_layer_norm_before": True,
                "enable_bias": True},
    # https://huggingface.co/facebook/opt-66b/blob/main/config.json
    "opt-66b": {"model_type": "opt", "hidden_size": 9216, "ffn_dim": 36864, "num_hidden_layers": 64,
                "num_attention_heads": 72, "vocab_size": 50272, "max_position_embeddings": 2048,
                "word_embed_proj_dim": 9216, "activation_function": "relu", "do_layer_norm_before": True,
                "enable_bias": True},
    # OPT-175B has no public HF checkpoint; dimensions from the OPT paper, Table 1 (Zhang et al. 2022,
    # arXiv:2205.01068): 96 layers, 96 heads, d_model 12288 (FFN 4 x d_model); vocabulary and context as
    # the other OPT configs (GPT-2 BPE padded to 50272, 2048 positions).
    "opt-175b": {"model_type": "opt", "hidden_size": 12288, "ffn_dim": 49152, "num_hidden_layers": 96,
                 "num_attention_heads": 96, "vocab_size": 50272, "max_position_embeddings": 2048,
                 "word_embed_proj_dim": 12288, "activation_function": "relu", "do_layer_norm_before": True,
                 "enable_bias": True},
    # https://huggingface.co/tiiuae/falcon-180B/blob/main/config.json
    "falcon-180b": {"model_type": "falcon", "hidden_size": 14848, "num_attention_heads": 232, "num_hidden_layers": 80,
                    "num_kv_heads": 8, "new_decoder_architecture": True, "parallel_attn": True, "bias": False,
                    "alibi": False, "vocab_size": 65024, "max_position_embeddings": 2048, "rope_theta": 10000.0},
})

MODELS: Mapping[str, ModelSpec] = types.MappingProxyType(
    {name: ModelSpec.from_hf_config(config, name) for name, config in HF_CONFIGS.items()}
)


def get_model(name: str) -> ModelSpec:
    """The spec called ``name`` (case-insensitive); ``ValueError`` listing the known names otherwise."""
    return lookup(MODELS, name, "model")
