"""load_model and the safetensors reader: single-file and sharded checkpoints in every saved dtype,
dtype overrides, parameters equal to the torch weights, and errors that name the tensor or file."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hf_checkpoints import make_checkpoint, torch

import safetensors.numpy
import safetensors.torch
from jaxserve.model import safetensors_io
from jaxserve.model.config import CheckpointError
from jaxserve.model.loader import hf_layout, hf_tensors, load_model

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (directory, torch float32 model holding the saved values)."""
    specs = {
        "single_f32": ("llama", {}),
        "sharded_f32": ("qwen2", {"shard_size": "20KB"}),
        "bf16": ("llama3", {"dtype": torch.bfloat16}),
        "sharded_f16": ("mistral", {"dtype": torch.float16, "shard_size": "20KB"}),
    }
    out = {}
    for i, (name, (arch, kw)) in enumerate(specs.items()):
        d = str(tmp_path_factory.mktemp(f"load_{name}"))
        out[name] = (d, make_checkpoint(d, arch, seed=i, **kw))
    return out


def _flat(params: dict, prefix=()) -> dict:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def assert_equals_torch(cfg, params, model, dtype: str):
    """Every parameter is the torch tensor it comes from (q/k/v and gate/up in their fused row
    ranges), cast to ``dtype``; no parameter is left that no tensor filled."""
    flat = _flat(params)
    layout = hf_layout(cfg)
    covered = {path: np.zeros(np.shape(v), bool) for path, v in flat.items()}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            assert "lm_head" not in params and name not in layout
            continue
        path, rows = layout[name]
        got = flat[path]
        assert isinstance(got, jax.Array)
        assert got.dtype == jnp.dtype(dtype), (name, got.dtype)
        got = np.asarray(got, np.float32)
        index = slice(*rows) if rows else Ellipsis
        expect = tensor.to(TORCH_DTYPES[dtype]).float().numpy()
        np.testing.assert_array_equal(got[index], expect, err_msg=name)
        assert not covered[path][index].any(), f"{name} overlaps another tensor"
        covered[path][index] = True
    assert all(c.all() for c in covered.values())  # no parameter (or row) that no torch tensor filled
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == cfg.num_params
    # ...and the inverse: params back to the HF tensors, as export writes them
    back = hf_tensors(cfg, params)
    state = model.state_dict()
    for name, array in back.items():
        np.testing.assert_array_equal(
            array.astype(np.float32), state[name].to(TORCH_DTYPES[dtype]).float().numpy(), err_msg=name
        )


@pytest.mark.parametrize(
    "name,saved_dtype",
    [("single_f32", "float32"), ("sharded_f32", "float32"), ("bf16", "bfloat16"), ("sharded_f16", "float16")],
)
def test_load_in_saved_dtype(ckpts, name, saved_dtype):
    d, model = ckpts[name]
    if name.startswith("sharded"):
        with open(os.path.join(d, safetensors_io.INDEX_FILE)) as f:
            shards = set(json.load(f)["weight_map"].values())
        assert len(shards) > 1 and len(safetensors_io.checkpoint_files(d)) == len(shards)
    else:
        assert safetensors_io.checkpoint_files(d) == [os.path.join(d, "model.safetensors")]
    cfg, params = load_model(d)
    assert cfg.dtype == saved_dtype
    assert_equals_torch(cfg, params, model, saved_dtype)


@pytest.mark.parametrize(
    "name,dtype",
    [("bf16", "float32"), ("single_f32", "bfloat16"), ("sharded_f32", jnp.float16), ("sharded_f16", np.float32)],
)
def test_dtype_override(ckpts, name, dtype):
    d, model = ckpts[name]
    cfg, params = load_model(d, dtype=dtype)
    want = str(jnp.dtype(dtype))
    assert cfg.dtype == want
    assert_equals_torch(cfg, params, model, want)


def test_tied_checkpoint_has_no_head_and_qwen2_has_biases(ckpts):
    cfg, params = load_model(ckpts["bf16"][0])
    assert cfg.tie_word_embeddings and "lm_head" not in params
    cfg, params = load_model(ckpts["sharded_f32"][0])
    attn = params["layers"][0]["attn"]
    assert {k: set(v) for k, v in attn.items()} == {"qkv_proj": {"weight", "bias"}, "o_proj": {"weight"}}
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    assert attn["qkv_proj"]["weight"].shape == (q + 2 * kv, cfg.hidden_size)  # HF's [out, in]
    assert attn["qkv_proj"]["bias"].shape == (q + 2 * kv,) and kv == 8
    # q | k | v in that column order: the k bias is the middle piece
    torch_bias = ckpts["sharded_f32"][1].state_dict()["model.layers.0.self_attn.k_proj.bias"].numpy()
    np.testing.assert_array_equal(np.asarray(attn["qkv_proj"]["bias"])[q : q + kv], torch_bias)
    mlp = params["layers"][0]["mlp"]
    assert set(mlp) == {"gate_up_proj", "down_proj"}
    assert mlp["gate_up_proj"]["weight"].shape == (2 * cfg.intermediate_size, cfg.hidden_size)


# -- broken checkpoints ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_tensors(ckpts):
    d, _ = ckpts["single_f32"]
    return d, safetensors.numpy.load_file(os.path.join(d, "model.safetensors"))


def _write(tmp_path, src_dir, tensors, name="model.safetensors"):
    shutil.copy(os.path.join(src_dir, "config.json"), tmp_path / "config.json")
    safetensors.numpy.save_file(tensors, str(tmp_path / name))
    return str(tmp_path)


def _load_error(d) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert d in str(e.value)  # names the checkpoint
    return str(e.value)


def test_missing_tensor(tmp_path, llama_tensors):
    src, tensors = llama_tensors
    name = "model.layers.1.mlp.up_proj.weight"
    d = _write(tmp_path, src, {k: v for k, v in tensors.items() if k != name})
    msg = _load_error(d)
    assert "missing" in msg and name in msg
    d2 = tmp_path / "no_norm"
    d2.mkdir()
    msg = _load_error(_write(d2, src, {k: v for k, v in tensors.items() if k != "model.norm.weight"}))
    assert "model.norm.weight" in msg


def test_wrong_shape(tmp_path, llama_tensors):
    src, tensors = llama_tensors
    name = "model.layers.0.self_attn.k_proj.weight"
    assert tensors[name].shape == (16, 32)
    d = _write(tmp_path, src, {**tensors, name: tensors[name][:8]})
    msg = _load_error(d)
    assert name in msg and "(8, 32)" in msg and "(16, 32)" in msg


def test_wrong_shape_of_a_norm(tmp_path, llama_tensors):
    src, tensors = llama_tensors
    name = "model.layers.1.input_layernorm.weight"
    msg = _load_error(_write(tmp_path, src, {**tensors, name: np.ones(31, np.float32)}))
    assert name in msg and "(31,)" in msg and "(32,)" in msg


@pytest.mark.parametrize(
    "extra",
    [
        "model.layers.0.self_attn.rotary.weight",  # not a Llama-family tensor
        "model.layers.2.mlp.up_proj.weight",  # a layer beyond num_hidden_layers
        "model.layers.0.self_attn.q_proj.bias",  # a bias the config disables
        "vision_tower.patch_embed.weight",
    ],
)
def test_unexpected_tensor(tmp_path, llama_tensors, extra):
    src, tensors = llama_tensors
    msg = _load_error(_write(tmp_path, src, {**tensors, extra: np.zeros((48, 32), np.float32)}))
    assert extra in msg


def test_exporter_buffers_are_ignored(tmp_path, llama_tensors, ckpts):
    src, tensors = llama_tensors
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)}
    d = _write(tmp_path, src, {**tensors, **extra}, name="weights.safetensors")  # found by the *.safetensors glob
    cfg, params = load_model(d)
    assert_equals_torch(cfg, params, ckpts["single_f32"][1], "float32")


def _raw_file(path, header: bytes, data: bytes = b""):
    pathlib.Path(path).write_bytes(len(header).to_bytes(8, "little") + header + data)


def test_corrupt_header(tmp_path, llama_tensors):
    src, tensors = llama_tensors
    d = _write(tmp_path, src, tensors)
    path = os.path.join(d, "model.safetensors")
    good = open(path, "rb").read()
    # a header length beyond the file
    pathlib.Path(path).write_bytes((len(good) * 2).to_bytes(8, "little") + good[8:])
    msg = _load_error(d)
    assert path in msg and "header length" in msg
    # a header that is not JSON
    n = int.from_bytes(good[:8], "little")
    pathlib.Path(path).write_bytes(good[:8] + b"\xff{not json" + good[8 + 10 :])
    assert n > 10
    msg = _load_error(d)
    assert path in msg and "not valid JSON" in msg
    # a header that is JSON but not an object
    _raw_file(path, b"[1, 2, 3]")
    assert "JSON object" in _load_error(d)
    # too short to hold a header length
    pathlib.Path(path).write_bytes(b"\x01\x02")
    assert "too short" in _load_error(d)


def test_truncated_data_and_bad_entries(tmp_path, llama_tensors):
    src, tensors = llama_tensors
    d = _write(tmp_path, src, tensors)
    path = os.path.join(d, "model.safetensors")
    good = open(path, "rb").read()
    pathlib.Path(path).write_bytes(good[:-100])
    header, _ = safetensors_io.read_header(path)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    msg = _load_error(d)
    assert last in msg and "data_offsets" in msg
    # an entry whose offsets disagree with its shape, and an unsupported dtype
    hdr = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    _raw_file(path, json.dumps(hdr).encode(), b"\0" * 24)
    with pytest.raises(CheckpointError, match="'a'.*data_offsets"):
        safetensors_io.load_file(path)
    hdr = {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}
    _raw_file(path, json.dumps(hdr).encode(), b"\0" * 4)
    with pytest.raises(CheckpointError, match="'w'.*unsupported dtype 'F8_E4M3'"):
        safetensors_io.load_file(path)


def test_index_naming_a_missing_shard(tmp_path, ckpts):
    src, _ = ckpts["sharded_f32"]
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    with open(d / safetensors_io.INDEX_FILE) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    os.remove(d / shards[1])
    msg = _load_error(str(d))
    assert shards[1] in msg and shards[0] not in msg
    (d / safetensors_io.INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    assert "weight_map" in _load_error(str(d))


def test_tensor_in_two_files(tmp_path, llama_tensors):
    src, tensors = llama_tensors
    names = sorted(tensors)
    d = _write(tmp_path, src, {k: tensors[k] for k in names[:5]}, name="a.safetensors")
    safetensors.numpy.save_file({k: tensors[k] for k in names[4:]}, os.path.join(d, "b.safetensors"))
    msg = _load_error(d)
    assert names[4] in msg and "a.safetensors" in msg and "b.safetensors" in msg


def test_no_weights(tmp_path, llama_tensors):
    src, _ = llama_tensors
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    assert "safetensors" in _load_error(str(tmp_path))


# -- the safetensors reader ------------------------------------------------------------------------


def test_reads_bf16_and_other_dtypes_written_by_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "bf16_extremes": torch.tensor([1e38, -3e-38, 0.0, -0.0, 1 / 3, 65504.0, float("inf")], dtype=torch.bfloat16),
        "f16": torch.randn(4, generator=g).half(),
        "f32": torch.randn(2, 2, 2, generator=g),
        "i64": torch.arange(-3, 3),
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
    }
    path = str(tmp_path / "t.safetensors")
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    out = safetensors_io.load_file(path)
    assert set(out) == set(tensors)
    assert out["bf16"].dtype == ml_dtypes.bfloat16 and out["scalar"].shape == ()
    for name, t in tensors.items():
        assert tuple(out[name].shape) == tuple(t.shape), name
        want = t.float().numpy() if t.is_floating_point() else t.numpy()
        np.testing.assert_array_equal(np.asarray(out[name]).astype(want.dtype), want, err_msg=name)
    assert not out["f32"].flags.writeable  # a read-only memory map


def test_save_file_is_read_by_safetensors(tmp_path):
    arrays = {
        "w": (np.arange(12, dtype=np.float32).reshape(3, 4) / 7).astype(ml_dtypes.bfloat16),
        "b": np.array([1, 0, 1], np.bool_),
        "n": np.arange(5, dtype=np.int32),
    }
    path = str(tmp_path / "s.safetensors")
    safetensors_io.save_file(arrays, path, metadata={"who": "jaxserve"})
    back = safetensors.torch.load_file(path)
    assert back["w"].dtype == torch.bfloat16
    np.testing.assert_array_equal(back["w"].float().numpy(), arrays["w"].astype(np.float32))
    np.testing.assert_array_equal(back["b"].numpy(), arrays["b"])
    np.testing.assert_array_equal(back["n"].numpy(), arrays["n"])
    mine = safetensors_io.load_file(path)
    for k, v in arrays.items():
        assert mine[k].dtype == v.dtype
        np.testing.assert_array_equal(mine[k], v)
