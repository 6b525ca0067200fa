"""ModelConfig.from_hf / from_dir: the Llama-family dialects, parameter counts, and errors that name
the offending field."""

from __future__ import annotations

import copy
import json
import os

import pytest
from hf_checkpoints import ARCHS, BASE, make_checkpoint, transformers

from jaxserve.model.config import CheckpointError, ModelConfig, RopeScaling


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (directory, torch model) of tiny checkpoints saved by transformers 5."""
    out = {}
    for arch in ARCHS:
        d = str(tmp_path_factory.mktemp(f"cfg_{arch}"))
        out[arch] = (d, make_checkpoint(d, arch))
    return out


def _hf_dict(saved, arch):
    with open(os.path.join(saved[arch][0], "config.json")) as f:
        return json.load(f)


def test_llama2(saved):
    cfg = ModelConfig.from_dir(saved["llama"][0])
    assert cfg == ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=RopeScaling(),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        qkv_bias=False,
        o_bias=False,
        sliding_window=None,
        model_type="llama",
        dtype="float32",
        bos_token_id=1,
        eos_token_ids=(2,),
    )


LLAMA3_SCALING = RopeScaling("llama3", 8.0, 1.0, 4.0, 64)


def test_llama3_transformers5_nested_rope_parameters(saved):
    hf = _hf_dict(saved, "llama3")
    assert "rope_parameters" in hf and "rope_scaling" not in hf and "rope_theta" not in hf  # the 5.x dialect
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA3_SCALING
    assert cfg.tie_word_embeddings and cfg.head_dim == 16
    assert cfg.hidden_size == 32 and cfg.num_heads == 4  # head_dim is not hidden_size // heads here


def _as_transformers4(hf: dict) -> dict:
    """The same config in the 4.x dialect: top-level rope_theta and rope_scaling, torch_dtype."""
    hf = copy.deepcopy(hf)
    params = hf.pop("rope_parameters")
    hf["rope_theta"] = params.pop("rope_theta")
    hf["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
    hf["torch_dtype"] = hf.pop("dtype")
    return hf


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_transformers4_dialect_gives_the_same_config(saved, arch):
    hf5 = _hf_dict(saved, arch)
    hf4 = _as_transformers4(hf5)
    assert ModelConfig.from_hf(hf4) == ModelConfig.from_hf(hf5)


def test_llama3_transformers4_rope_scaling():
    # The shape of Llama-3.1-8B's config.json (transformers 4.43).
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    }
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert cfg.head_dim == 128 and cfg.num_kv_heads == 8
    assert cfg.dtype == "bfloat16"
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    assert cfg.max_position_embeddings == 131072
    assert cfg.num_params == 8_030_261_248  # Llama-3.1-8B's published parameter count


def test_old_style_rope_scaling_type_key():
    hf = {**_tiny("LlamaForCausalLM"), "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_scaling.rope_type == "linear" and cfg.rope_scaling.factor == 2.0
    assert ModelConfig.from_hf({**hf, "rope_scaling": None}).rope_scaling == RopeScaling()


def test_mistral_sliding_window(saved):
    cfg = ModelConfig.from_dir(saved["mistral"][0])
    assert cfg.model_type == "mistral" and cfg.sliding_window == 12
    hf = _hf_dict(saved, "mistral")
    assert ModelConfig.from_hf({**hf, "sliding_window": None}).sliding_window is None
    # only mistral reads the field: llama configs ignore it
    assert ModelConfig.from_hf({**_tiny("LlamaForCausalLM"), "sliding_window": 12}).sliding_window is None


def test_qwen2_bias_and_one_kv_head(saved):
    cfg = ModelConfig.from_dir(saved["qwen2"][0])
    assert cfg.model_type == "qwen2"
    assert cfg.qkv_bias and not cfg.o_bias
    assert cfg.num_kv_heads == 1 and cfg.num_heads == 4
    assert cfg.tie_word_embeddings
    assert cfg.sliding_window is None  # use_sliding_window is false
    hf = _hf_dict(saved, "qwen2")
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        ModelConfig.from_hf({**hf, "use_sliding_window": True, "sliding_window": 8})


def test_llama_attention_bias_sets_both_biases():
    cfg = ModelConfig.from_hf({**_tiny("LlamaForCausalLM"), "attention_bias": True})
    assert cfg.qkv_bias and cfg.o_bias


def test_tied_embeddings(saved):
    assert ModelConfig.from_dir(saved["llama3"][0]).tie_word_embeddings
    assert not ModelConfig.from_dir(saved["llama"][0]).tie_word_embeddings
    untied = ModelConfig.from_hf({**_hf_dict(saved, "qwen2"), "tie_word_embeddings": False})
    tied = ModelConfig.from_dir(saved["qwen2"][0])
    assert untied.num_params - tied.num_params == 96 * 32  # the head counted once more


def test_architecture_falls_back_to_model_type():
    hf = _tiny("LlamaForCausalLM")
    del hf["architectures"]
    hf["model_type"] = "mistral"
    assert ModelConfig.from_hf(hf).model_type == "mistral"


# -- parameter counts ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_num_params_equals_transformers(saved, arch):
    _, model = saved[arch]
    cfg = ModelConfig.from_dir(saved[arch][0])
    assert cfg.num_params == sum(p.numel() for p in model.parameters())


def test_num_params_with_attention_bias_equals_transformers():
    hf_cfg = transformers.LlamaConfig(**{**BASE, "attention_bias": True})
    model = transformers.LlamaForCausalLM(hf_cfg)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    assert cfg.o_bias and cfg.num_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,hf,count",
    [
        (
            "Llama-2-7b",
            dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
            6_738_415_616,
        ),
        (
            "Mistral-7B",
            dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
            7_241_732_096,
        ),
        (
            "Qwen2-0.5B",
            dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
            494_032_768,
        ),
    ],
)
def test_num_params_of_published_models(name, hf, count):
    arch = {"Llama-2-7b": "LlamaForCausalLM", "Mistral-7B": "MistralForCausalLM", "Qwen2-0.5B": "Qwen2ForCausalLM"}[name]
    assert ModelConfig.from_hf({"architectures": [arch], **hf}).num_params == count


# -- errors ----------------------------------------------------------------------------------


def _tiny(arch: str) -> dict:
    return {
        "architectures": [arch],
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }


@pytest.mark.parametrize(
    "change,fields",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, ["architecture", "GPT2LMHeadModel", "gpt2"]),
        ({"architectures": None, "model_type": None}, ["architecture"]),
        ({"hidden_size": None}, ["hidden_size"]),
        ({"vocab_size": None}, ["vocab_size"]),
        ({"num_hidden_layers": None}, ["num_hidden_layers"]),
        ({"intermediate_size": None}, ["intermediate_size"]),
        ({"num_attention_heads": None}, ["num_attention_heads"]),
        ({"num_key_value_heads": 3}, ["num_key_value_heads=3", "num_attention_heads=4"]),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope_type", "yarn"]),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, ["rope_type", "dynamic"]),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, ["rope_type", "longrope"]),
        ({"rope_scaling": "llama3"}, ["rope_scaling"]),
        ({"hidden_act": "gelu"}, ["hidden_act", "gelu"]),
        ({"mlp_bias": True}, ["mlp_bias"]),
        ({"torch_dtype": "int8"}, ["torch_dtype", "int8"]),
        ({"hidden_size": 0}, ["hidden_size"]),
        ({"num_attention_heads": 0}, ["num_attention_heads"]),
        ({"num_hidden_layers": "2"}, ["num_hidden_layers"]),
        ({"head_dim": 7}, ["head_dim"]),
    ],
)
def test_errors_name_the_field(change, fields):
    hf = _tiny("LlamaForCausalLM")
    for key, value in change.items():
        if value is None:
            hf.pop(key, None)
        else:
            hf[key] = value
    with pytest.raises(CheckpointError) as e:
        ModelConfig.from_hf(hf, source="some/config.json")
    message = str(e.value)
    assert message.startswith("some/config.json: ")
    for field in fields:
        assert field in message, f"{field!r} not in {message!r}"


def test_missing_config_json(tmp_path):
    with pytest.raises(CheckpointError, match="config.json") as e:
        ModelConfig.from_dir(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_invalid_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 32,')
    with pytest.raises(CheckpointError, match="not valid JSON") as e:
        ModelConfig.from_dir(str(tmp_path))
    assert str(path) in str(e.value)
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        ModelConfig.from_dir(str(tmp_path))


def test_from_dir_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**_tiny("LlamaForCausalLM"), "hidden_act": "relu"}))
    with pytest.raises(CheckpointError) as e:
        ModelConfig.from_dir(str(tmp_path))
    assert str(tmp_path / "config.json") in str(e.value) and "hidden_act" in str(e.value)


def test_direct_construction_is_validated():
    good = ModelConfig.from_hf(_tiny("LlamaForCausalLM"))
    with pytest.raises(CheckpointError, match="num_kv_heads|num_key_value_heads"):
        good.replace(num_kv_heads=3)
    with pytest.raises(CheckpointError, match="rope_type"):
        good.replace(rope_scaling=RopeScaling("ntk"))
    with pytest.raises(CheckpointError, match="dtype"):
        good.replace(dtype="float64")
