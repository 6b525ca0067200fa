"""Pure-function schedulers: one file per policy, composed from shared parts, and a registry.

    >>> import jaxserve
    >>> sched = jaxserve.scheduler.make("sarathi", chunk_size=256)
"""

from jaxserve.scheduler.base import BatchingScheduler, Scheduler, SchedulerState, WholePromptScheduler
from jaxserve.scheduler.chunking import Chunked, whole
from jaxserve.scheduler.orca import OrcaScheduler
from jaxserve.scheduler.queues import (
    FCFS,
    FairOrder,
    KeyedOrder,
    fcfs_key,
    priority_key,
    shortest_prompt_key,
)
from jaxserve.scheduler.registry import available, make, register
from jaxserve.scheduler.sarathi import SarathiScheduler
from jaxserve.scheduler.seq import FinishedRequest, SeqState
from jaxserve.scheduler.static import StaticScheduler
from jaxserve.scheduler.step import StepBuilder
from jaxserve.scheduler.vllm import VLLMScheduler
from jaxserve.scheduler.vtc import make_vtc

register("static", StaticScheduler)
register("orca", OrcaScheduler)
register("vllm", VLLMScheduler)
register("sarathi", SarathiScheduler)
register("vtc", make_vtc)

__all__ = [
    "BatchingScheduler",
    "Chunked",
    "FCFS",
    "FairOrder",
    "FinishedRequest",
    "KeyedOrder",
    "OrcaScheduler",
    "SarathiScheduler",
    "Scheduler",
    "SchedulerState",
    "SeqState",
    "StaticScheduler",
    "StepBuilder",
    "VLLMScheduler",
    "WholePromptScheduler",
    "available",
    "fcfs_key",
    "make",
    "make_vtc",
    "priority_key",
    "register",
    "shortest_prompt_key",
    "whole",
]
