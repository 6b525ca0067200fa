"""What asynchronous scheduling (and nano-batching beside it) gains the real engine, in one run.

    python benchmarks/engine_overlap.py [--num_requests 48] [--rounds 3] [--layers 4] [--hidden 512] [--quick]

1. Builds a random Llama checkpoint with ``transformers`` (``engine_cpu.make_checkpoint``; default
   ~40M parameters, float32: big enough that a decode step of the batch takes tens of ms on a CPU,
   against a few ms of host scheduling and packing).
2. One workload (``num_requests`` requests at time 0, prompts uniform in [16, 128], outputs uniform
   in [16, 64], greedy, vllm's scheduler with every request in the batch) served three ways:
   (a) synchronous scheduling, (b) async scheduling (``Engine(async_scheduling=True)``: step N+1
   scheduled, packed and dispatched while step N runs, its decode inputs gathered on the device
   from N's tokens), (b') the same with N's tokens patched into N+1's packed ids on the host
   (``async_inputs="host"``: N+1 dispatched only once N's tokens are back), (c) async +
   ``nano_batches=2`` (a second runner). Each mode first serves it once untimed (compiling exactly
   its shapes), then ``rounds`` timed rounds alternate the modes (the machine's speed drifts); per
   mode the median wall and process CPU time, and the median over rounds of the same round's
   sync wall over the mode's (``paired_ratio_to_sync``).
3. Per mode: output tokens/s (tokens / wall, scheduling included), its ratio to (a), and for the
   async modes, per overlapped step, the host time spent scheduling and packing the next step
   (and dispatching it, on the device path), the part of it measured hidden (the step in flight
   was not done when the host came back for its tokens: ``runtime.pipelined.OverlapStats``), the
   time blocked waiting for tokens, and, on the host path, the gap from tokens collected to the
   next dispatch (patch + dispatch, the device idle). For (a), the host time outside the executor
   per step (wall minus the steps' measured times).
   Every mode's tokens are checked to be the same.

On a CPU the "device" is XLA's thread pool on the same cores as the host: while the host schedules,
the step's GEMMs have one core less (2 cores here, shared with other work), so hidden host time
saves less wall time than it would beside a GPU, and can even cost. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_cpu import make_checkpoint  # noqa: E402  (benchmarks/ is not a package)

# name -> (async scheduling, where step N's tokens enter step N+1, nano-batches)
MODES = {"sync": (False, "device", 1), "async": (True, "device", 1), "async_host_patch": (True, "host", 1),
         "async_nano2": (True, "device", 2)}  # fmt: skip


def log(msg: str) -> None:
    print(f"[engine_overlap] {msg}", file=sys.stderr, flush=True)


def workload(n: int, vocab: int, seed: int = 0):
    import jaxserve

    rng = np.random.default_rng(seed)
    prompt_lens, output_lens = rng.integers(16, 129, n), rng.integers(16, 65, n)
    sampling = [jaxserve.SamplingParams(max_new_tokens=int(m), temperature=0.0) for m in output_lens]
    return [
        jaxserve.Request(f"ov-{i}", prompt_token_ids=rng.integers(3, vocab, int(p)).tolist(), sampling=sp)
        for i, (p, sp) in enumerate(zip(prompt_lens, sampling))
    ]


def serve(engine, requests) -> dict:
    """One timed serve: wall and process CPU seconds, tokens, steps, the summed step times, the
    async overlap counters, and every request's tokens."""
    wall, cpu = time.perf_counter(), time.process_time()
    run = engine.serve(requests)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    log_ = run.log.freeze()
    return {
        "wall_s": wall, "cpu_s": cpu, "steps": int(len(log_.step_duration_s)),
        "step_time_s": float(np.sum(log_.step_duration_s)),
        "tokens": sum(len(f.output_token_ids) for f in run.finished.values()),
        "outputs": {rid: f.output_token_ids for rid, f in run.finished.items()},
        "overlap": engine.overlap._asdict() if engine.async_scheduling else None,
    }  # fmt: skip


def summarize_mode(runs: list[dict]) -> dict:
    """Medians over a mode's timed rounds (overlap figures from the round of the median wall)."""
    walls = [r["wall_s"] for r in runs]
    mid = runs[walls.index(statistics.median_low(walls))]
    steps, tokens = mid["steps"], mid["tokens"]
    out = {
        "tok_s": round(tokens / mid["wall_s"], 2), "wall_s": round(mid["wall_s"], 3),
        "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 3), "tokens": tokens, "steps": steps,
        "ms_per_step": round(1e3 * mid["wall_s"] / steps, 3),
        "wall_s_rounds": [round(w, 3) for w in walls],
    }  # fmt: skip
    ov = mid["overlap"]
    if ov is None:
        out["host_ms_per_step_outside_executor"] = round(1e3 * (mid["wall_s"] - mid["step_time_s"]) / steps, 3)
    else:
        n = max(ov["overlapped_steps"], 1)
        out.update(
            overlapped_steps=ov["overlapped_steps"], hidden_steps=ov["hidden_steps"],
            schedule_pack_ms_per_step=round(1e3 * ov["schedule_pack_s"] / n, 3),
            dispatch_ms_per_step=round(1e3 * ov["dispatch_s"] / n, 3),
            hidden_host_ms_per_step=round(1e3 * ov["hidden_s"] / n, 3),
            wait_ms_per_step=round(1e3 * ov["wait_s"] / n, 3), gap_ms_per_step=round(1e3 * ov["gap_s"] / n, 3),
        )  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_requests", type=int, default=48)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--quick", action="store_true", help="a tiny model, 8 requests, one round (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 2, 128, 256, 4, 2
        args.vocab, args.num_requests, args.rounds = 1000, 8, 1

    import jax

    import jaxserve
    from jaxserve.engine.engine import Engine

    with tempfile.TemporaryDirectory(prefix="jaxserve-overlap-") as model_dir:
        hf_model = make_checkpoint(model_dir, args)
        num_params = sum(t.numel() for t in hf_model.parameters())
        del hf_model
        log(f"checkpoint: {num_params / 1e6:.1f}M parameters")
        requests = workload(args.num_requests, args.vocab)
        options = {"max_num_seqs": args.num_requests, "max_num_batched_tokens": 2048}
        common = dict(scheduler="vllm", scheduler_options=options, max_model_len=256, stop_at_eos=False,
                      num_blocks=args.num_requests * 256 // 16 + 16)  # fmt: skip
        llms = {1: jaxserve.LLM(model_dir, **common), 2: jaxserve.LLM(model_dir, nano_batches=2, **common)}
        engines = {
            name: Engine(llms[nano].runner, llms[nano].scheduler, llms[nano].kv, async_scheduling=is_async,
                         async_inputs=inputs)
            for name, (is_async, inputs, nano) in MODES.items()
        }  # fmt: skip
        for name, engine in engines.items():  # compiles each mode's shapes (async ones may differ)
            t = time.perf_counter()
            engine.serve(requests)
            log(f"{name}: warm-up serve {time.perf_counter() - t:.1f} s")
        compilations = {n: llm.runner.num_compilations for n, llm in llms.items()}
        runs = {name: [] for name in MODES}
        for r in range(args.rounds):
            for name, engine in engines.items():
                runs[name].append(serve(engine, requests))
                log(f"round {r}: {name} {runs[name][-1]['tokens'] / runs[name][-1]['wall_s']:.1f} tok/s")
        new_compilations = sum(llm.runner.num_compilations - compilations[n] for n, llm in llms.items())

    reference = runs["sync"][0]["outputs"]
    identical = all(run["outputs"] == reference for rs in runs.values() for run in rs)
    modes = {name: summarize_mode(rs) for name, rs in runs.items()}
    base = modes["sync"]["tok_s"]
    result = {
        "benchmark": "engine_overlap",
        "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "model": {"parameters_m": round(num_params / 1e6, 1), "layers": args.layers, "hidden": args.hidden,
                  "dtype": "float32"},
        "workload": {"num_requests": args.num_requests, "output_tokens": modes["sync"]["tokens"], "scheduler": "vllm",
                     "rounds": args.rounds},
        "modes": modes,
        "ratio_to_sync": {name: round(m["tok_s"] / base, 4) for name, m in modes.items()},
        # each round's sync wall over the mode's in the same round (the machine drifts between rounds)
        "paired_ratio_to_sync": {
            name: round(statistics.median(s["wall_s"] / r["wall_s"] for s, r in zip(runs["sync"], rs)), 4)
            for name, rs in runs.items()
        },
        "tokens_identical": identical,
        "compilations_when_timed": new_compilations,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
