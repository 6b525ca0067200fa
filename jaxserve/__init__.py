"""jaxserve: a JAX research framework for LLM serving.

Schedulers are pure functions that emit BatchPlans; executors (a jitted Flax model or a simulator's
cost model) run them. See docs/architecture.md.
"""

from jaxserve import kv, scheduler, sim, workload
from jaxserve.plan import BatchPlan, ScheduledRequest, StepOutput
from jaxserve.request import SLO, Request, RequestStatus, SamplingParams

__version__ = "0.1.0"


def __getattr__(name):
    # The engine pulls in flax and the model code; load it only when asked for.
    if name in ("LLM", "Completion"):
        from jaxserve import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")


__all__ = [
    "LLM",
    "SLO",
    "BatchPlan",
    "Completion",
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
