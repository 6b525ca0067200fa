"""jaxserve.calibration.speed: the speed probe keeps to its reserved pages (a live engine's tokens do not change
when it probes between every step), and the drift-compensated clock divides by the right speed."""

from __future__ import annotations

import numpy as np
import pytest
from engine_testing import RUNNER_KV, greedy, prompt, request

from jaxserve.engine.engine import Engine
from jaxserve.kv.config import KVConfig
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.calibration.profile_format import PointSpec, Profile
from jaxserve import scheduler as schedulers
from jaxserve.calibration.speed import DriftCompensatedRunner, SpeedProbe

SCHED_KV = KVConfig(48, RUNNER_KV.block_size)  # pages 48..63 are the probe's reserve
PROFILED_S = 2e-3


def tiny_profile(runner, specs) -> Profile:
    return Profile(model={}, dtype="float32", device={}, block_size=runner.kv.block_size,
                   points=tuple(s.point([PROFILED_S]) for s in specs), engine=runner.geometry, temperature=0.0)  # fmt: skip


SPECS = (PointSpec(decode=(9,)), PointSpec(prefill=((0, 12),)), PointSpec(prefill=((4, 6),), decode=(5, 7)))


def test_probe_plans_use_only_the_reserve_and_measure_a_ratio(runner):
    big = PointSpec(decode=(200,))  # 51 pages: more than the reserve, so never chosen
    probe = SpeedProbe(runner, tiny_profile(runner, SPECS + (big,)), first_page=48, num_points=8)
    assert [p.spec() for p in probe.points] == list(SPECS)
    pages = {b for plan, _ in probe._plans for table in plan.block_tables for b in table}
    assert pages and min(pages) >= 48 and max(pages) < RUNNER_KV.num_blocks
    speed = probe.measure(repeats=2)
    assert np.isfinite(speed) and speed > 0
    with pytest.raises(ValueError, match="no profile point fits"):
        SpeedProbe(runner, tiny_profile(runner, (big,)), first_page=48)
    wrong = Profile(model={}, dtype="float32", device={}, block_size=16, points=(), engine=runner.geometry)
    with pytest.raises(ValueError, match="block_size 16"):
        SpeedProbe(runner, wrong, first_page=48)


def test_probing_between_every_step_leaves_the_engine_tokens_unchanged(runner):
    reqs = [request(f"r{i}", prompt(i, 10 + 3 * i), greedy(6)) for i in range(3)]
    plain = Engine(runner, schedulers.make("vllm"), RUNNER_KV).serve(reqs)
    probe = SpeedProbe(runner, tiny_profile(runner, SPECS), first_page=SCHED_KV.num_blocks)
    executor = DriftCompensatedRunner(runner, probe, SCHED_KV, every=1, window=2)
    probed = Engine(executor, schedulers.make("vllm"), executor.kv).serve(reqs)
    for r in reqs:
        assert probed.finished[r.request_id].output_token_ids == plain.finished[r.request_id].output_token_ids
    steps = len(executor.raw_s)
    assert len(executor.probes) == steps + 1  # one before the run, one after every step
    np.testing.assert_allclose(np.asarray(probed.log.freeze().step_duration_s),
                               np.asarray(executor.raw_s) / np.asarray(executor.speeds), rtol=1e-12)  # fmt: skip


class FakeRunner:
    kv = KVConfig(16, 4)
    max_model_len = 64

    def __init__(self):
        self.registered = []

    def register(self, request):
        self.registered.append(request.request_id)

    def release(self, request_id):
        self.registered.remove(request_id)

    def execute(self, plan):
        return StepOutput({}, duration_s=0.012)


class FakeProbe:
    def __init__(self, speeds):
        self.speeds = list(speeds)

    def measure(self, repeats=1):
        return self.speeds.pop(0)


def test_clock_divides_by_the_median_of_the_last_probes():
    executor = DriftCompensatedRunner(FakeRunner(), FakeProbe([1.0, 2.0, 4.0, 0.5]), KVConfig(8, 4), every=2, window=2)
    plan = BatchPlan.empty(4)
    durations = [executor.execute(plan).duration_s for _ in range(6)]
    # probes: 1.0 before the run, 2.0 after step 2, 4.0 after step 4, 0.5 after step 6
    np.testing.assert_allclose(executor.speeds, [1.0, 1.0, 1.5, 1.5, 3.0, 3.0])
    np.testing.assert_allclose(durations, 0.012 / np.array([1.0, 1.0, 1.5, 1.5, 3.0, 3.0]))
    assert executor.raw_s == [0.012] * 6 and executor.probes == [1.0, 2.0, 4.0, 0.5]
    with pytest.raises(ValueError, match="does not fit"):
        DriftCompensatedRunner(FakeRunner(), FakeProbe([1.0]), KVConfig(32, 4))
    with pytest.raises(ValueError, match="does not fit"):
        DriftCompensatedRunner(FakeRunner(), FakeProbe([1.0]), KVConfig(8, 8))
