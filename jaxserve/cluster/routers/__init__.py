"""Routers: pure policies that place requests on a cluster's replicas (protocol in ``base``), one
file each, registered by name (``make("shortest_queue")``)."""

from jaxserve.cluster.routers.base import PerRequestRouter, Placements, QueuedState, Router
from jaxserve.cluster.routers.fair import FairRouter
from jaxserve.cluster.routers.freeness import FreenessRouter, freeness
from jaxserve.cluster.routers.least_kv import LeastKVRouter
from jaxserve.cluster.routers.prefix_affinity import PrefixAffinityRouter
from jaxserve.cluster.routers.registry import available, make, option_names, register
from jaxserve.cluster.routers.round_robin import RoundRobinRouter
from jaxserve.cluster.routers.shortest_queue import ShortestQueueRouter

register("round_robin", RoundRobinRouter)
register("shortest_queue", ShortestQueueRouter)
register("least_kv", LeastKVRouter)
register("prefix_affinity", PrefixAffinityRouter)
register("freeness", FreenessRouter)
register("fair", FairRouter)

__all__ = [
    "FairRouter", "FreenessRouter", "LeastKVRouter", "PerRequestRouter", "Placements", "PrefixAffinityRouter",
    "QueuedState", "RoundRobinRouter", "Router", "ShortestQueueRouter", "available", "freeness", "make",
    "option_names", "register",
]
