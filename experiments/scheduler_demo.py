"""Runs every registered scheduler on one synthetic workload and prints what each step looked like.

    python experiments/scheduler_demo.py [--num_requests 200] [--num_blocks 512] [--seed 0]

Time is counted in engine steps (no cost model yet): TTFT and latency are in steps, so the table
shows scheduling behaviour — how often prefills stall decodes, how full steps are, how often
requests are preempted — not wall-clock speed.
"""

from __future__ import annotations

import argparse

import numpy as np
from rich.console import Console
from rich.table import Table

import jaxserve
from jaxserve.kv import KVConfig
from jaxserve.scheduler.driver import drive


def workload(num_requests: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(16, 1024, num_requests)
    outputs = rng.integers(8, 256, num_requests)
    arrivals = np.sort(rng.integers(0, num_requests * 2, num_requests))
    requests = [
        jaxserve.Request(
            f"req{i}",
            prompt_token_ids=rng.integers(1, 32000, int(p)).tolist(),
            sampling=jaxserve.SamplingParams(max_new_tokens=int(o)),
            client_id=f"client{i % 2}",
        )
        for i, (p, o) in enumerate(zip(prompts, outputs))
    ]
    return requests, arrivals.tolist()


def summarize(name, result, requests, arrivals):
    first, last, prefill_stall_steps, preemptions = {}, {}, 0, 0
    tokens_per_step = []
    for step, plan in enumerate(result.plans):
        tokens_per_step.append(plan.num_tokens)
        preemptions += len(plan.preempted) + len(plan.swapped_out)
        if plan.num_prefill_tokens and plan.num_decode_tokens == 0 and step and result.plans[step - 1].num_decode_tokens:
            prefill_stall_steps += 1
        for rid, samples in zip(plan.request_ids, plan.samples_token.tolist()):
            if samples:
                first.setdefault(rid, step)
                last[rid] = step
    arrival = {r.request_id: a for r, a in zip(requests, arrivals)}
    ttft = np.array([first[r] - arrival[r] for r in first])
    latency = np.array([last[r] - arrival[r] for r in last])
    return dict(
        **{
            "scheduler": name,
            "steps": result.num_steps,
            "finished": len(result.finished),
            "tokens/step": float(np.mean(tokens_per_step)),
            "TTFT p50": float(np.percentile(ttft, 50)),
            "TTFT p99": float(np.percentile(ttft, 99)),
            "E2E p50": float(np.percentile(latency, 50)),
            "decode stalls": prefill_stall_steps,
            "preemptions": preemptions,
        }
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_requests", type=int, default=200)
    parser.add_argument("--num_blocks", type=int, default=1024)
    parser.add_argument("--block_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    requests, arrivals = workload(args.num_requests, args.seed)
    kv = KVConfig(num_blocks=args.num_blocks, block_size=args.block_size)
    table = Table(title=f"{args.num_requests} requests, {args.num_blocks} x {args.block_size}-token KV blocks (time in steps)")
    rows = []
    for name in jaxserve.scheduler.available():
        result = drive(jaxserve.scheduler.make(name), kv, requests, arrival_steps=arrivals)
        rows.append(summarize(name, result, requests, arrivals))
    for key in rows[0]:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
