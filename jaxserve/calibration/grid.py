"""The grids of step shapes the profiler measures."""

from __future__ import annotations

import numpy as np

from jaxserve.calibration.profile_format import PointSpec

GRIDS = ("small", "default")


def _decodes(count: int, context: int) -> tuple[int, ...]:
    return (context,) * count


def _spread(count: int, lo: int, hi: int) -> tuple[int, ...]:
    """``count`` decode contexts evenly spread over [lo, hi] (a batch of requests at different ages)."""
    return tuple(int(v) for v in np.linspace(lo, hi, count).round())


def grid_points(name: str) -> tuple[PointSpec, ...]:
    """The shapes of grid ``name``. ``small``: 15 points in 4 bucket shapes of a tiny model (tests,
    a quick look); ``default``: 116 points up to 2048-token chunks and 256 decodes, on and off the
    engine's bucket sizes, uniform and spread decode contexts (the engine's attention work follows
    a batch's longest context, its matmuls the padded row count)."""
    if name == "small":
        # Decode counts 5 and 6 share one decode bucket and every chunk fits 1-2 blocks of 32 rows,
        # so the whole grid compiles 4 step shapes; contexts stay under 256 positions.
        prefill = [((0, 32),), ((0, 16),), ((64, 32),), ((160, 32),), ((0, 64),),
                   ((0, 32), (0, 32)), ((32, 32), (0, 20))]  # fmt: skip
        specs = [PointSpec(p) for p in prefill]
        specs += [PointSpec((), _decodes(d, ctx)) for d in (5, 6) for ctx in (16, 64, 200)]
        specs += [PointSpec(((0, 32),), _decodes(6, 64)), PointSpec(((96, 24),), _spread(5, 20, 160))]
        return tuple(specs)
    if name == "default":
        # Contexts stop at 2000 so a 2048-position model keeps every decode point.
        specs = [PointSpec(((0, n),)) for n in (16, 40, 100, 256, 500, 1024, 2048)]
        specs += [PointSpec(((c, n),)) for c in (256, 1024, 1700) for n in (100, 300, 512)]
        specs += [PointSpec(((3072, n),)) for n in (128, 1024)]
        specs += [PointSpec(((0, n),) * k) for k in (2, 4, 8) for n in (50, 250)]
        specs += [PointSpec(((512, 256),) * 4), PointSpec(((0, 300), (700, 180), (90, 20)))]
        specs += [PointSpec((), _decodes(d, ctx)) for d in (1, 2, 3, 6, 12, 24, 48, 96, 192, 256)
                  for ctx in (64, 400, 1000, 2000)]  # fmt: skip
        # Spread contexts are what serving runs; the batch sizes a scheduler capped at 64 sequences
        # visits most get the densest coverage.
        specs += [PointSpec((), _spread(d, 16, hi)) for d in (2, 4, 8, 12, 16, 20, 24, 32, 40, 48, 64, 100, 200)
                  for hi in (600, 1500)]  # fmt: skip
        specs += [PointSpec(((0, n),), _decodes(d, ctx)) for d in (4, 16, 64) for n in (64, 256, 500)
                  for ctx in (300, 1200)]  # fmt: skip
        specs += [PointSpec(((c, 200),), _spread(d, 16, 1500)) for d in (10, 30, 60) for c in (0, 800)]
        return tuple(specs)
    raise ValueError(f"grid must be one of {GRIDS}, got {name!r}")
