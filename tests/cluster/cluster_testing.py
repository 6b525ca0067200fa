"""Test doubles of the cluster tests (simulated and real-engine): a router that piles everything on
one replica, and a migration policy that never moves anything (tests start migrations by hand)."""

from __future__ import annotations

import dataclasses

from jaxserve.cluster.routers.base import PerRequestRouter


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
