"""``least_kv``: the accepting replica with the least KV load, blocks in use plus those its queued
prompts will need, as a fraction of its pool (so replicas of different sizes compare)."""

from __future__ import annotations

import dataclasses

from jaxserve.cluster.routers.base import PerRequestRouter
from jaxserve.cluster.view import least


@dataclasses.dataclass(frozen=True)
class LeastKVRouter(PerRequestRouter):
    def choose(self, policy, view, request):
        return policy, least(view.accepting, lambda r: r.kv_load)
