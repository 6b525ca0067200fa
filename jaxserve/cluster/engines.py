"""Real-engine replicas for a cluster: a ``ReplicaSpec`` around an executor that runs the model —
an in-process ``ModelRunner`` or a ``RayExecutor`` (a runner in a Ray actor). The cluster code is
the same for both and for simulated replicas: the executor is the only difference.

The clock is the engines' measured-time clock: each step advances its replica by the step's
measured wall time, and a live migration's copy stages take the measured time of ``read_kv`` +
``write_kv``. Replicas run one after another in this process (steps do not overlap in wall time),
while the cluster clock treats them as parallel machines.
"""

from __future__ import annotations

from jaxserve.cluster.cluster import ReplicaSpec
from jaxserve.runtime.limits import RunLimits


def engine_replica(executor, scheduler, name: str = "") -> ReplicaSpec:
    """A replica serving with ``scheduler`` over ``executor``'s KV cache (its ``kv`` config; the
    context limit is its ``max_model_len``)."""
    return ReplicaSpec(scheduler, executor.kv, executor, RunLimits(max_context=executor.max_model_len), name)
