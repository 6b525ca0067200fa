"""Fast reload with orbax: save_params / restore_params, stale-cache refusal, and
``jaxserve.LLM(params_cache=...)`` restoring instead of converting."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_checkpoints import hf_greedy, make_checkpoint

import jaxserve
import jaxserve.llm
from jaxserve.model import checkpoint
from jaxserve.model.config import CheckpointError
from jaxserve.model.loader import load_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ckpt_model"))
    model = make_checkpoint(d, "qwen2", seed=3)  # biases and tied embeddings: an uneven tree
    return d, model


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir[0])


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, loaded):
    d = str(tmp_path_factory.mktemp("params") / "cache")
    checkpoint.save_params(d, *loaded)
    return d


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), (_, y) in zip(_leaves(a), _leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_round_trip_is_exact(saved_dir, loaded):
    cfg, params = loaded
    assert checkpoint.has_params(saved_dir)
    restored_cfg, restored = checkpoint.restore_params(saved_dir)
    assert restored_cfg == cfg
    _assert_trees_equal(restored, params)
    # with the config given, it must match and the result is the same
    cfg2, restored2 = checkpoint.restore_params(saved_dir, cfg)
    assert cfg2 == cfg
    _assert_trees_equal(restored2, params)


def test_restored_arrays_are_on_the_requested_sharding(saved_dir):
    device = jax.devices()[-1]
    sharding = jax.sharding.SingleDeviceSharding(device)
    _, params = checkpoint.restore_params(saved_dir, sharding=sharding)
    leaves = _leaves(params)
    assert leaves
    for path, x in leaves:
        assert isinstance(x, jax.Array), path
        assert x.sharding == sharding, path
        assert x.devices() == {device}
    _, default = checkpoint.restore_params(saved_dir)
    first = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert all(x.sharding == first for _, x in _leaves(default))


def test_round_trip_keeps_bfloat16(tmp_path, model_dir):
    cfg, params = load_model(model_dir[0], dtype="bfloat16")
    checkpoint.save_params(str(tmp_path / "bf16"), cfg, params)
    cfg2, restored = checkpoint.restore_params(str(tmp_path / "bf16"), cfg)
    assert cfg2.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for _, x in _leaves(restored))
    _assert_trees_equal(restored, params)


def test_different_config_is_refused_naming_fields(saved_dir, loaded):
    cfg, _ = loaded
    with pytest.raises(CheckpointError) as e:
        checkpoint.restore_params(saved_dir, cfg.replace(dtype="bfloat16"))
    msg = str(e.value)
    assert "dtype" in msg and saved_dir in msg
    with pytest.raises(CheckpointError) as e:
        checkpoint.restore_params(saved_dir, cfg.replace(num_layers=3, rope_theta=5.0))
    msg = str(e.value)
    assert "num_layers" in msg and "rope_theta" in msg and "dtype" not in msg


def test_has_params(tmp_path, saved_dir):
    assert not checkpoint.has_params(str(tmp_path))
    assert not checkpoint.has_params(str(tmp_path / "does-not-exist"))
    assert checkpoint.has_params(saved_dir)
    # the metadata alone is not a cache
    (tmp_path / checkpoint.META_FILE).write_text("{}")
    assert not checkpoint.has_params(str(tmp_path))


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"format": checkpoint.FORMAT}),
        json.dumps({"format": checkpoint.FORMAT, "config": {"vocab_size": 96}}),
        json.dumps({"format": checkpoint.FORMAT, "config": {"nonsense": 1}}),
    ],
)
def test_corrupt_metadata(tmp_path, saved_dir, content):
    d = tmp_path  # the saved parameters, with a broken jaxserve.json beside them
    os.symlink(os.path.join(saved_dir, checkpoint.PARAMS_DIR), d / checkpoint.PARAMS_DIR)
    (d / checkpoint.META_FILE).write_text(content)
    assert checkpoint.has_params(str(d))
    with pytest.raises(CheckpointError) as e:
        checkpoint.restore_params(str(d))
    assert checkpoint.META_FILE in str(e.value)


def test_cache_of_an_older_layout_is_refused(tmp_path, saved_dir):
    with open(os.path.join(saved_dir, checkpoint.META_FILE)) as f:
        meta = json.load(f)
    meta["format"] = 1  # separate q/k/v and gate/up kernels, stored [in, out]
    os.symlink(os.path.join(saved_dir, checkpoint.PARAMS_DIR), tmp_path / checkpoint.PARAMS_DIR)
    (tmp_path / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="layout format 1.*delete the cache"):
        checkpoint.restore_params(str(tmp_path))


def test_metadata_with_an_invalid_config(tmp_path, saved_dir):
    with open(os.path.join(saved_dir, checkpoint.META_FILE)) as f:
        meta = json.load(f)
    meta["config"]["num_kv_heads"] = 3
    os.symlink(os.path.join(saved_dir, checkpoint.PARAMS_DIR), tmp_path / checkpoint.PARAMS_DIR)
    (tmp_path / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="num_kv_heads|num_key_value_heads"):
        checkpoint.restore_params(str(tmp_path))


# -- jaxserve.LLM(params_cache=...) ------------------------------------------------------------


def _word_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "[UNK]"] + [f"w{i}" for i in range(vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(path)


def test_llm_restores_from_the_cache_and_generates_the_same(tmp_path, model_dir, monkeypatch):
    src, model = model_dir
    d = tmp_path / "model"
    d.mkdir()
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), d / name)
    _word_tokenizer(str(d / "tokenizer.json"), 96)
    cache = str(tmp_path / "params_cache")
    kw = dict(
        num_blocks=16,
        block_size=4,
        max_model_len=32,
        block_rows=8,
        attention="grouped",
        params_cache=cache,
        stop_at_eos=False,
    )
    prompts = ["w5 w17 w3 w40 w11", [7, 30, 64, 2, 9, 88, 41]]
    greedy = jaxserve.SamplingParams(max_new_tokens=5, temperature=0.0)

    first = jaxserve.LLM(str(d), **kw)
    assert checkpoint.has_params(cache)
    out1 = first.generate(prompts, greedy)

    def no_conversion(*a, **k):
        raise AssertionError("the second LLM converted the checkpoint instead of restoring the cache")

    monkeypatch.setattr(jaxserve.llm, "load_model", no_conversion)
    second = jaxserve.LLM(str(d), **kw)
    assert second.cfg == first.cfg
    _assert_trees_equal(second.runner.params, first.runner.params)
    out2 = second.generate(prompts, greedy)

    assert [o.token_ids for o in out1] == [o.token_ids for o in out2]
    assert [o.text for o in out1] == [o.text for o in out2]
    # and the greedy completions are transformers' greedy continuations
    assert out1[0].prompt_token_ids == (9, 21, 7, 44, 15)  # "w{i}" is id i + 4
    for o in out1:
        assert o.finish_reason == "length" and len(o.token_ids) == 5
        assert list(o.token_ids) == hf_greedy(model, o.prompt_token_ids, 5)
    assert out1[0].text == first.tokenizer.decode(out1[0].token_ids)
    assert out1[0].text == " ".join(f"w{t - 4}" for t in out1[0].token_ids if t > 3)  # specials skipped

    # a cache made for float32 is refused for a bfloat16 engine
    with pytest.raises(CheckpointError, match="dtype"):
        jaxserve.LLM(str(d), **{**kw, "dtype": "bfloat16"})


def test_saved_config_round_trips_every_field(saved_dir, loaded):
    cfg, _ = loaded
    saved = checkpoint.saved_config(saved_dir)
    assert dataclasses.asdict(saved) == dataclasses.asdict(cfg)
    assert isinstance(saved.eos_token_ids, tuple)
