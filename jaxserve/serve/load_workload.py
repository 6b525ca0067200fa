"""The load client's workload: ``LoadRequest``s from a trace, or synthetic arrivals with a length
distribution, through ``jaxserve.workload`` (the simulator's readers and builder, so a replay and a
simulation of the same flags serve the same requests).

Every ``ValueError`` here names the command-line flag at fault (``WorkloadError``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jaxserve.serve.load_client import LoadRequest
from jaxserve.workload import ArrivalProcess, TraceFormatError, build_requests, lengths_from_config, read_trace, resolve_trace_path


class WorkloadError(ValueError):
    """A workload flag is wrong; the message starts with the flag."""


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """What the workload flags say. ``trace``: a trace path (``resolve_trace_path`` rules) or None;
    ``arrivals``: "trace" (the trace's timestamps) | "poisson" | "gamma" | "fixed"; ``rate``: req/s of
    synthetic arrivals, or the mean rate ``(n - 1) / span`` a trace's selected requests are rescaled
    to after the cuts (None: as recorded); ``speedup``:
    divides a trace's gaps; ``lengths``: a ``--lengths`` spec ("fixed:P,O", "uniform:LO,HI",
    "zipf:A,LO,HI", "file:PATH") or None for the trace's own; ``max_context``: drop requests whose
    prompt + output exceed it (0: keep all)."""

    trace: Optional[str] = None
    trace_format: str = "auto"
    arrivals: str = "trace"
    rate: Optional[float] = None
    cv: float = 1.0
    num_requests: int = 100
    lengths: Optional[str] = None
    speedup: float = 1.0
    start_s: float = 0.0
    duration_s: Optional[float] = None
    max_requests: Optional[int] = None
    max_context: int = 0
    seed: int = 0
    client_id: str = "default"


def parse_lengths(spec: str) -> dict:
    """A ``--lengths`` spec as a ``workload.lengths`` mapping (for ``lengths_from_config``)."""
    kind, _, rest = spec.partition(":")
    fields = {"fixed": ("prompt_len", "output_len"), "uniform": ("low", "high"), "zipf": ("a", "low", "high")}
    if kind == "file":
        if not rest:
            raise WorkloadError("--lengths file:PATH needs a path (a length CSV or any trace)")
        return {"kind": "trace", "path": rest}
    if kind not in fields:
        raise WorkloadError(f"--lengths {spec!r}: expected fixed:P,O | uniform:LO,HI | zipf:A,LO,HI | file:PATH")
    parts = rest.split(",")
    if len(parts) != len(fields[kind]):
        raise WorkloadError(f"--lengths {spec!r}: {kind} takes {len(fields[kind])} numbers ({', '.join(fields[kind])})")
    try:
        values = [float(p) if name == "a" else int(p) for name, p in zip(fields[kind], parts)]
    except ValueError:
        raise WorkloadError(f"--lengths {spec!r}: {rest!r} are not numbers") from None
    return {"kind": kind, **dict(zip(fields[kind], values))}


def build_load(spec: WorkloadSpec) -> list[LoadRequest]:
    """The requests ``spec`` describes, in arrival order, the first at 0 s (see ``WorkloadSpec``)."""
    trace = None
    if spec.trace is not None:
        path = resolve_trace_path(spec.trace)
        try:
            trace = read_trace(path, spec.trace_format)
        except (TraceFormatError, OSError) as e:
            raise WorkloadError(f"--trace {spec.trace}: {e}") from None
    elif spec.arrivals == "trace":
        raise WorkloadError("--trace is required unless --arrivals is poisson, gamma or fixed")
    try:
        lengths = None if spec.lengths is None else lengths_from_config(parse_lengths(spec.lengths), "--lengths")
    except (FileNotFoundError, ValueError) as e:  # lengths_from_config's messages start with "--lengths"
        raise WorkloadError(str(e) if str(e).startswith("--lengths") else f"--lengths {spec.lengths}: {e}") from None
    if trace is None and lengths is None:
        raise WorkloadError("--lengths is required with synthetic --arrivals and no --trace")
    arrivals = None
    if spec.arrivals != "trace":
        if spec.rate is None:
            raise WorkloadError(f"--rate is required with --arrivals {spec.arrivals}")
        arrivals = ArrivalProcess(spec.arrivals, spec.rate, spec.cv)
    elif trace.arrival_s is None:
        raise WorkloadError(f"--trace {spec.trace} has lengths only, no timestamps: give --arrivals poisson|gamma|fixed and --rate")
    if spec.speedup != 1.0 and spec.rate is not None and spec.arrivals == "trace":
        raise WorkloadError("give --speedup or --rate for a trace replay, not both")
    try:
        built = build_requests(
            trace, arrivals=arrivals, lengths=lengths, num_requests=None if trace is not None else spec.num_requests,
            seed=spec.seed, time_scale=1.0 / spec.speedup, start_s=spec.start_s, duration_s=spec.duration_s,
            client_id=spec.client_id,
        )  # fmt: skip
    except ValueError as e:
        raise WorkloadError(f"workload flags: {e}") from None
    if spec.max_context > 0:
        built = [r for r in built if r.max_total_tokens <= spec.max_context]
    if spec.max_requests is not None:
        built = built[: spec.max_requests]
    if not built:
        raise WorkloadError("the workload flags select no request (--start-s, --duration-s, --max-requests, --max-context)")
    times = np.array([r.arrival_time for r in built])
    times -= times[0]
    if arrivals is None and spec.rate is not None and len(times) > 1:  # the rate of what is sent
        if times[-1] <= 0:
            raise WorkloadError(f"--rate {spec.rate}: the {len(times)} selected requests arrive at once")
        times *= (len(times) - 1) / (times[-1] * spec.rate)
    return [
        LoadRequest(r.request_id, float(t), r.prompt_len, r.sampling.max_new_tokens, r.client_id, r.prefix_block_hashes,
                    r.prefix_hash_block_size)  # fmt: skip
        for r, t in zip(built, times)
    ]
