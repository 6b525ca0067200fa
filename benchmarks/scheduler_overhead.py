"""Scheduler overhead: microseconds per ``schedule`` + ``update`` at serving scale.

    python benchmarks/scheduler_overhead.py [--steps 2000] [--schedulers vllm,sarathi]
        [--nano_vllm DIR]   # a nano-vllm checkout: its scheduler runs side by side (needs xxhash)

Setup per scheduler: 100,000 KV blocks of 16 tokens, prefix caching on, 256 running requests
(max_num_seqs) and 10,000 waiting; prompt and output lengths uniform in [100, 1024] tokens, as in
nano-vllm's bench.py (the reference the 250 us target is set against), a quarter of the prompts
sharing a 256-token system prompt. After warm-up, every finished request is replaced by a new arrival
(outside the timed region) so the waiting queue stays at 10,000. All systems (and nano-vllm, when
given) run in the same process in alternating blocks of 50 steps, so a drift in machine speed
affects them alike and the ratios hold on a noisy machine. Prints one JSON line with the median and
p99 of schedule + update per step, of each half, and per kind of step (decode, prefill, with or
without a request finishing), and what the collision-safe prefix keys cost per ``add_request``
against the 64-bit built-in hash chain they replaced. Target (issue 3): median <= 250 us for vllm and sarathi on the 2-core
CI machine, where nano-vllm's scheduler takes ~260 us (so: a ratio to it below ~0.95).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import numpy as np

import jaxserve
from jaxserve.kv import KVConfig, prompt_block_hashes
from jaxserve.plan import StepOutput

NUM_RUNNING = 256
NUM_WAITING = 10_000
# With a 512-token budget, 256 decodes leave too little room for prefills to keep 256 requests
# running; 2048 (Sarathi-Serve's relaxed-SLO setting) sustains a full batch.
EXTRA_OPTIONS = {"sarathi": {"chunk_size": 2048}}
BLOCK = 50  # steps per turn when systems alternate


def make_requests(rng, start: int, count: int, system_prompt: list[int]) -> list[jaxserve.Request]:
    out = []
    for i in range(start, start + count):
        prompt = rng.integers(1, 32000, int(rng.integers(100, 1025))).tolist()
        if i % 4 == 0:
            prompt = system_prompt + prompt[len(system_prompt) :]
        out.append(
            jaxserve.Request(
                f"req{i}",
                prompt_token_ids=prompt,
                sampling=jaxserve.SamplingParams(max_new_tokens=int(rng.integers(100, 1025))),
                client_id=f"client{i % 4}",
            )
        )
    return out


class Runner:
    """One system under test, set up and warmed; ``run(n)`` times n more steps. Systems run in
    alternating blocks of steps, so a drift in machine speed hits all of them alike and the ratios
    stay meaningful on a noisy machine."""

    def __init__(self, step, summary):
        self._step, self._summary = step, summary
        self.total_us: list[float] = []
        self.schedule_us: list[float] = []
        self.update_us: list[float] = []
        self.kinds: list[str] = []

    def run(self, n: int) -> None:
        gc.collect()
        gc.disable()
        try:
            for _ in range(n):
                self._step(self)
        finally:
            gc.enable()

    def result(self) -> dict:
        pct = lambda xs, q: round(float(np.percentile(xs, q)), 1)  # noqa: E731
        out = {"median_us": pct(self.total_us, 50), "p99_us": pct(self.total_us, 99)}
        if self.schedule_us:
            out.update(schedule_median_us=pct(self.schedule_us, 50), update_median_us=pct(self.update_us, 50))
        out.update(self._summary())
        out["decode_only_steps"] = sum(k.startswith("decode") for k in self.kinds)
        by_kind: dict[str, list[float]] = {}  # "decode" / "prefill" (any prefill tokens), "+finish"
        for kind, t in zip(self.kinds, self.total_us):
            by_kind.setdefault(kind, []).append(t)
        # Where the time goes: median us and share of steps per kind of step.
        out["by_step_kind"] = {
            k: {"median_us": pct(v, 50), "share": round(len(v) / len(self.kinds), 3)} for k, v in sorted(by_kind.items())
        }
        return out


def jaxserve_runner(name: str, steps: int, seed: int) -> Runner:
    rng = np.random.default_rng(seed)
    system_prompt = rng.integers(1, 32000, 256).tolist()
    options = dict(enable_prefix_caching=True, max_num_seqs=NUM_RUNNING, **EXTRA_OPTIONS.get(name, {}))
    sched = jaxserve.scheduler.make(name, **options)
    box = {"state": sched.init(KVConfig(num_blocks=100_000, block_size=16))}
    next_id = 0
    for req in make_requests(rng, 0, NUM_RUNNING + NUM_WAITING, system_prompt):
        box["state"] = sched.add_request(box["state"], req, 0.0)
        next_id += 1
    spare = make_requests(rng, next_id, 4 * steps + 4000, system_prompt)  # arrivals, built untimed

    def tokens(plan):  # as executors return them: one array entry per sampling row
        return StepOutput.for_plan(plan, np.full(np.count_nonzero(plan.samples_token), 7))

    def step(runner: Runner) -> None:
        state = box["state"]
        t0 = time.perf_counter_ns()
        state, plan = sched.schedule(state, 0.0)
        t1 = time.perf_counter_ns()
        out = tokens(plan)
        t2 = time.perf_counter_ns()
        state = sched.update(state, plan, out, 0.0)
        t3 = time.perf_counter_ns()
        if runner is not None:
            runner.schedule_us.append((t1 - t0) / 1e3)
            runner.update_us.append((t3 - t2) / 1e3)
            runner.total_us.append((t1 - t0 + t3 - t2) / 1e3)
            kind = "prefill" if plan.num_prefill_tokens else "decode"
            runner.kinds.append(kind + ("+finish" if state.finished else ""))
        for _ in state.finished:  # keep the queue at NUM_WAITING (untimed)
            state = sched.add_request(state, spare.pop(), 0.0)
        box["state"] = state

    for _ in range(1_000):  # warm-up: fill the running batch and pass the first wave of finishes
        step(None)
    return Runner(step, lambda: {"running": box["state"].num_running, "waiting": box["state"].num_waiting})


def load_nano_vllm(root: str):
    """nano-vllm's Scheduler, BlockManager and Sequence from a checkout at ``root``, without its
    model-loading package __init__ (torch/transformers are not needed for scheduling)."""
    import importlib.util
    import types

    pkg = types.ModuleType("nanovllm")
    pkg.__path__ = [os.path.join(root, "nanovllm")]
    engine = types.ModuleType("nanovllm.engine")
    engine.__path__ = [os.path.join(root, "nanovllm", "engine")]
    config = types.ModuleType("nanovllm.config")
    config.Config = object  # only used as a type hint by the scheduler
    sys.modules.update({"nanovllm": pkg, "nanovllm.engine": engine, "nanovllm.config": config})

    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, *path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    sp = load("nanovllm.sampling_params", ["nanovllm", "sampling_params.py"])
    seq = load("nanovllm.engine.sequence", ["nanovllm", "engine", "sequence.py"])
    load("nanovllm.engine.block_manager", ["nanovllm", "engine", "block_manager.py"])
    sched = load("nanovllm.engine.scheduler", ["nanovllm", "engine", "scheduler.py"])
    return sched.Scheduler, seq.Sequence, sp.SamplingParams


def nano_vllm_runner(root: str, steps: int, seed: int) -> Runner:
    """The same workload through nano-vllm's mutable scheduler (prefix caching is always on there):
    microseconds per schedule + postprocess. Note nano-vllm applies max_num_seqs per step, not to
    the running set, so its running deque grows past 256 while each step still serves <= 256."""
    Scheduler, Sequence, NanoSampling = load_nano_vllm(root)
    Sequence.block_size = 16
    cfg = types_namespace(
        max_num_seqs=NUM_RUNNING, max_num_batched_tokens=8192, eos=-1, kvcache_block_size=16, num_kvcache_blocks=100_000
    )
    sched = Scheduler(cfg)
    rng = np.random.default_rng(seed)
    system_prompt = rng.integers(1, 32000, 256).tolist()

    def seqs(start, count):
        return [
            Sequence(list(r.prompt_token_ids), NanoSampling(max_tokens=r.sampling.max_new_tokens, ignore_eos=True))
            for r in make_requests(rng, start, count, system_prompt)
        ]

    for s in seqs(0, NUM_RUNNING + NUM_WAITING):
        sched.add(s)
    spare = seqs(NUM_RUNNING + NUM_WAITING, 4 * steps + 4000)

    def step(runner: Runner) -> None:
        t0 = time.perf_counter_ns()
        scheduled, is_prefill = sched.schedule()
        sched.postprocess(scheduled, [7] * len(scheduled), is_prefill)
        t1 = time.perf_counter_ns()
        finished = sum(s.is_finished for s in scheduled)
        if runner is not None:
            runner.total_us.append((t1 - t0) / 1e3)
            runner.kinds.append(("prefill" if is_prefill else "decode") + ("+finish" if finished else ""))
        for _ in range(finished):  # untimed, as for jaxserve
            sched.add(spare.pop())

    for _ in range(1_000):
        step(None)
    return Runner(step, lambda: {"running": len(sched.running), "waiting": len(sched.waiting)})


def prefix_hash_cost(seed: int, count: int = 2000) -> dict:
    """What the collision-safe prefix keys cost at ``add_request``: microseconds per request (the
    benchmark's prompts: 100-1024 tokens, 16-token blocks) for jaxserve's BLAKE2b-256 chain of exact
    keys, against a 64-bit chain of Python's built-in tuple hash (the scheme it replaced, which
    could hand one prompt another's KV on a collision), timed alternately in one process."""
    rng = np.random.default_rng(seed)
    requests = make_requests(rng, 0, count, rng.integers(1, 32000, 256).tolist())

    def builtin_chain(request):  # the old scheme: h_i = hash((h_{i-1}, block tuple))
        toks, out, parent = request.prompt_token_ids, [], 0
        for block in zip(*[iter(toks[: len(toks) // 16 * 16])] * 16):
            parent = hash((parent, block))
            out.append(parent)
        return out

    timings = {"blake2b_256_exact_keys": [], "builtin_hash_64bit": []}
    for _ in range(5):
        for name, fn in (("blake2b_256_exact_keys", lambda r: prompt_block_hashes(r, 16)),
                         ("builtin_hash_64bit", builtin_chain)):
            t0 = time.perf_counter_ns()
            for r in requests:
                fn(r)
            timings[name].append((time.perf_counter_ns() - t0) / 1e3 / count)
    out = {name: round(float(np.median(v)), 2) for name, v in timings.items()}
    out["ratio"] = round(out["blake2b_256_exact_keys"] / out["builtin_hash_64bit"], 2)
    out["unit"] = "us per request"
    return out


def types_namespace(**kw):
    import types

    return types.SimpleNamespace(**kw)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--schedulers", default="static,orca,vllm,sarathi,vtc")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block", type=int, default=BLOCK, help="steps per turn when systems alternate")
    parser.add_argument("--nano_vllm", default=os.environ.get("NANO_VLLM_DIR", ""),
                        help="a nano-vllm checkout to benchmark side by side (not part of jaxserve)")
    args = parser.parse_args()
    names = args.schedulers.split(",")
    runners = {name: jaxserve_runner(name, args.steps, args.seed) for name in names}
    if args.nano_vllm:
        runners["reference_nano_vllm"] = nano_vllm_runner(args.nano_vllm, args.steps, args.seed)
    for i in range(0, args.steps, args.block):  # interleaved blocks: every system sees the same drift
        for runner in runners.values():
            runner.run(min(args.block, args.steps - i))
    results = {name: r.result() for name, r in runners.items()}
    result = {
        "benchmark": "scheduler_overhead",
        "num_running": NUM_RUNNING,
        "num_waiting": NUM_WAITING,
        "num_blocks": 100_000,
        "block_size": 16,
        "prefix_caching": True,
        "steps": args.steps,
        "block": args.block,
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
        "target_median_us": 250,
        "schedulers": {name: results[name] for name in names},
        "prefix_hash_per_add_request": prefix_hash_cost(args.seed),
    }
    if args.nano_vllm:
        ref = result["reference_nano_vllm"] = results["reference_nano_vllm"]
        result["ratio_to_nano_vllm"] = {name: round(results[name]["median_us"] / ref["median_us"], 2) for name in names}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
