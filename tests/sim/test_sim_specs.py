"""Hardware table and model specs: lookups, datasheet values, parameter counts, HF config dialects."""

import dataclasses
import math

import pytest

from jaxserve.sim.hardware import DTYPE_BYTES, HARDWARE, Efficiency, get_hardware
from jaxserve.sim.models import HF_CONFIGS, MODELS, ModelSpec, get_model

# -- hardware ------------------------------------------------------------------------------------

EXPECTED_HARDWARE = {"a100-40gb", "a100-80gb", "h100-sxm", "h200", "l4", "tpu-v5e", "tpu-v5p", "cpu"}


def test_hardware_table_has_every_entry():
    assert set(HARDWARE) == EXPECTED_HARDWARE


@pytest.mark.parametrize("name", sorted(EXPECTED_HARDWARE))
def test_every_entry_is_complete_and_cited(name):
    hw = get_hardware(name)
    assert hw.name == name
    assert hw.memory_bytes > 0 and hw.memory_bandwidth > 0 and hw.price_per_hour_usd > 0
    assert hw.peak_flops_by_dtype and all(v > 0 for v in hw.peak_flops_by_dtype.values())
    assert set(hw.peak_flops_by_dtype) <= set(DTYPE_BYTES)
    assert hw.sources and all(isinstance(s, str) and len(s) > 20 for s in hw.sources.values())
    assert hw.efficiency.source
    assert 0 < hw.efficiency.mfu <= 1 and 0 < hw.efficiency.mbu <= 1 and 0 < hw.efficiency.link <= 1
    if hw.has_power_model:
        assert 0 < hw.power_idle_w < hw.power_max_w
    if name != "cpu":  # every accelerator has a 16-bit datapath and a scale-up link
        assert hw.peak_flops("bf16") > 0 and hw.interconnect_bandwidth > 0


def test_datasheet_values_are_dense_and_per_direction():
    # NVIDIA prints sparse tensor figures; the table holds half of them.
    assert get_hardware("a100-80gb").peak_flops("bf16") == 312e12
    assert get_hardware("h100-sxm").peak_flops("bf16") == pytest.approx(1979e12 / 2)
    assert get_hardware("h100-sxm").peak_flops("fp8") == pytest.approx(3958e12 / 2)
    assert get_hardware("l4").peak_flops("bf16") == pytest.approx(242e12 / 2)
    assert get_hardware("a100-40gb").memory_bandwidth == 1555e9
    assert get_hardware("a100-80gb").memory_bandwidth == 2039e9
    assert get_hardware("h200").memory_bandwidth == 4.8e12
    assert get_hardware("tpu-v5e").peak_flops("bf16") == 197e12
    assert get_hardware("tpu-v5p").memory_bandwidth == 2765e9
    # NVLink3 600 GB/s and NVLink4 900 GB/s are bidirectional totals.
    assert get_hardware("a100-80gb").interconnect_bandwidth == 300e9
    assert get_hardware("h100-sxm").interconnect_bandwidth == 450e9
    # "80GB" is 80 GiB as nvidia-smi reports it.
    assert get_hardware("a100-80gb").memory_bytes == 80 * 1024**3
    assert get_hardware("h100-sxm").power_max_w == 700 and get_hardware("l4").power_max_w == 72


def test_a100_has_no_fp8_and_errors_name_the_supported_dtypes():
    with pytest.raises(ValueError, match="a100-80gb.*'fp8'.*bf16"):
        get_hardware("a100-80gb").peak_flops("fp8")


def test_tpu_power_is_not_invented():
    for name in ("tpu-v5e", "tpu-v5p"):
        hw = get_hardware(name)
        assert hw.power_idle_w is None and hw.power_max_w is None and not hw.has_power_model


def test_cpu_entry_is_marked_nominal():
    cpu = get_hardware("cpu")
    assert cpu.nominal and not any(get_hardware(n).nominal for n in EXPECTED_HARDWARE - {"cpu"})
    assert "NOMINAL" in " ".join(cpu.sources.values())
    assert cpu.interconnect_bandwidth is None
    with pytest.raises(ValueError, match="cpu"):
        cpu.peak_flops("bf16")


def test_get_hardware_is_case_insensitive_and_lists_names_on_error():
    assert get_hardware(" H100-SXM ") is get_hardware("h100-sxm")
    with pytest.raises(ValueError) as e:
        get_hardware("v100")
    assert "v100" in str(e.value) and all(name in str(e.value) for name in EXPECTED_HARDWARE)
    with pytest.raises(ValueError, match="unknown hardware"):
        get_hardware(None)


def test_specs_are_immutable():
    hw = get_hardware("h200")
    with pytest.raises(dataclasses.FrozenInstanceError):
        hw.memory_bytes = 1
    with pytest.raises(TypeError):
        hw.peak_flops_by_dtype["bf16"] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_model("llama-2-7b").num_layers = 1


@pytest.mark.parametrize("field, value", [("mfu", 0.0), ("mbu", 1.5), ("link", -1.0)])
def test_efficiency_validates_fractions(field, value):
    kwargs = {"mfu": 0.5, "mbu": 0.5, "link": 0.5, "collective_latency_s": 0.0, "source": "x"}
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        Efficiency(**kwargs)


# -- models -------------------------------------------------------------------------------------

# Nominal sizes from each model's name / announcement (Mistral: "7.3B parameters").
NOMINAL_PARAMS = {
    "llama-2-7b": 7e9, "llama-2-13b": 13e9, "llama-2-70b": 70e9, "llama-3-8b": 8e9, "llama-3-70b": 70e9,
    "mistral-7b": 7.3e9, "yi-34b": 34e9, "opt-13b": 13e9, "opt-66b": 66e9, "opt-175b": 175e9,
    "falcon-180b": 180e9,
}


def test_model_table_has_every_entry():
    assert set(MODELS) == set(NOMINAL_PARAMS) == set(HF_CONFIGS)


@pytest.mark.parametrize("name", sorted(NOMINAL_PARAMS))
def test_parameter_counts_match_nominal_sizes(name):
    assert get_model(name).num_params == pytest.approx(NOMINAL_PARAMS[name], rel=0.05)


def test_exact_parameter_counts_of_published_checkpoints():
    # Counts the checkpoints report (HF model cards / safetensors metadata).
    assert get_model("llama-2-7b").num_params == 6_738_415_616
    assert get_model("llama-3-8b").num_params == 8_030_261_248
    opt_350m = {"model_type": "opt", "hidden_size": 1024, "ffn_dim": 4096, "num_hidden_layers": 24,
                "num_attention_heads": 16, "vocab_size": 50272, "max_position_embeddings": 2048,
                "word_embed_proj_dim": 512, "activation_function": "relu", "do_layer_norm_before": False}
    assert ModelSpec.from_hf_config(opt_350m).num_params == 331_196_416


def test_kv_bytes_and_weight_bytes():
    m = get_model("llama-2-7b")
    assert m.kv_bytes_per_token("bf16") == 2 * 32 * 32 * 128 * 2 == 512 * 1024
    assert m.kv_bytes_per_token("fp8") == 256 * 1024
    assert m.weight_bytes("bf16") == 2 * m.num_params and m.weight_bytes("fp32") == 4 * m.num_params
    assert get_model("llama-2-70b").kv_bytes_per_token() == 2 * 80 * 8 * 128 * 2  # GQA: 8 KV heads
    with pytest.raises(ValueError, match="dtype"):
        m.weight_bytes("int4")


def test_flop_helpers():
    m = get_model("llama-2-7b")
    assert m.linear_flops_per_token() == 2 * m.matmul_params
    assert m.matmul_params == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert m.lm_head_flops_per_token() == 2 * 32000 * 4096
    # One new token over 99 cached ones sees 100 keys; a 4-token chunk from scratch sees 1+2+3+4.
    per_pair = 4 * 32 * 32 * 128
    assert m.attention_flops(99, 1) == pytest.approx(per_pair * 100)
    assert m.attention_flops(0, 4) == pytest.approx(per_pair * 10)
    assert m.attention_flops(10, 4) == pytest.approx(per_pair * (10 * 4 + 10))


# -- HF config dialects ---------------------------------------------------------------------------

LLAMA_4X = dict(HF_CONFIGS["llama-3-8b"])  # transformers 4.x: top-level rope_theta


def test_llama_4x_dialect():
    m = ModelSpec.from_hf_config(LLAMA_4X, "x")
    assert (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == (32, 32, 8, 128)
    assert m.rope_theta == 500000.0 and m.mlp == "swiglu" and m.name == "x"


def test_transformers_5_rope_parameters_dialect_reads_the_same_model():
    cfg = {k: v for k, v in LLAMA_4X.items() if k != "rope_theta"}
    cfg["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    assert ModelSpec.from_hf_config(cfg, "x") == ModelSpec.from_hf_config(LLAMA_4X, "x")


def test_mha_config_without_num_key_value_heads_and_explicit_head_dim():
    cfg = {k: v for k, v in HF_CONFIGS["llama-2-7b"].items() if k != "num_key_value_heads"}
    assert ModelSpec.from_hf_config(cfg).num_kv_heads == 32
    assert ModelSpec.from_hf_config({**cfg, "head_dim": 64}).head_dim == 64


def test_qwen2_has_qkv_bias():
    cfg = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
           "max_position_embeddings": 32768, "hidden_act": "silu", "rope_theta": 1000000.0,
           "tie_word_embeddings": False}
    m = ModelSpec.from_hf_config(cfg)
    assert m.qkv_bias and m.num_kv_heads == 4
    assert m.num_params == pytest.approx(7.62e9, rel=0.005)  # Qwen2-7B model card: 7.62B


def test_opt_config():
    m = get_model("opt-13b")
    assert m.mlp == "relu" and m.norm == "layer" and m.linear_bias and m.tie_word_embeddings
    assert (m.num_layers, m.hidden_size, m.intermediate_size, m.num_kv_heads) == (40, 5120, 20480, 40)
    assert m.learned_positions == 2050
    big = get_model("opt-175b")  # OPT paper dimensions
    assert (big.num_layers, big.hidden_size, big.num_heads, big.intermediate_size) == (96, 12288, 96, 49152)


def test_falcon_dialects():
    f180 = get_model("falcon-180b")
    assert (f180.num_heads, f180.num_kv_heads, f180.head_dim, f180.intermediate_size) == (232, 8, 64, 4 * 14848)
    assert f180.parallel_attn and f180.mlp == "gelu" and f180.norms_per_layer == 2
    # Falcon-7B in the original RW key names: multi-query (one KV head), one norm per parallel block.
    rw = {"hidden_size": 4544, "n_head": 71, "n_layer": 32, "multi_query": True, "parallel_attn": True,
          "bias": False, "vocab_size": 65024}
    f7 = ModelSpec.from_hf_config(rw)
    assert (f7.num_layers, f7.num_heads, f7.num_kv_heads, f7.norms_per_layer) == (32, 71, 1, 1)
    assert f7.num_params == 6_921_720_704
    # Falcon-40B in HF names with n_head_kv spelled the RW way.
    f40 = ModelSpec.from_hf_config({"model_type": "falcon", "hidden_size": 8192, "num_attention_heads": 128,
                                    "num_hidden_layers": 60, "n_head_kv": 8, "new_decoder_architecture": True,
                                    "vocab_size": 65024})
    assert f40.num_kv_heads == 8 and f40.num_params == pytest.approx(41e9, rel=0.03)


@pytest.mark.parametrize(
    "config, message",
    [
        ({k: v for k, v in HF_CONFIGS["llama-2-7b"].items() if k != "hidden_size"}, "'hidden_size'"),
        ({k: v for k, v in HF_CONFIGS["llama-2-7b"].items() if k != "num_hidden_layers"}, "'num_hidden_layers'"),
        ({k: v for k, v in HF_CONFIGS["opt-13b"].items() if k != "ffn_dim"}, "'ffn_dim'"),
        ({"model_type": "falcon", "hidden_size": 64, "vocab_size": 10}, "'num_attention_heads'.*'n_head'"),
        ({**HF_CONFIGS["llama-2-7b"], "model_type": "gpt_bigcode"}, "unsupported model_type 'gpt_bigcode'"),
        ({"hidden_size": 64}, "model_type"),
        ({**HF_CONFIGS["mistral-7b"], "num_local_experts": 8}, "mixture-of-experts"),
        ({**HF_CONFIGS["llama-2-7b"], "hidden_act": "gelu"}, "hidden_act"),
        ({**HF_CONFIGS["llama-2-7b"], "num_hidden_layers": 32.0}, "num_hidden_layers"),
        ({**HF_CONFIGS["llama-2-7b"], "num_key_value_heads": 5}, "num_kv_heads"),
    ],
)
def test_bad_configs_raise_naming_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_hf_config(config)


def test_get_model_lists_names_on_error():
    assert get_model("Llama-2-7B") is get_model("llama-2-7b")
    with pytest.raises(ValueError) as e:
        get_model("gpt-5")
    assert "gpt-5" in str(e.value) and all(name in str(e.value) for name in MODELS)


def test_every_table_model_has_finite_positive_shapes():
    for m in MODELS.values():
        assert m.num_heads % m.num_kv_heads == 0
        assert m.max_position_embeddings >= 2048
        assert math.isfinite(m.num_params) and m.kv_bytes_per_token() > 0
