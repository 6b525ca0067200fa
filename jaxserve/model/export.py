"""Writes a model as a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``)
that ``loader.load_model`` and ``transformers`` both read: how experiments and benchmarks make a
random model of a chosen shape without ``transformers`` installed."""

from __future__ import annotations

import json
import os

from jaxserve.model.config import ModelConfig
from jaxserve.model.loader import hf_tensors
from jaxserve.model.safetensors_io import save_file

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(cfg: ModelConfig) -> dict:
    """The ``config.json`` dict ``ModelConfig.from_hf`` reads back as ``cfg``."""
    rope = cfg.rope_scaling
    out = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if rope.rope_type == "default" else {
            "rope_type": rope.rope_type, "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        },
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": cfg.dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
    }  # fmt: skip
    if cfg.model_type == "llama":
        if cfg.qkv_bias != cfg.o_bias:
            raise ValueError("a llama config.json has one attention_bias for q/k/v and o; qkv_bias != o_bias")
        out["attention_bias"] = cfg.qkv_bias
    elif cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out


def save_hf_checkpoint(directory: str, cfg: ModelConfig, params: dict) -> None:
    """Writes ``params`` (as ``llama.params_of`` returns) and ``cfg`` into ``directory`` (created)."""
    os.makedirs(directory, exist_ok=True)
    save_file(hf_tensors(cfg, params), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=1)


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxserve.model.export DIR``: a random Llama checkpoint of a chosen (tiny by
    default) shape, for trying the engine without downloading a model."""
    import argparse

    from jaxserve.model.llama import params_of, random_model

    parser = argparse.ArgumentParser(prog="python -m jaxserve.model.export", description=main.__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where to write config.json + model.safetensors (created)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (heads of 16 dims)")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--max_position", type=int, default=1024, help="max_position_embeddings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("layers", "hidden", "vocab", "max_position"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.hidden % 16:
        parser.error(f"--hidden must be a multiple of 16 (heads of 16 dims), got {args.hidden}")
    heads = args.hidden // 16
    cfg = ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_layers=args.layers,
        num_heads=heads, num_kv_heads=max(heads // 2, 1), head_dim=16, max_position_embeddings=args.max_position,
        rms_norm_eps=1e-5, dtype="float32",
    )  # fmt: skip
    save_hf_checkpoint(args.directory, cfg, params_of(random_model(cfg, seed=args.seed)))
    print(f"wrote a random {args.layers}-layer Llama (hidden {args.hidden}, vocab {args.vocab}) to {args.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
