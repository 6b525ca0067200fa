"""``vtc``: fair scheduling with Virtual Token Counters (Sheng et al., OSDI'24).

VTC is a waiting-queue order, not a batching policy: it runs on top of vLLM or Sarathi batching
(``make("vtc", base="sarathi")``), replacing FCFS with "serve the backlogged client with the least
virtual service" (see ``queues.FairOrder``). Per-client ``weights`` give weighted VTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

from jaxserve.scheduler.queues import FairOrder
from jaxserve.scheduler.sarathi import SarathiScheduler
from jaxserve.scheduler.vllm import VLLMScheduler

BASES = {"vllm": VLLMScheduler, "sarathi": SarathiScheduler}


def make_vtc(
    base: str = "vllm",
    w_p: float = 1.0,
    w_q: float = 2.0,
    weights: Optional[Mapping[str, float]] = None,
    **base_options,
):
    """A ``base`` scheduler whose waiting queue is VTC-ordered."""
    if base not in BASES:
        raise ValueError(f"vtc option base must be one of {sorted(BASES)}, got {base!r}")
    if "order" in base_options:
        raise ValueError("vtc sets the queue order itself; do not pass order=")
    order = FairOrder(w_p=w_p, w_q=w_q, weights=dict(weights or {}))
    return BASES[base](order=order, **base_options)
