"""Test doubles and checks of the cluster tests (simulated and real-engine): a router that piles
everything on one replica, a migration policy that never moves anything (tests start migrations by
hand), a random workload, and the check that every request is served exactly once."""

from __future__ import annotations

import dataclasses

import numpy as np

import jaxserve
from jaxserve.cluster.routers.base import PerRequestRouter
from jaxserve.sim import RooflineCostModel, get_hardware, get_model

COST = RooflineCostModel(get_model("llama-2-7b"), get_hardware("a100-80gb"))


@dataclasses.dataclass(frozen=True)
class Pinned(PerRequestRouter):
    """Everything on ``replica`` while it accepts, then on the lowest accepting one: an imbalance."""

    replica: int = 0

    def choose(self, policy, view, request):
        ok = [r.index for r in view.accepting]
        return policy, (self.replica if self.replica in ok else min(ok, default=None))


@dataclasses.dataclass(frozen=True)
class NeverPolicy:
    """A migration policy that never picks a move."""

    def plan(self, view, candidates, busy):
        return ()


def start_migration_when(cluster, rid: str, num_output: int, then=None) -> list:
    """Starts migrating ``rid`` from replica 0 to 1 after the first step at which it has
    ``num_output`` tokens (replica 0's step hook); returns the list its MigrationRecord joins.
    ``then()`` runs right after the start."""
    records = []
    source = cluster.members[0].replica
    on_step = source._on_step

    def hook(plan, out, state):
        if on_step is not None:
            on_step(plan, out, state)
        run = source.state.running
        r = run.row_index(rid)
        if not records and r is not None and int(run.num_output[r]) >= num_output:
            records.append(cluster.migrator.start(rid, 0, 1, source.now))
            if then is not None:
                then()

    source._on_step = hook
    return records


def workload(seed: int, n: int, rate: float, clients: str = "A") -> list[jaxserve.Request]:
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, n))
    return [
        jaxserve.Request(f"r{i}", prompt_len=int(rng.integers(1, 400)), sampling=jaxserve.SamplingParams(int(rng.integers(1, 200))),
                         arrival_time=float(t), client_id=clients[i % len(clients)])
        for i, t in enumerate(times)
    ]  # fmt: skip


def tokens_per_request(log) -> np.ndarray:
    return np.bincount(log.token_req, minlength=log.num_requests)


def assert_each_request_served_once(log, requests):
    """Every request finished with exactly its max_new_tokens tokens, or is rejected/failed with a reason."""
    by_id = {r.request_id: r for r in requests}
    assert sorted(info.request_id for info in log.requests) == sorted(by_id)  # each logged once
    got = tokens_per_request(log)
    for i, info in enumerate(log.requests):
        reason = log.finish_reason[i]
        if reason.startswith(("rejected: ", "failed: ")):
            continue
        assert reason in ("stop", "length"), (info.request_id, reason)
        assert got[i] == by_id[info.request_id].sampling.max_new_tokens, info.request_id
