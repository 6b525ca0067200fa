"""Tiny random Hugging Face checkpoints built locally with ``transformers`` (the test-time reference)."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 96
BASE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# Llama 3.1's scaling with a short original context, so the tiny tests reach the rescaled band.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
ARCHS = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {"rope_theta": 10000.0},
    ),
    "llama3": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {
            "rope_theta": 500000.0,
            "rope_scaling": LLAMA3_ROPE_SCALING,
            "tie_word_embeddings": True,
            "head_dim": 16,
        },
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        {"sliding_window": 12},
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        {"num_key_value_heads": 1, "tie_word_embeddings": True},
    ),
}


def make_checkpoint(
    directory: str,
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype=None,
    shard_size=None,
    **overrides,
):
    """Saves a random ``arch`` model (config.json + safetensors) to ``directory``; returns the torch model."""
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**BASE, **extra, **overrides})
    model = model_cls(config).eval()
    with (
        torch.no_grad()
    ):  # every tensor random (norms around 1) so a mis-loaded one shows
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    assert os.path.exists(os.path.join(directory, "config.json"))
    return model.float() if dtype is not None else model


def hf_logits(model, token_ids):
    """float32 logits ``[len, vocab]`` of a full forward pass over ``token_ids``."""
    with torch.no_grad():
        return model(torch.tensor([list(token_ids)])).logits[0].float().numpy()


def hf_greedy(model, prompt, max_new_tokens: int) -> list[int]:
    """``transformers`` greedy ``generate`` continuation (no EOS stopping)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(prompt)]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
