"""Several clients from one workload: each request goes to a client drawn by weight.

``"A:1,B:2"`` splits a stream into clients A and B with a third and two thirds of its requests.
Splitting a Poisson stream at random gives independent Poisson streams at the split rates (and a
trace replay keeps its burstiness in each share), so one workload config describes clients that
send at different rates, which is what a fairness policy (VTC) needs to show anything.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

from jaxserve.request import Request

_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def parse_clients(text: str, key: str = "workload.clients") -> tuple[tuple[str, float], ...]:
    """``"name:weight,..."`` -> ((name, weight), ...); "" -> () (one client). ValueError names ``key``."""
    if not text.strip():
        return ()
    out: list[tuple[str, float]] = []
    for part in text.split(","):
        name, sep, weight = part.strip().partition(":")
        if not sep or not _NAME.match(name):
            raise ValueError(f"{key}: expected 'name:weight,...' (names of letters, digits, '_', '.'), got {part.strip()!r}")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"{key}: weight of client {name!r} must be a number, got {weight!r}") from None
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"{key}: weight of client {name!r} must be > 0, got {weight!r}")
        if any(name == n for n, _ in out):
            raise ValueError(f"{key}: client {name!r} appears twice")
        out.append((name, w))
    return tuple(out)


def assign_clients(requests: Sequence[Request], clients: Sequence[tuple[str, float]], seed: int) -> list[Request]:
    """Each request goes to a client drawn with probability weight / total (reproducible per
    ``seed``); ids become ``'<client>-<n>'``, numbered per client in arrival order."""
    if not clients:
        return list(requests)
    names = [n for n, _ in clients]
    weights = np.array([w for _, w in clients])
    picks = np.random.default_rng([seed, 0x636C69656E74]).choice(len(names), size=len(requests), p=weights / weights.sum())
    counts = [0] * len(names)
    out = []
    for r, c in zip(requests, picks):
        out.append(dataclasses.replace(r, client_id=names[c], request_id=f"{names[c]}-{counts[c]}"))
        counts[c] += 1
    return out
