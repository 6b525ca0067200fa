"""The cluster layer: many replicas on one clock (``Cluster``), routers that place requests on
them (``jaxserve.cluster.routers``), cluster events (add, drain, remove, fail) and what survives a
failure (``faults``)."""

from jaxserve.cluster.cluster import Cluster, ClusterEvent, ReplicaSpec, run_cluster
from jaxserve.cluster.view import ClusterView, ReplicaView

__all__ = ["Cluster", "ClusterEvent", "ClusterView", "ReplicaSpec", "ReplicaView", "run_cluster"]
