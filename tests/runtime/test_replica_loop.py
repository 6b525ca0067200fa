"""The discrete-event loop with a hand-made cost model: clock, arrivals, idling, rejection."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jaxserve
from jaxserve.kv import KVConfig
from jaxserve.metrics import request_metrics, summarize
from jaxserve.runtime import RunLimits, run_replica
from jaxserve.sim.executor import CostModel, SimExecutor


@dataclasses.dataclass(frozen=True)
class Cost:
    duration_s: float
    energy_j: float


class LinearCost(CostModel):
    """1 ms per step plus 0.1 ms per token: easy to compute by hand."""

    def step(self, plan):
        return Cost(0.001 + 0.0001 * plan.num_tokens, 1.0)


def req(rid, prompt_len, out, t):
    return jaxserve.Request(rid, prompt_len=prompt_len, sampling=jaxserve.SamplingParams(out), arrival_time=t)


def test_single_request_timeline_by_hand():
    log = run_replica(jaxserve.scheduler.make("vllm"), KVConfig(64, 16), SimExecutor(LinearCost()), [req("a", 10, 3, 2.0)])
    f = log.freeze()
    # idle until 2.0; prefill 10 tokens: 2 ms; then two decodes of 1.1 ms each
    np.testing.assert_allclose(f.step_end_s, [2.002, 2.0031, 2.0042])
    rm = request_metrics(f)
    assert rm.ttft_s[0] == pytest.approx(0.002)
    assert rm.e2e_s[0] == pytest.approx(0.0042)


def test_requests_arriving_during_a_step_join_at_its_end():
    reqs = [req("a", 100, 2, 0.0), req("b", 10, 2, 0.005)]  # a's prefill runs until 0.011
    log = run_replica(jaxserve.scheduler.make("sarathi"), KVConfig(64, 16), SimExecutor(LinearCost()), reqs).freeze()
    assert log.first_scheduled_s[1] == pytest.approx(0.011)
    assert log.arrival_s[1] == 0.005


def test_rejections_are_counted_with_reasons():
    reqs = [req("ok", 10, 5, 0.0), req("ctx", 100, 100, 0.1), req("kv", 60, 10, 0.2)]
    limits = RunLimits(max_context=150)
    log = run_replica(jaxserve.scheduler.make("sarathi"), KVConfig(4, 16), SimExecutor(LinearCost()), reqs, limits=limits)
    assert "context" in log.rejected[1] and "KV cache" in log.rejected[2]
    m = summarize(log.freeze())
    assert m["num_rejected"] == 2 and m["num_finished"] == 1


@pytest.mark.parametrize("name", ["static", "orca", "vllm", "sarathi", "vtc"])
def test_every_scheduler_serves_a_poisson_workload(name):
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.exponential(0.01, 60))
    reqs = [req(f"r{i}", int(rng.integers(5, 200)), int(rng.integers(1, 40)), float(t)) for i, t in enumerate(times)]
    log = run_replica(jaxserve.scheduler.make(name), KVConfig(128, 16), SimExecutor(LinearCost()), reqs).freeze()
    rm = request_metrics(log)
    assert rm.finished.all()
    assert np.all(np.diff(log.step_end_s) > 0)
    assert (rm.num_output == [r.sampling.max_new_tokens for r in reqs]).all()


def test_max_sim_time_stops_the_run():
    reqs = [req(f"r{i}", 50, 5, i * 0.01) for i in range(100)]
    log = run_replica(
        jaxserve.scheduler.make("vllm"), KVConfig(512, 16), SimExecutor(LinearCost()), reqs,
        limits=RunLimits(max_sim_time_s=0.2),
    ).freeze()
    assert log.step_end_s[-1] < 0.21
    assert 10 < log.num_requests < 30  # arrivals after the limit never enter
    assert not np.isnan(log.finish_s).all()
