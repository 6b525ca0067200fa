"""``bench_serving --compare-sim``: the simulator checked against a live server on the same arrivals.

``sim_requests`` turns a replay into the simulator's requests: each arrives when the client sent it
(rebased to the first), with its prompt length and prefix hashes, and asks for the tokens the server
actually generated (the trace's output length when the stream did not finish: a server that stops
at EOS despite ``ignore_eos`` must not make the simulator generate more). ``compare`` puts the two
runs' ``summarize`` dictionaries side by side: per metric the live value, the simulated one and the
relative error ``sim / live - 1`` (None where either side has no value or the live one is 0).
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxserve.request import Request, SamplingParams
from jaxserve.serve.load_client import LoadRequest, Outcome

#: (metrics.json key, statistic or None for a scalar) compared, in table order.
COMPARED = (
    *((key, stat) for key in ("ttft_s", "tbt_s", "e2e_s") for stat in ("mean", "p50", "p99")),
    ("throughput_req_s", None),
    ("throughput_tok_s", None),
)


def sim_requests(requests: Sequence[LoadRequest], outcomes: Sequence[Outcome]) -> list[Request]:
    """The replay's requests as the simulator's (see the module docstring), in sending order."""
    if len(requests) != len(outcomes):
        raise ValueError(f"{len(requests)} requests but {len(outcomes)} outcomes")
    pairs = sorted(zip(requests, outcomes), key=lambda p: p[1].sent_s)
    start = pairs[0][1].sent_s if pairs else 0.0
    out = []
    for r, o in pairs:
        tokens = o.num_tokens if o.status == "ok" and o.num_tokens > 0 else r.max_tokens
        out.append(Request(r.request_id, prompt_len=r.prompt_len, sampling=SamplingParams(max_new_tokens=tokens),
                           arrival_time=o.sent_s - start, client_id=r.client_id, prefix_block_hashes=r.prefix_hashes,
                           prefix_hash_block_size=r.hash_block_size))  # fmt: skip
    return out


def _value(metrics: dict, key: str, stat) -> float | None:
    value = metrics.get(key)
    if stat is not None:
        value = None if value is None else value.get(stat)
    return None if value is None else float(value)


def compare(live: dict, sim: dict) -> list[dict]:
    """One row per ``COMPARED`` metric: ``metric`` ("ttft_s.p50", "throughput_req_s"), ``live``,
    ``sim`` and ``error`` (``sim / live - 1``), None where undefined."""
    rows = []
    for key, stat in COMPARED:
        a, b = _value(live, key, stat), _value(sim, key, stat)
        error = None if a is None or b is None or a == 0 else b / a - 1
        rows.append({"metric": key if stat is None else f"{key}.{stat}", "live": a, "sim": b, "error": error})
    return rows


def worst_error(rows: Sequence[dict]) -> float | None:
    """The largest |error| over the rows that have one."""
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    return max(errors) if errors else None
