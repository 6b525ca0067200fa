"""``shortest_queue`` (join the shortest queue): the accepting replica with the fewest requests,
waiting and running together (ties: the lowest index)."""

from __future__ import annotations

import dataclasses

from jaxserve.cluster.routers.base import PerRequestRouter
from jaxserve.cluster.view import least


@dataclasses.dataclass(frozen=True)
class ShortestQueueRouter(PerRequestRouter):
    def choose(self, policy, view, request):
        return policy, least(view.accepting, lambda r: r.num_requests)
