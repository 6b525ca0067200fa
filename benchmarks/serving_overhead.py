"""HTTP serving overhead: the same workload through the OpenAI-compatible server and through ``LLM.generate``.

    python benchmarks/serving_overhead.py [--quick] [--cases tiny,realistic] [--model DIR] [--num-requests 64]
                                          [--prompt-len 128] [--output-len 128] [--scheduler sarathi]

Per case, one ``jaxserve.LLM`` over a random float32 Llama (``tiny``: 4 layers, hidden 256, ~3M
parameters, a step of a few ms, so the HTTP side's per-token costs dominate; ``realistic``: the
~100M-parameter shape of ``benchmarks/engine_cpu.py``, whose steps are a realistic share of the
work; or ``--model``, a checkpoint; EOS off, so every request generates exactly ``--output-len``
tokens) serves ``--num-requests`` greedy requests of ``--prompt-len`` random token ids, all
submitted at once, twice: offline with ``LLM.generate``, and online through ``jaxserve.serve``'s
server on 127.0.0.1 (in this process, on the same LLM) driven by ``python -m
jaxserve.bench_serving`` in a separate process (streaming, token-id prompts, ``ignore_eos``). Each
path runs untimed first, compiling its step shapes; the timed HTTP run is the first after that which compiles nothing
(up to ``--warm-runs`` tries). HTTP arrivals are a few ms apart, so the server's batches differ from
generate's and a little from run to run: a step shape met for the first time in the timed HTTP run
is compiled while the client waits, and those seconds (``compile_s_when_timed``) come off its
makespan. Throughput is output tokens per second: over ``generate``'s wall time (timed once
before and once after the HTTP runs, so that both see the shared machine's load alike; tokens
over the mean wall, CPU the mean of the two), and over the client's first send to last token
(bench_serving's ``throughput_tok_s``).

Prints one JSON line: per case both throughputs and their ratio (HTTP / generate; the target is
>= 0.9), and where the CPU went during each timed run, in seconds and in microseconds per output
token, by thread of this process (``/proc/self/task``: ``main``, the ``engine_loop`` thread, the
server's ``event_loop`` thread, ``other``: XLA's compute pool and executors) and for the client
process (``client_cpu_s``: all of it, start-up and plots included; ``client_replay``: while it
streamed, bench_serving's ``replay_cpu_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
TARGET_RATIO = 0.9  # issue 20: HTTP throughput at least 90 % of LLM.generate's


def workload(args):
    """The LoadRequests bench_serving will send (all at t=0) and their prompt ids, built with the
    client's own functions so that generate serves the very same prompts."""
    from jaxserve.serve import load_client, load_workload

    spec = load_workload.WorkloadSpec(arrivals="fixed", rate=1e9, num_requests=args.num_requests,
                                      lengths=f"fixed:{args.prompt_len},{args.output_len}", seed=args.seed)  # fmt: skip
    requests = load_workload.build_load(spec)
    return requests, [load_client.prompt_ids(r, args.vocab, args.seed) for r in requests]


def client_command(url: str, args, out: str) -> list[str]:
    """bench_serving sending the same workload: fixed arrivals 1 ns apart, fixed lengths, token ids."""
    return [sys.executable, "-m", "jaxserve.bench_serving", "--base-url", url, "--arrivals", "fixed", "--rate", "1e9",
            "--num-requests", str(args.num_requests), "--lengths", f"fixed:{args.prompt_len},{args.output_len}",
            "--prompt-mode", "ids", "--vocab-size", str(args.vocab), "--seed", str(args.seed), "--out", out,
            "--quiet"]  # fmt: skip


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of every thread of this process so far, by role: the engine
    loop's thread, the in-process server's (uvicorn's event loop), the main thread, and the rest
    (XLA's compute pool, executors). From ``/proc/self/task`` (Linux); empty elsewhere."""
    roles = {t.native_id: t.name for t in threading.enumerate()}
    names = {"jaxserve-engine-loop": "engine_loop", "jaxserve-test-server": "event_loop", "MainThread": "main"}
    out: dict[str, float] = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            continue  # the thread ended meanwhile
        role = names.get(roles.get(int(tid), ""), "other")
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def cpu_since(before: dict[str, float]) -> dict[str, float]:
    now = thread_cpu()
    return {k: round(v - before.get(k, 0.0), 3) for k, v in sorted(now.items())}


def run_client(url: str, args, out: str) -> tuple[dict, dict, float]:
    """One bench_serving run against ``url``: its metrics.json, the CPU seconds of this process's
    threads meanwhile (the server and the engine loop run here), and the client process's."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the client never touches an accelerator
    cpu, child = thread_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(client_command(url, args, out), cwd=ROOT, env=env, capture_output=True, text=True)
    cpu, after = cpu_since(cpu), resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"bench_serving failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    client = after.ru_utime + after.ru_stime - child.ru_utime - child.ru_stime
    return json.loads((Path(out) / "metrics.json").read_text()), cpu, client


def timed_generate(llm, prompts, output_len: int) -> tuple[float, dict, int]:
    """(wall s, CPU s by thread, output tokens) of one ``generate`` of every prompt."""
    from jaxserve import SamplingParams

    sampling = SamplingParams(max_new_tokens=output_len, temperature=0.0)
    wall, cpu = time.perf_counter(), thread_cpu()
    outs = llm.generate(prompts, sampling)
    wall, cpu = time.perf_counter() - wall, cpu_since(cpu)
    return wall, cpu, sum(len(o.token_ids) for o in outs)


# The two models: today's tiny one (a step is ~ms, so per-token HTTP costs dominate) and the size
# benchmarks/engine_cpu.py measures (~100M parameters: a step is a realistic share of the work).
CASES = {
    "tiny": dict(layers=4, hidden=256, intermediate=512, heads=16, kv_heads=8, vocab=1024),
    "realistic": dict(layers=12, hidden=768, intermediate=2048, heads=12, kv_heads=4, vocab=16000),
}
QUICK_CASE = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256)


def write_model(directory: str, shape: dict) -> None:
    """A random float32 Llama of ``shape`` saved as a Hugging Face checkpoint."""
    from jaxserve.model.config import ModelConfig
    from jaxserve.model.export import save_hf_checkpoint
    from jaxserve.model.llama import params_of, random_model

    cfg = ModelConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_layers=shape["layers"], num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"], max_position_embeddings=2048, rms_norm_eps=1e-5, dtype="float32",
    )  # fmt: skip
    save_hf_checkpoint(directory, cfg, params_of(random_model(cfg, seed=0)))


def per_token_us(cpu: dict[str, float], tokens: int) -> dict[str, float]:
    return {k: round(v / tokens * 1e6, 1) for k, v in cpu.items()}


def run_case(model: str, description: str, args) -> dict:
    """Serves the workload with ``generate`` and over HTTP on one ``LLM`` of ``model``."""
    import jaxserve
    from jaxserve.serve.testing import running_server

    llm = jaxserve.LLM(model, scheduler=args.scheduler, stop_at_eos=False, compile_cache="",
                       scheduler_options={"max_num_seqs": max(args.num_requests, 1)})  # fmt: skip
    args.vocab = llm.cfg.vocab_size
    requests, prompts = workload(args)
    timed_generate(llm, prompts, args.output_len)  # compiles generate's step shapes
    before = llm.runner.num_compilations
    gen_wall, gen_cpu, gen_tokens = timed_generate(llm, prompts, args.output_len)
    gen_compiles = llm.runner.num_compilations - before
    with tempfile.TemporaryDirectory(prefix="serving-overhead-runs-") as tmp, running_server(llm, model_name="bench") as url:
        # The first run compiles the step shapes its batches meet; the timed run is the first
        # after it that compiles nothing (at most --warm-runs more tries, else the last one).
        run_client(url, args, os.path.join(tmp, "warm"))
        for attempt in range(max(args.warm_runs, 1)):
            before, compile_s = llm.runner.num_compilations, llm.runner.compile_seconds
            http, http_threads, client_cpu = run_client(url, args, os.path.join(tmp, f"run{attempt}"))
            http_compiles = llm.runner.num_compilations - before
            http_compile_s = llm.runner.compile_seconds - compile_s
            if http_compiles == 0:
                break
    # generate again after the HTTP run: on a shared machine the load drifts, and the two runs
    # bracketing the HTTP run in time give it the same conditions on average.
    after_wall, after_cpu, _ = timed_generate(llm, prompts, args.output_len)
    gen_tok_s = 2 * gen_tokens / (gen_wall + after_wall)
    gen_cpu = {k: round((gen_cpu.get(k, 0.0) + after_cpu.get(k, 0.0)) / 2, 3) for k in gen_cpu.keys() | after_cpu.keys()}
    # The engine loop compiles a step shape it meets for the first time while the client waits:
    # those seconds are not serving overhead, so they come off the HTTP run's makespan.
    tokens = http["throughput_tok_s"] * http["makespan_s"]
    http_tok_s = tokens / (http["makespan_s"] - http_compile_s)
    return {
        "model": {"path": description, "parameters": llm.cfg.num_params},
        "generate": {"tok_s": round(gen_tok_s, 1), "wall_s": round(gen_wall, 3), "wall_s_after_http": round(after_wall, 3),
                     "cpu_s": round(sum(gen_cpu.values()), 3),
                     "threads_cpu_s": gen_cpu, "cpu_us_per_token": per_token_us(gen_cpu, gen_tokens),
                     "output_tokens": gen_tokens, "compilations_when_timed": gen_compiles},
        "http": {"tok_s": round(http_tok_s, 1), "makespan_s": round(http["makespan_s"], 3),
                 "cpu_s": round(sum(http_threads.values()), 3), "threads_cpu_s": http_threads,
                 "client_cpu_s": round(client_cpu, 3), "client_replay_cpu_s": http["load_client"]["replay_cpu_s"],
                 "cpu_us_per_token": per_token_us({**http_threads, "client_replay": http["load_client"]["replay_cpu_s"]},
                                                  round(tokens)),
                 "timed_run_attempts": attempt + 1,
                 "num_finished": http["num_finished"], "num_failed": http["num_failed"] + http["num_rejected"],
                 "ttft_p50_s": http["ttft_s"]["p50"], "tbt_p50_s": http["tbt_s"]["p50"],
                 "compilations_when_timed": http_compiles, "compile_s_when_timed": round(http_compile_s, 3),
                 "tok_s_with_compiles": round(http["throughput_tok_s"], 1)},
        "ratio": round(http_tok_s / gen_tok_s, 3),
    }  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny model, 8 short requests, one warm-up run (a smoke run, ~1 min on a busy 2-core machine)")
    parser.add_argument("--model", default="", help="a local HF checkpoint to serve instead of the random models of --cases")
    parser.add_argument("--cases", default=",".join(CASES), help=f"random models to run, comma-separated, of {sorted(CASES)}")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--scheduler", default="sarathi")
    parser.add_argument("--warm-runs", type=int, default=3, help="HTTP runs after the first tried as the timed run, until one compiles nothing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shapes = {}
    for name in filter(None, args.cases.split(",")):
        if name not in CASES:
            parser.error(f"--cases: unknown case {name!r}; choose from {sorted(CASES)}")
        shapes[name] = CASES[name]
    if args.quick:
        args.num_requests, args.prompt_len, args.output_len, args.warm_runs = 8, 32, 16, 1
        shapes = {"tiny": QUICK_CASE}
    if not shapes and not args.model:
        parser.error("--cases names no case")

    import jax

    cases = {}
    with tempfile.TemporaryDirectory(prefix="serving-overhead-") as tmp:
        if args.model:
            cases["model"] = run_case(args.model, args.model, args)
        else:
            for name, shape in shapes.items():
                model = os.path.join(tmp, name)
                write_model(model, shape)
                description = (f"random {shape['layers']}-layer Llama, hidden {shape['hidden']}, "
                               f"{shape['heads']}/{shape['kv_heads']} heads, vocab {shape['vocab']}")  # fmt: skip
                cases[name] = run_case(model, description, args)
    result = {
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
        "cpus": os.cpu_count(),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "scheduler": args.scheduler,
        "workload": {"num_requests": args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len},
        "cases": cases,
        "ratios": {name: case["ratio"] for name, case in cases.items()},
        "target_ratio": TARGET_RATIO,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
