"""Machine speed against a profile, for comparing step times measured at different moments on a
machine whose speed drifts (a shared VM's varies by tens of percent within minutes, far more than
any cost model's error).

``SpeedProbe`` times a few of a profile's step shapes again and returns the machine's *speed*: the
median over them of (time now / time in the profile), so 1.0 means as fast as when profiled and
1.2 means 20 % slower. Its plans use only KV pages at or above ``first_page``, a reserve beyond what
the scheduler manages, so it can run between the steps of a live engine without touching any
request's KV.

``DriftCompensatedRunner`` is a ModelRunner as the engine's executor whose clock runs in the
profile's seconds: every ``every`` steps it probes, and it reports each step's duration divided by
the current speed (the median of the last ``window`` probes). Raw durations and speeds are kept.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.kv.config import KVConfig
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.calibration.plans import build_plan, time_step
from jaxserve.calibration.profile_format import Profile
from jaxserve.request import Request


class SpeedProbe:
    """``measure()`` -> the speed now (see the module docstring). ``num_points`` profile points,
    evenly spread over the file among those that fit the reserve, each timed ``repeats`` times in
    interleaved passes as the profiler does (a point's first measurement compiles it first)."""

    def __init__(self, runner, profile: Profile, *, first_page: int, num_points: int = 4, seed: int = 0):
        block_size = runner.kv.block_size
        if profile.block_size != block_size:
            raise ValueError(f"profile block_size {profile.block_size} != the runner's {block_size}")
        free = runner.kv.num_blocks - first_page
        fits = [p for p in profile.points if p.spec().blocks_needed(block_size) <= free]
        if not fits:
            raise ValueError(f"no profile point fits the probe's reserve of {free} KV pages")
        picks = np.linspace(0, len(fits) - 1, min(num_points, len(fits))).round().astype(int)
        self.points = [fits[i] for i in picks]
        self.runner = runner
        self._rng = np.random.default_rng(seed)
        self._plans = [
            build_plan(p.spec(), block_size, runner.cfg.vocab_size, runner.kv.num_blocks, self._rng,
                       profile.temperature, first_page=first_page, id_prefix="speed-probe-")
            for p in self.points
        ]  # fmt: skip
        self._compiled = False

    def measure(self, repeats: int = 1) -> float:
        samples = [[] for _ in self.points]
        for _ in range(repeats):
            for i in self._rng.permutation(len(self.points)):
                spec = self.points[i].spec()
                t = time_step(self.runner, spec, *self._plans[i], warmup=1, first_visit=not self._compiled)
                samples[i].append(t)
            self._compiled = True
        return float(np.median([np.median(t) / p.median_s for t, p in zip(samples, self.points)]))


class DriftCompensatedRunner:
    """The engine-facing executor (``register``/``release``/``execute``, ``kv`` = the scheduler's
    pool, which must leave the probe's reserve of the runner's pages unused); see the module
    docstring. ``raw_s[k]`` and ``speeds[k]`` are step k's measured seconds and the speed it was
    divided by; ``probes`` every probe's speed in order."""

    def __init__(self, runner, probe: SpeedProbe, kv: KVConfig, *, every: int = 32, window: int = 3):
        if kv.block_size != runner.kv.block_size or kv.num_blocks > runner.kv.num_blocks:
            raise ValueError(f"scheduler KV {kv} does not fit in the runner's cache {runner.kv}")
        self.runner, self.probe, self.kv = runner, probe, kv
        self.max_model_len = runner.max_model_len
        self.every, self.window = int(every), int(window)
        self.probes = [probe.measure(repeats=2)]
        self.raw_s: list[float] = []
        self.speeds: list[float] = []

    @property
    def speed(self) -> float:
        return float(np.median(self.probes[-self.window :]))

    def register(self, request: Request) -> None:
        self.runner.register(request)

    def release(self, request_id: str) -> None:
        self.runner.release(request_id)

    def execute(self, plan: BatchPlan) -> StepOutput:
        out = self.runner.execute(plan)
        speed = self.speed
        self.raw_s.append(out.duration_s)
        self.speeds.append(speed)
        if len(self.raw_s) % self.every == 0:
            self.probes.append(self.probe.measure())
        return dataclasses.replace(out, duration_s=out.duration_s / speed)
