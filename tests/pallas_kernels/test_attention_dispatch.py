"""The dispatcher the engine calls: which implementation runs where, and that each one agrees."""

import importlib

import jax
import jax.numpy as jnp
import pytest
from paged_kv_testing import assert_close, decode_batch, ragged_batch, rng_for

import pallas_kernels
from pallas_kernels import attention


def test_import_forms_reach_modules_and_dispatchers():
    import pallas_kernels.paged_attention.reference as paged_ref
    import pallas_kernels.ragged_paged_attention.kernel as ragged_kernel
    from pallas_kernels.paged_attention import kernel as paged_kernel
    from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention

    assert pallas_kernels.ragged_paged_attention is attention.ragged_paged_attention
    assert pallas_kernels.paged_attention is attention.paged_attention
    assert paged_ref is importlib.import_module("pallas_kernels.paged_attention.reference")
    assert ragged_kernel is importlib.import_module("pallas_kernels.ragged_paged_attention.kernel")
    assert callable(paged_kernel.paged_attention) and callable(ragged_paged_attention)
    assert pallas_kernels.ragged_paged_attention.reference.ragged_paged_attention is ragged_paged_attention


@pytest.mark.parametrize(
    "mode,backend,expected",
    [
        (None, "cpu", "reference"),
        ("auto", "gpu", "pallas"),
        (None, "tpu", "pallas"),
        ("reference", "gpu", "reference"),
        ("interpret", "cpu", "interpret"),
        ("pallas", "gpu", "pallas"),
        ("PALLAS", "tpu", "pallas"),
    ],
)
def test_mode_selection(monkeypatch, mode, backend, expected):
    if mode is None:
        monkeypatch.delenv(attention.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(attention.ENV_VAR, mode)
    monkeypatch.setattr(attention, "_backend", lambda: backend)
    assert attention.ragged_paged_attention_impl((64, 8, 128), (2, 512, 16, 128)) == expected
    assert attention.paged_attention_impl((8, 8, 128), (2, 512, 16, 128)) == expected


def test_unsupported_shapes_fall_back_or_raise(monkeypatch):
    monkeypatch.setattr(attention, "_backend", lambda: "gpu")
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    # head_dim 80 is not a Triton block size: auto falls back to the reference ...
    assert attention.paged_attention_impl((8, 8, 80), (2, 512, 16, 80)) == "reference"
    # a one-page table caps the compute block at 8 keys < Triton's 16
    assert attention.ragged_paged_attention_impl((64, 8, 128), (2, 512, 8, 128), pages_per_seq=2) == "pallas"
    assert attention.ragged_paged_attention_impl((64, 8, 128), (2, 512, 8, 128), pages_per_seq=1) == "reference"
    # ... while a TPU takes it (the grid variant has no power-of-two constraint)
    monkeypatch.setattr(attention, "_backend", lambda: "tpu")
    assert attention.paged_attention_impl((8, 8, 80), (2, 512, 16, 80)) == "pallas"
    monkeypatch.setattr(attention, "_backend", lambda: "gpu")
    monkeypatch.setenv(attention.ENV_VAR, "pallas")
    with pytest.raises(ValueError, match="head_dim"):
        attention.paged_attention_impl((8, 8, 80), (2, 512, 16, 80))


def test_pallas_mode_on_cpu_and_bad_value_raise(monkeypatch):
    monkeypatch.setattr(attention, "_backend", lambda: "cpu")
    monkeypatch.setenv(attention.ENV_VAR, "pallas")
    with pytest.raises(RuntimeError, match="interpret"):
        attention.ragged_paged_attention_impl((64, 8, 128), (2, 512, 16, 128))
    monkeypatch.setenv(attention.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="JAXSERVE_ATTENTION"):
        attention.attention_mode()


@pytest.mark.parametrize("mode", ["reference", "interpret"])
def test_dispatch_under_jit_matches_reference(monkeypatch, mode):
    monkeypatch.setenv(attention.ENV_VAR, mode)
    rng = rng_for("dispatch", mode)
    batch = ragged_batch(
        rng, [(5, 9), (1, 4), (1, 1)], num_q_heads=4, num_kv_heads=2, head_dim=32, page_size=4, dtype=jnp.float32
    )
    step = jax.jit(lambda *a: pallas_kernels.ragged_paged_attention(*a, sliding_window=6))
    assert_close(step(*batch.args), batch.naive(sliding_window=6), jnp.float32)

    args, naive = decode_batch(
        rng, [9, 1, 4], num_q_heads=4, num_kv_heads=2, head_dim=32, page_size=4, dtype=jnp.float32
    )
    assert_close(jax.jit(pallas_kernels.paged_attention)(*args), naive, jnp.float32)
