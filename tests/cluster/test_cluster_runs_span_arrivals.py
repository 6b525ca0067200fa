"""A cluster replica's deferred decode run goes on through the arrivals placed on it while its queue
head is blocked (they join the run, as on a lone replica): the log equals step-by-step serving."""

from __future__ import annotations

import numpy as np
import pytest
from cluster_testing import COST, assert_each_request_served_once, workload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from log_testing import assert_same_log

import jaxserve
from jaxserve.cluster import ClusterEvent, ReplicaSpec, run_cluster
from jaxserve.cluster import routers
from jaxserve.kv import KVConfig
from jaxserve.runtime.replica import Replica
from jaxserve.sim.executor import SimExecutor


def spec(scheduler: str, num_blocks: int) -> ReplicaSpec:
    return ReplicaSpec(jaxserve.scheduler.make(scheduler), KVConfig(num_blocks, 16), SimExecutor(COST))


def count_joins(monkeypatch) -> list:
    """Counts the arrivals that joined a pending run (``Replica._add_during_run`` not cutting it)."""
    joins = []
    original = Replica._add_during_run

    def counted(self, request, run, t):
        ok = original(self, request, run, t)
        if self._pending is not None and self._pending.arrivals and self._pending.arrivals[-1] == t:
            joins.append(t)
        return ok

    monkeypatch.setattr(Replica, "_add_during_run", counted)
    return joins


def both_ways(specs, router: str, requests, events=()):
    return [run_cluster(specs(), routers.make(router), requests, events, fast_forward=ff).freeze() for ff in (False, True)]


@pytest.mark.parametrize("scheduler, router", [("vllm", "shortest_queue"), ("sarathi", "shortest_queue"),
                                               ("vllm", "freeness"), ("sarathi", "round_robin")])
def test_overloaded_replicas_join_arrivals_to_their_runs_and_change_nothing(monkeypatch, router, scheduler):
    joins = count_joins(monkeypatch)
    requests = workload(7, 260, rate=80.0)  # small pools: queues back up, heads stay blocked
    logs = both_ways(lambda: [spec(scheduler, 120), spec(scheduler, 160), spec(scheduler, 120)], router, requests)
    assert_same_log(*logs)
    np.testing.assert_array_equal(logs[0].step_replica, logs[1].step_replica)
    assert_each_request_served_once(logs[1], requests)
    assert len(joins) > 20  # the runs did go on through arrivals


def test_events_cut_runs_that_arrivals_joined(monkeypatch):
    """A failure, an added replica and a drain land in the middle of runs that arrivals joined."""
    joins = count_joins(monkeypatch)
    requests = workload(8, 240, rate=70.0, clients="AB")
    events = [ClusterEvent(0.8, "fail", replica=1), ClusterEvent(1.3, "add", spec=spec("vllm", 150)),
              ClusterEvent(2.0, "drain", replica=0)]  # fmt: skip
    logs = both_ways(lambda: [spec("vllm", 120), spec("sarathi", 140), spec("vllm", 130)], "shortest_queue",
                     requests, events)  # fmt: skip
    assert_same_log(*logs)
    assert_each_request_served_once(logs[1], requests)
    assert joins


@pytest.mark.slow
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10_000), rate=st.sampled_from([20.0, 60.0, 150.0]),
       blocks=st.lists(st.sampled_from([60, 100, 300]), min_size=1, max_size=4),
       scheduler=st.sampled_from(["vllm", "sarathi", "orca"]), router=st.sampled_from(["shortest_queue", "least_kv"]))
def test_the_fast_path_through_arrivals_equals_stepping(seed, rate, blocks, scheduler, router):
    requests = workload(seed, 120, rate=rate)
    logs = both_ways(lambda: [spec(scheduler, b) for b in blocks], router, requests)
    assert_same_log(*logs)
    np.testing.assert_array_equal(logs[0].step_replica, logs[1].step_replica)
