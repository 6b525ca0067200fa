"""Shared checks for event logs (simulator, engine and replica-loop tests)."""

from __future__ import annotations

import dataclasses

import numpy as np


def assert_same_log(a, b):
    """Two FrozenLogs are equal field by field (arrays exactly)."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) and x.dtype != object:
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y if not isinstance(x, np.ndarray) else list(x) == list(y), f.name
