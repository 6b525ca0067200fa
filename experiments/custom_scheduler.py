"""A research policy written outside the package: priority tiers, shortest prompt first in a tier.

Requests carry ``Request.priority`` (0 = most urgent). The waiting queue serves the lowest tier
first and, within a tier, the shortest prompt first; when KV runs out the least urgent running
request is preempted (latest arrival among equals). Batching is Sarathi's: a token budget per step,
decodes first, chunked prefills. Importing this file registers the policy as "tiered":

    python experiments/custom_scheduler.py        # runs it next to sarathi on a two-tier workload
"""

from __future__ import annotations

import dataclasses

import numpy as np

import jaxserve
from jaxserve.scheduler import BatchingScheduler, Chunked, KeyedOrder, StepBuilder, register


def tier_then_shortest(seq) -> tuple:
    return (seq.request.priority, seq.request.prompt_len, seq.seq_no)


def least_urgent_first(request) -> int:
    return request.priority


@dataclasses.dataclass(frozen=True)
class TieredScheduler(BatchingScheduler):
    chunk_size: int = 512
    order: KeyedOrder = KeyedOrder(tier_then_shortest)
    preempt_rank: object = least_urgent_first

    def schedule(self, state, now):
        chunk = Chunked()
        step = StepBuilder(self, state, token_budget=self.chunk_size)
        step.run_running(chunk)  # decodes, then ongoing prefill chunks
        step.admit_waiting(chunk)  # swapped-out requests, then new prefills in queue order
        return step.build()


register("tiered", TieredScheduler, overwrite=True)


def main():
    from jaxserve.kv import KVConfig
    from jaxserve.scheduler.driver import drive

    rng = np.random.default_rng(0)
    requests = [
        jaxserve.Request(
            f"r{i}",
            prompt_len=int(rng.integers(32, 2048)),
            sampling=jaxserve.SamplingParams(int(rng.integers(16, 256))),
            priority=int(i % 4 == 0),  # a quarter of the requests are tier 1 (background)
        )
        for i in range(300)
    ]
    arrivals = np.sort(rng.integers(0, 600, len(requests))).tolist()
    for name in ("sarathi", "tiered"):
        result = drive(jaxserve.scheduler.make(name), KVConfig(2048, 16), requests, arrival_steps=arrivals)
        first = {}
        for step, plan in enumerate(result.plans):
            for rid, s in zip(plan.request_ids, plan.samples_token.tolist()):
                if s:
                    first.setdefault(rid, step)
        for tier in (0, 1):
            ttft = [first[r.request_id] - a for r, a in zip(requests, arrivals) if r.priority == tier]
            print(f"{name:8s} tier {tier}: median TTFT {np.median(ttft):6.1f} steps, p99 {np.percentile(ttft, 99):6.1f}")


if __name__ == "__main__":
    main()
