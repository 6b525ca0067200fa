"""Engine start-up: how long the README's engine example takes from a cold start and on a rerun.

    python benchmarks/engine_startup.py [--num_requests 64] [--full_warmup] [--quick]

A random 2-layer Llama (hidden 64, vocab 256, max_position_embeddings 1024:
``python -m jaxserve.model.export``) serves the README's engine example: Sarathi, Poisson 4 req/s,
uniform lengths 16-256, through ``python -m jaxserve.experiment --config.backend=engine``, each run
a separate process. Runs: ``cold`` (an empty persistent compilation cache), ``rerun`` (the same
cache again) and, with ``--full_warmup``, ``full_warmup`` (compile the whole bucket grid up front,
the engine's behaviour before lazy compilation; minutes). For each: wall seconds of the process,
its peak RSS, compilations, seconds spent compiling, shapes kept and requests finished; the
rerun's speed-up over the cold start is the ratio. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_example(model: str, out: str, cache: str, num_requests: int, warmup: bool) -> list[str]:
    return [
        sys.executable, "-m", "jaxserve.experiment", "--config=configs/sarathi.py", "--config.backend=engine",
        f"--config.model.path={model}", "--config.workload.kind=poisson", "--config.workload.qps=4",
        f"--config.workload.num_requests={num_requests}", "--config.workload.lengths.kind=uniform",
        "--config.workload.lengths.low=16", "--config.workload.lengths.high=256", "--config.scheduler.chunk_size=256",
        f"--config.output_dir={out}", f"--config.engine.compile_cache={cache}", f"--config.engine.warmup={warmup}",
    ]  # fmt: skip


def timed_run(cmd: list[str], env: dict) -> dict:
    """Wall seconds and peak RSS (MB) of one child process, and its metrics.json figures."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"run failed (exit {code}): {' '.join(cmd)}\n{stderr[-3000:]}{stdout[-1000:]}")
    out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--config.output_dir="))
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        "num_compilations": metrics["num_compilations"],
        "compile_s": round(metrics["compile_s"], 2),
        "num_finished": metrics["num_finished"],
        "num_requests": metrics["num_requests"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_requests", type=int, default=64)
    parser.add_argument("--full_warmup", action="store_true", help="also time a warm-up of the whole bucket grid")
    parser.add_argument("--quick", action="store_true", help="8 requests (a smoke run)")
    args = parser.parse_args(argv)
    n = 8 if args.quick else args.num_requests
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="jaxserve-startup-") as tmp:
        model, cache = os.path.join(tmp, "tiny"), os.path.join(tmp, "xla")
        subprocess.run([sys.executable, "-m", "jaxserve.model.export", model], cwd=ROOT, env=env, check=True,
                       capture_output=True)  # fmt: skip
        runs = {}
        for name, warm, cache_dir in (("cold", False, cache), ("rerun", False, cache)) + (
            (("full_warmup", True, os.path.join(tmp, "xla-full")),) if args.full_warmup else ()
        ):
            runs[name] = timed_run(readme_example(model, os.path.join(tmp, name), cache_dir, n, warm), env)
    result = {
        "benchmark": "engine_startup",
        "num_requests": n,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
        "runs": runs,
        "rerun_speedup": round(runs["cold"]["wall_s"] / runs["rerun"]["wall_s"], 2),
    }
    if "full_warmup" in runs:
        result["full_warmup_over_cold"] = round(runs["full_warmup"]["wall_s"] / runs["cold"]["wall_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
