"""A named ``jax.sharding.Mesh`` with one sequence axis ``"sp"`` (sequence parallelism)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

SP_AXIS = "sp"


def sequence_mesh(devices: Sequence[jax.Device] | None = None, size: int | None = None) -> Mesh:
    """A 1-D mesh named ``"sp"`` over the first ``size`` of ``devices`` (default: all of
    ``jax.devices()``). Raises ``ValueError`` when ``size`` is not in ``[1, len(devices)]``."""
    devices = list(jax.devices() if devices is None else devices)
    size = len(devices) if size is None else size
    if not 1 <= size <= len(devices):
        raise ValueError(f"sequence-parallel size must be in [1, {len(devices)}] (the devices given), got {size}")
    return Mesh(np.array(devices[:size]), (SP_AXIS,))
