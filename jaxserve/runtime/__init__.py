"""The runtime: the replica loop, run limits, the event log and the Executor protocol, beneath
both executors (the simulator's cost models and the engine's ModelRunner) and the step geometry
they share."""

from jaxserve.runtime.events import EventLog, FrozenLog
from jaxserve.runtime.executor import DecodeRun, Executor
from jaxserve.runtime.limits import RunLimits
from jaxserve.runtime.replica import Progress, ProgressHook, Replica, run_replica

__all__ = ["DecodeRun", "EventLog", "Executor", "FrozenLog", "Progress", "ProgressHook", "Replica", "RunLimits", "run_replica"]
