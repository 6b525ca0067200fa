"""``round_robin``: the next accepting replica in turn, whatever its load (the baseline)."""

from __future__ import annotations

import dataclasses

from jaxserve.cluster.routers.base import PerRequestRouter


@dataclasses.dataclass(frozen=True)
class RoundRobinRouter(PerRequestRouter):
    def init_policy(self, num_replicas: int) -> int:
        return 0  # the replica index to try first

    def choose(self, policy, view, request):
        n = len(view.replicas)
        for step in range(n):
            i = (policy + step) % n
            if view.replicas[i].accepting:
                return (i + 1) % n, i
        return policy, None
