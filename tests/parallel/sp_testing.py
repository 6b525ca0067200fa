"""Shared by the sequence-parallel tests: the forced host devices, random inputs, tolerances."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.parallel.mesh import sequence_mesh

NUM_DEVICES = 8
# float32: the online softmax reorders sums, nothing more. bfloat16: the probabilities are rounded to
# bfloat16 before the value matmul (as the Pallas kernels do) while the reference keeps them float32.
TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def mesh(size: int = NUM_DEVICES):
    """A sequence mesh over ``size`` of the forced host CPU devices (tests/conftest.py sets 8)."""
    cpus = jax.devices("cpu")
    if len(cpus) < size:
        pytest.fail(
            f"{len(cpus)} CPU devices, need {size}: run under tests/conftest.py, which sets "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts"
        )
    return sequence_mesh(cpus, size)


def normal(rng: np.random.Generator, shape, dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)


def assert_close(actual, expected, dtype=jnp.float32):
    tol = TOLERANCES[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=tol)
