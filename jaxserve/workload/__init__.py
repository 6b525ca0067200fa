"""Workloads: arrival processes, length distributions, trace readers, and the Request builder.

``workload_from_config(cfg.workload)`` is the one call a simulator or experiment needs; the parts
compose directly for scripts (``build_requests(read_trace(path), qps=8.0, max_requests=1000)``).
"""

from jaxserve.workload import arrivals, builder, lengths, traces
from jaxserve.workload.arrivals import ARRIVAL_KINDS, ArrivalProcess, fixed_interval, gamma, poisson
from jaxserve.workload.builder import (
    LENGTH_KINDS,
    WORKLOAD_KINDS,
    build_requests,
    lengths_from_config,
    merge_workloads,
    workload_from_config,
)
from jaxserve.workload.lengths import Empirical, Fixed, Pair, Uniform, Zipf
from jaxserve.workload.traces import (
    FORMATS,
    Trace,
    TraceFormatError,
    detect_format,
    read_trace,
    resolve_trace_path,
    traces_dir,
)

__all__ = [
    "ARRIVAL_KINDS",
    "FORMATS",
    "LENGTH_KINDS",
    "WORKLOAD_KINDS",
    "ArrivalProcess",
    "Empirical",
    "Fixed",
    "Pair",
    "Trace",
    "TraceFormatError",
    "Uniform",
    "Zipf",
    "arrivals",
    "build_requests",
    "builder",
    "detect_format",
    "fixed_interval",
    "gamma",
    "lengths",
    "lengths_from_config",
    "merge_workloads",
    "poisson",
    "read_trace",
    "resolve_trace_path",
    "traces",
    "traces_dir",
    "workload_from_config",
]
