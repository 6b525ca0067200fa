"""Workloads -> ``list[Request]``: replayed traces (windowed, rescaled) and synthetic specs.

Requests are length-only (placeholder prompt ids) and sorted by arrival time, the first at 0 s.
Nothing here checks a request against a model or KV cache: the simulator rejects what cannot fit.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np

from jaxserve.request import Request, SamplingParams
from jaxserve.workload import lengths as lengths_lib
from jaxserve.workload import traces
from jaxserve.workload.arrivals import ArrivalProcess, check_count, check_positive
from jaxserve.workload.clients import assign_clients, parse_clients

WORKLOAD_KINDS = ("poisson", "gamma", "fixed", "trace")
LENGTH_KINDS = ("fixed", "uniform", "zipf", "trace")


def build_requests(
    trace: Optional[traces.Trace] = None,
    *,
    arrivals: Union[ArrivalProcess, np.ndarray, None] = None,
    lengths: Optional[lengths_lib.PairDistribution] = None,
    num_requests: Optional[int] = None,
    seed: int = 0,
    time_scale: float = 1.0,
    qps: Optional[float] = None,
    start_s: float = 0.0,
    duration_s: Optional[float] = None,
    max_requests: Optional[int] = None,
    client_id: str = "default",
    id_prefix: Optional[str] = None,
    sampling: Optional[SamplingParams] = None,
) -> list[Request]:
    """Builds length-only requests from a trace, a synthetic spec, or a trace with columns replaced.

    Rows: the trace's rows, or ``num_requests`` synthetic ones (no trace). ``arrivals`` (a process,
    or explicit times in seconds) replaces the trace's timestamps and is required when it has none;
    ``lengths`` (a pair distribution) replaces its lengths and drops its prefix hashes. Random draws
    come from ``seed`` only, arrivals and lengths from independent streams.

    Then, in order: keep rows with ``start_s <= t < start_s + duration_s`` (source seconds), keep the
    first ``max_requests``, rebase the first kept arrival to 0, and rescale time: gaps multiplied by
    ``time_scale`` (< 1 is faster), or all times scaled so the mean rate ``(n - 1) / span`` is
    exactly ``qps`` requests/s. Request ids are ``id_prefix`` (default ``"<client_id>-"``) plus the
    source row index. ``sampling`` is a template whose ``max_new_tokens`` each request replaces.
    """
    seed = check_count("seed", seed)
    time_scale = check_positive("time_scale", time_scale)
    if qps is not None:
        qps = check_positive("qps", qps)
        if time_scale != 1.0:
            raise ValueError(f"give time_scale or qps, not both (time_scale={time_scale}, qps={qps})")
    start_s = _check_nonnegative("start_s", start_s)
    if duration_s is not None:
        duration_s = check_positive("duration_s", duration_s)
    if max_requests is not None:
        max_requests = check_count("max_requests", max_requests)
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"client_id must be a non-empty str, got {client_id!r}")
    prefix = f"{client_id}-" if id_prefix is None else id_prefix
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams or None, got {type(sampling).__name__}")

    arrival_rng, length_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    times, prompt, output, hashes, block_size = _columns(
        trace, arrivals, lengths, num_requests, arrival_rng, length_rng
    )

    keep = times >= start_s
    if duration_s is not None:
        keep &= times < start_s + duration_s
    rows = np.flatnonzero(keep)
    if max_requests is not None:
        rows = rows[:max_requests]
    t = times[rows]
    if len(t):
        t = t - t[0]
    if qps is not None and len(t) > 1:
        if t[-1] <= 0:
            raise ValueError(f"cannot rescale to qps={qps}: all {len(t)} selected requests arrive at once")
        t = t * ((len(t) - 1) / (t[-1] * qps))
    elif time_scale != 1.0:
        t = t * time_scale

    by_output: dict[int, SamplingParams] = {}  # immutable, so requests with equal outputs share one
    requests = []
    for row, arrival, p, o in zip(rows.tolist(), t.tolist(), prompt[rows].tolist(), output[rows].tolist()):
        params = by_output.get(o)
        if params is None:
            if sampling is None:
                params = by_output[o] = SamplingParams(max_new_tokens=o)
            else:
                params = by_output[o] = dataclasses.replace(sampling, max_new_tokens=o)
        requests.append(
            Request(
                request_id=f"{prefix}{row}",
                prompt_len=p,
                sampling=params,
                arrival_time=arrival,
                client_id=client_id,
                prefix_block_hashes=None if hashes is None else hashes[row],
                prefix_hash_block_size=block_size,
            )
        )
    return requests


def _check_nonnegative(name: str, value) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _columns(trace, arrivals, lengths, num_requests, arrival_rng, length_rng):
    """(arrival_s, prompt_len, output_len, hash_ids or None, hash block size) before windowing."""
    if trace is not None:
        if not isinstance(trace, traces.Trace):
            raise ValueError(f"trace must be a Trace, got {type(trace).__name__}")
        if num_requests is not None:
            raise ValueError("num_requests is for synthetic workloads; cut a trace with max_requests")
        n = len(trace)
    elif num_requests is None:
        raise ValueError("a synthetic workload (no trace) needs num_requests")
    else:
        n = check_count("num_requests", num_requests)

    if arrivals is None:
        if trace is None or trace.arrival_s is None:
            where = "a synthetic workload" if trace is None else f"trace {trace.path} has no timestamps and"
            raise ValueError(f"{where} needs arrivals (an ArrivalProcess or arrival times)")
        times = trace.arrival_s
    elif isinstance(arrivals, ArrivalProcess):
        times = arrivals.sample(n, arrival_rng)
    else:
        times = np.asarray(arrivals, dtype=np.float64)
        bad = times.shape != (n,) or not np.isfinite(times).all() or (n and times[0] < 0)
        if bad or (np.diff(times) < 0).any():
            raise ValueError(
                f"arrivals must be {n} finite, non-decreasing times >= 0 in seconds, got {times[:5]}..."
            )

    if lengths is None:
        if trace is None:
            raise ValueError("a synthetic workload (no trace) needs lengths (a pair distribution)")
        return times, trace.prompt_len, trace.output_len, trace.hash_ids, trace.hash_block_size
    pairs = np.asarray(lengths.sample(n, length_rng))
    if pairs.shape != (n, 2) or (n and pairs.min() < 1):
        raise ValueError(f"lengths.sample must return ({n}, 2) lengths >= 1, got shape {pairs.shape}")
    # Sampled lengths no longer match the trace's prefix hashes, so those are dropped.
    prompt, output = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    return times, prompt, output, None, traces.MOONCAKE_HASH_BLOCK_SIZE


def merge_workloads(*workloads: Sequence[Request]) -> list[Request]:
    """One arrival-ordered list from several (e.g. one per client); ties keep argument order."""
    merged = sorted((r for w in workloads for r in w), key=lambda r: r.arrival_time)
    seen: set[str] = set()
    for r in merged:
        if r.request_id in seen:
            raise ValueError(
                f"duplicate request_id {r.request_id!r} across workloads (give each a distinct client_id)"
            )
        seen.add(r.request_id)
    return merged


# --- configs ------------------------------------------------------------------------------------


# The defaults below serve partial mappings passed in directly (library use). The experiment
# config path passes jaxserve.config's strict Section view, whose .get raises for a missing key, so
# there every value comes from the config (configs/default.py declares them all).
def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _value(cfg: Any, key: str, default: Any) -> Any:
    """The key's value, or ``default`` when absent or None (configs spell "unset" as None)."""
    value = _get(cfg, key)
    return default if value is None else value


def _required(cfg: Any, key: str, prefix: str, why: str) -> Any:
    value = _get(cfg, key)
    if value is None:
        raise ValueError(f"{prefix}.{key} is required {why}")
    return value


def _per_side(cfg: Any, key: str, prefix: str, why: str) -> tuple[Any, Any]:
    """A (prompt, output) pair from a key holding one value for both or a 2-sequence."""
    value = _required(cfg, key, prefix, why)
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"{prefix}.{key} must be one value or a (prompt, output) pair, got {value!r}")
        return value[0], value[1]
    return value, value


def lengths_from_config(cfg: Any, prefix: str = "workload.lengths") -> lengths_lib.PairDistribution:
    """A pair distribution from a ``lengths`` sub-config (see ``workload_from_config``)."""
    kind = _get(cfg, "kind")
    if kind not in LENGTH_KINDS:
        raise ValueError(f"{prefix}.kind must be one of {LENGTH_KINDS}, got {kind!r}")
    why = f"for {prefix}.kind={kind!r}"
    if kind == "fixed":
        prompt = _side(prefix, "prompt_len", lengths_lib.Fixed, _required(cfg, "prompt_len", prefix, why))
        output = _side(prefix, "output_len", lengths_lib.Fixed, _required(cfg, "output_len", prefix, why))
        return lengths_lib.Pair(prompt, output)
    if kind == "uniform":
        low, high = (_per_side(cfg, k, prefix, why) for k in ("low", "high"))
        return lengths_lib.Pair(
            _side(prefix, "prompt side", lengths_lib.Uniform, low[0], high[0]),
            _side(prefix, "output side", lengths_lib.Uniform, low[1], high[1]),
        )
    if kind == "zipf":
        a, low, high = (_per_side(cfg, k, prefix, why) for k in ("a", "low", "high"))
        return lengths_lib.Pair(
            _side(prefix, "prompt side", lengths_lib.Zipf, a[0], low[0], high[0]),
            _side(prefix, "output side", lengths_lib.Zipf, a[1], low[1], high[1]),
        )
    path = _resolve(_required(cfg, "path", prefix, why), f"{prefix}.path")
    return lengths_lib.Empirical.from_csv(path)


def _side(prefix: str, what: str, make, *args):
    """``make(*args)``, with a ValueError re-raised under the config key it came from."""
    try:
        return make(*args)
    except ValueError as e:
        raise ValueError(f"{prefix} ({what}): {e}") from None


def _resolve(path: Any, key: str):
    resolved = traces.resolve_trace_path(path)
    if not resolved.exists():
        raise FileNotFoundError(
            f"{key}: trace file not found: {resolved} (relative paths resolve against "
            f"${traces.TRACES_ENV}, else <project root>/../shared/traces)"
        )
    return resolved


def workload_from_config(cfg: Any, prefix: str = "workload") -> list[Request]:
    """The requests a ``workload`` config describes (a ConfigDict, mapping or attribute object).

    ``kind``: "poisson" | "gamma" | "fixed" (synthetic: ``qps``, ``num_requests``, ``seed``, gamma's
    ``cv``, and a ``lengths`` sub-config) or "trace" (``trace_path``, ``trace_format``; ``qps``, if
    set, rescales the replay; lengths come from the trace unless ``lengths`` names another source).
    ``lengths.kind``: "fixed" (``prompt_len``, ``output_len``), "uniform" (``low``, ``high``),
    "zipf" (``a``, ``low``, ``high``) — each of these one value or a (prompt, output) pair — or
    "trace" (``path``: sample (prompt, output) pairs from that file; no path under a trace workload
    means the trace's own lengths). Always optional: ``time_scale``, ``start_s``, ``duration_s``,
    ``max_requests``, ``client_id`` (see ``build_requests``), ``clients`` ("A:1,B:2": requests
    drawn among clients by weight, ``workload.clients``). ``num_requests`` applies to synthetic
    kinds only (cut a trace with ``max_requests``), and under kind "trace" any other ``lengths``
    kind replaces the trace's lengths, so a shared default should leave ``lengths.kind`` "trace"
    or ``lengths`` None for replays. Relative paths go through ``traces.resolve_trace_path``.
    """
    kind = _get(cfg, "kind")
    if kind not in WORKLOAD_KINDS:
        raise ValueError(f"{prefix}.kind must be one of {WORKLOAD_KINDS}, got {kind!r}")
    key = f"{prefix}.{{}}".format
    options = dict(
        time_scale=check_positive(key("time_scale"), _value(cfg, "time_scale", 1.0)),
        start_s=_check_nonnegative(key("start_s"), _value(cfg, "start_s", 0.0)),
        duration_s=_optional(cfg, "duration_s", key, check_positive),
        max_requests=_optional(cfg, "max_requests", key, check_count),
        seed=check_count(key("seed"), _value(cfg, "seed", 0)),
        client_id=_value(cfg, "client_id", "default"),
    )
    if not isinstance(options["client_id"], str) or not options["client_id"]:
        raise ValueError(f"{key('client_id')} must be a non-empty str, got {options['client_id']!r}")
    lengths_cfg = _get(cfg, "lengths")
    lengths_kind = None if lengths_cfg is None else _get(lengths_cfg, "kind")
    qps = _optional(cfg, "qps", key, check_positive)

    if kind == "trace":
        path = _resolve(_required(cfg, "trace_path", prefix, "for kind='trace'"), key("trace_path"))
        trace_format = _value(cfg, "trace_format", "auto")
        if trace_format != "auto" and trace_format not in traces.FORMATS:
            raise ValueError(
                f"{key('trace_format')} must be 'auto' or one of {tuple(traces.FORMATS)}, got {trace_format!r}"
            )
        trace = traces.read_trace(path, trace_format)
        own_lengths = lengths_cfg is None or (lengths_kind == "trace" and _get(lengths_cfg, "path") is None)
        lengths = None if own_lengths else lengths_from_config(lengths_cfg, key("lengths"))
        if trace.arrival_s is None:
            raise ValueError(
                f"{key('trace_path')}: {path} has lengths only, no timestamps; use a synthetic "
                f"{key('kind')} with {key('lengths.kind')}='trace' and {key('lengths.path')} instead"
            )
        if qps is not None and options["time_scale"] != 1.0:
            raise ValueError(f"give {key('time_scale')} or {key('qps')}, not both")
        requests = build_requests(trace, lengths=lengths, qps=qps, **options)
    else:
        why = f"for kind={kind!r}"
        if qps is None:
            raise ValueError(f"{key('qps')} is required {why}")
        cv = check_positive(key("cv"), _required(cfg, "cv", prefix, why)) if kind == "gamma" else 1.0
        num_requests = check_count(key("num_requests"), _required(cfg, "num_requests", prefix, why))
        if num_requests == 0:
            raise ValueError(f"{key('num_requests')} must be >= 1 for kind={kind!r}, got 0")
        if lengths_cfg is None:
            raise ValueError(f"{key('lengths')} is required {why}")
        if lengths_kind == "trace" and _get(lengths_cfg, "path") is None:
            raise ValueError(f"{key('lengths.path')} is required for lengths.kind='trace' {why}")
        requests = build_requests(
            arrivals=ArrivalProcess(kind, qps, cv),
            lengths=lengths_from_config(lengths_cfg, key("lengths")),
            num_requests=num_requests,
            **options,
        )
    if not requests:
        raise ValueError(
            f"{prefix}: no requests in the window start_s={options['start_s']}, "
            f"duration_s={options['duration_s']}, max_requests={options['max_requests']}"
        )
    clients = parse_clients(_value(cfg, "clients", ""), key("clients"))
    return assign_clients(requests, clients, options["seed"])


def _optional(cfg: Any, name: str, key, check) -> Any:
    value = _get(cfg, name)
    return None if value is None else check(key(name), value)
