"""jaxserve: a JAX research framework for LLM serving.

Schedulers are pure functions that emit BatchPlans; executors (a jitted Flax model or a simulator's
cost model) run them. See docs/architecture.md.
"""

from jaxserve import kv, scheduler, sim, workload
from jaxserve.plan import BatchPlan, ScheduledRequest, StepOutput
from jaxserve.request import SLO, Request, RequestStatus, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "SLO",
    "BatchPlan",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "ScheduledRequest",
    "StepOutput",
    "kv",
    "scheduler",
    "sim",
    "workload",
]
