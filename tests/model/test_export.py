"""save_hf_checkpoint: a model written as a HF directory reads back identically, in jaxserve and
in transformers (same logits)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hf_checkpoints import hf_logits, make_checkpoint, transformers

from jaxserve.model.config import ModelConfig
from jaxserve.model.export import hf_config, save_hf_checkpoint
from jaxserve.model.llama import params_of, random_model
from jaxserve.model.loader import load_model


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2"])
def test_round_trip_of_a_loaded_checkpoint(tmp_path, arch):
    reference = make_checkpoint(str(tmp_path / "hf"), arch)
    cfg, params = load_model(str(tmp_path / "hf"))
    save_hf_checkpoint(str(tmp_path / "out"), cfg, params)
    cfg2, params2 = load_model(str(tmp_path / "out"))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # transformers reads the written directory as the model it came from.
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = [5, 9, 1, 33, 7, 60, 11, 2, 40, 3, 17, 22, 8, 50]  # longer than mistral's test window
    np.testing.assert_array_equal(hf_logits(again, ids), hf_logits(reference, ids))


def test_random_model_loads_in_transformers_without_missing_tensors(tmp_path):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_position_embeddings=128, eos_token_ids=(2,))  # fmt: skip
    save_hf_checkpoint(str(tmp_path), cfg, params_of(random_model(cfg, seed=3)))
    assert load_model(str(tmp_path))[0] == cfg
    _, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_llama_with_unequal_biases_is_refused():
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=4, qkv_bias=True)  # fmt: skip
    with pytest.raises(ValueError, match="attention_bias"):
        hf_config(cfg)


def test_cli_writes_a_tiny_checkpoint_both_loaders_read(tmp_path, capsys):
    from jaxserve.model.export import main

    out = tmp_path / "tiny"
    assert main([str(out), "--layers", "3", "--hidden", "32", "--vocab", "100", "--max_position", "512"]) == 0
    cfg, params = load_model(str(out))
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.max_position_embeddings) == (3, 32, 100, 512)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 1, 16)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 3
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--hidden", "20"])
    assert "multiple of 16" in capsys.readouterr().err
