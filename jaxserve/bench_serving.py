"""Replay a trace against a live OpenAI-compatible server and measure it from the client side.

    python -m jaxserve.bench_serving --base-url http://127.0.0.1:8000 --trace azure_llm_2023/AzureLLMInferenceTrace_conv.csv \\
        --max-requests 200 --speedup 2 [--compare-sim --profile profile.json --sim-set scheduler.name=sarathi]

Arrivals come from a trace (Azure CSV, Vidur CSV, Mooncake JSONL; ``--arrivals poisson|gamma|fixed``
with ``--rate`` for a length-only trace or none) and lengths from the trace or ``--lengths``, through
``jaxserve.workload`` as the simulator reads them. Each request is sent at its arrival time (real
time) as a streaming ``/v1/completions`` request: a prompt of the trace's length (token ids when the
server takes them, else about that many words), ``max_tokens`` = the trace's output length with
``ignore_eos``. TTFT and every gap between tokens are measured from the stream. Writes
``metrics.json`` (the simulator's keys; what a client cannot see is null, with why in
``unavailable``, plus ``load_client``: what was sent and how), ``requests.csv`` and the simulator's
plots to ``--out``, and prints the summary table. Failed requests are counted, never fatal.

``--compare-sim`` simulates the same arrivals (as sent, with the output lengths the server produced)
with the profiled cost model of ``--profile`` (``python -m jaxserve.profile``; with ``--profile-model
DIR`` a missing profile is measured first) and prints, per metric, the live value, the simulated one
and the error; metrics.json gains ``compare_sim`` (``sim_metrics.json``: the simulator's metrics).
Warm a server that compiles lazily first (jaxserve: ``--warmup``, or replay the workload once): a
step shape compiled mid-run stalls every stream, which no profile models.
Exit status: 0, or 2 for bad flags or an unusable server (one line naming the flag).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from jaxserve.config import ConfigError, Results, override, parse_value
from jaxserve.metrics import request_metrics
from jaxserve.serve import compare_sim, load_client, load_log, load_workload
from jaxserve.serve.load_client import EndpointError, SendOptions
from jaxserve.workload import FORMATS

EXIT_BAD_INPUT = 2
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.py"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxserve.bench_serving", description=__doc__.split("\n\n")[0])
    server = p.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's root (its /v1/completions is used)")
    server.add_argument("--model", default=None, help="model name to send (default: the first /v1/models lists)")
    server.add_argument("--prompt-mode", choices=("auto", "ids", "text"), default="auto",
                        help="prompts as token-id lists or synthetic text; auto: ids when a probe request with ids succeeds")
    server.add_argument("--vocab-size", type=int, default=None,
                        help=f"prompt ids are drawn below this (default: /v1/models' vocab_size, else {load_client.FALLBACK_VOCAB})")
    server.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="do not send ignore_eos (for servers that reject the field)")
    server.add_argument("--temperature", type=float, default=0.0)
    server.add_argument("--extra-body", default="{}", help="a JSON object merged into every request body")
    server.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take in all")
    server.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at once (default: unbounded)")
    work = p.add_argument_group("workload")
    work.add_argument("--trace", default=None,
                      help="trace file: a path, one relative to $JAXSERVE_TRACES or ../shared/traces, or sample:<name>")
    work.add_argument("--trace-format", choices=("auto", *FORMATS), default="auto")
    work.add_argument("--arrivals", choices=("trace", "poisson", "gamma", "fixed"), default=None,
                      help="default: the trace's timestamps with --trace, else poisson")
    work.add_argument("--rate", type=float, default=None, help="req/s of synthetic arrivals, or a trace's mean rate after rescaling")
    work.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: coefficient of variation of the gaps")
    work.add_argument("--num-requests", type=int, default=100, help="synthetic arrivals: how many")
    work.add_argument("--lengths", default=None, help="fixed:P,O | uniform:LO,HI | zipf:A,LO,HI | file:PATH (default: the trace's)")
    work.add_argument("--speedup", type=float, default=1.0, help="replay a trace this many times faster")
    work.add_argument("--start-s", type=float, default=0.0, help="skip the trace's first seconds")
    work.add_argument("--duration-s", type=float, default=None, help="keep this many seconds of the trace")
    work.add_argument("--max-requests", type=int, default=None, help="send at most this many requests")
    work.add_argument("--max-context", type=int, default=None,
                      help="drop requests whose prompt + output exceed this (default: /v1/models' max_model_len; 0: keep all)")
    work.add_argument("--seed", type=int, default=0, help="arrivals, sampled lengths and prompt ids")
    out = p.add_argument_group("outputs")
    out.add_argument("--out", default="outputs/bench_serving", help="where metrics.json, requests.csv and plots go")
    out.add_argument("--slo-ttft", type=float, default=None, help="TTFT target (s) for slo_attainment")
    out.add_argument("--slo-tpot", type=float, default=None, help="TPOT target (s) for slo_attainment")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    sim = p.add_argument_group("compare with the simulator")
    sim.add_argument("--compare-sim", action="store_true", help="simulate the same arrivals with the profiled cost model")
    sim.add_argument("--profile", default=None, help="profile JSON of the server's engine (python -m jaxserve.profile)")
    sim.add_argument("--profile-model", default=None, help="a local HF model dir: measure --profile from it when the file is missing")
    sim.add_argument("--profile-grid", choices=("small", "default"), default="small")
    sim.add_argument("--sim-config", default=str(DEFAULT_CONFIG), help="config file the simulation starts from")
    sim.add_argument("--sim-set", action="append", default=[], metavar="KEY=VALUE",
                     help="a simulator config override (repeatable), e.g. scheduler.name=sarathi; the server's "
                          "max_model_len and KV pool (from /metrics' cache_config_info) are set when it reports them")
    return p


class BadInput(ValueError):
    """A flag is wrong or the server unusable; the message names the flag."""


def send_options(args) -> SendOptions:
    try:
        extra = json.loads(args.extra_body)
    except json.JSONDecodeError as e:
        raise BadInput(f"--extra-body: not JSON ({e})") from None
    if not isinstance(extra, dict):
        raise BadInput(f"--extra-body must be a JSON object, got {args.extra_body!r}")
    for flag, value in (("--timeout", args.timeout), ("--max-concurrency", args.max_concurrency)):
        if value is not None and not value > 0:
            raise BadInput(f"{flag} must be > 0, got {value}")
    return SendOptions(temperature=args.temperature, ignore_eos=args.ignore_eos, extra_body=extra,
                       timeout_s=args.timeout, max_concurrency=args.max_concurrency)  # fmt: skip


def workload_spec(args, max_context: int) -> load_workload.WorkloadSpec:
    arrivals = args.arrivals or ("trace" if args.trace else "poisson")
    for flag, value in (("--speedup", args.speedup), ("--cv", args.cv)):
        if not value > 0:
            raise BadInput(f"{flag} must be > 0, got {value}")
    return load_workload.WorkloadSpec(
        trace=args.trace, trace_format=args.trace_format, arrivals=arrivals, rate=args.rate, cv=args.cv,
        num_requests=args.num_requests, lengths=args.lengths, speedup=args.speedup, start_s=args.start_s,
        duration_s=args.duration_s, max_requests=args.max_requests, max_context=max_context, seed=args.seed,
    )  # fmt: skip


# -- the run ----------------------------------------------------------------------------------------


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]replaying"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                    TimeElapsedColumn(), console=console, transient=True, disable=console.quiet)  # fmt: skip


async def run_replay(args, options: SendOptions, console: Console):
    """Discovers the server, builds the workload (cut to its context), replays it: (info, requests,
    outcomes, the server's KV pool or None, the client's CPU seconds during the replay)."""
    async with load_client.make_client(options) as client:
        info = await load_client.discover(client, args.base_url.rstrip("/"), args.model, args.prompt_mode, options,
                                          args.vocab_size)  # fmt: skip
        max_context = args.max_context if args.max_context is not None else (info.max_model_len or 0)
        requests = load_workload.build_load(workload_spec(args, max_context))
        pool = await load_client.server_kv_pool(client, info.base_url)
        console.print(f"{info.base_url}: model {info.model!r}, prompts as {info.prompt_mode}; sending {len(requests)} requests "
                      f"over {requests[-1].arrival_s:.1f} s")  # fmt: skip
        counts = {"ok": 0, "rejected": 0, "failed": 0}
        with _progress(console) as progress:
            task = progress.add_task("replay", total=len(requests), detail="")

            def on_done(outcome):
                counts[outcome.status] += 1
                progress.update(task, advance=1, detail=", ".join(f"{v} {k}" for k, v in counts.items() if v))

            cpu = time.process_time()
            outcomes = await load_client.replay(client, info, requests, options, seed=args.seed, on_done=on_done)
            cpu = time.process_time() - cpu
    return info, requests, outcomes, pool, cpu


def client_facts(args, info, requests, outcomes, options: SendOptions, replay_cpu_s: float) -> dict:
    """metrics.json's ``load_client``: what was sent, to whom, how late the client sent it, and the
    CPU seconds the client spent replaying (its own overhead, e.g. per streamed chunk)."""
    lag = np.array([o.sent_s - r.arrival_s for r, o in zip(requests, outcomes)])
    usage_mismatch = sum(o.usage_tokens is not None and o.usage_tokens != o.num_tokens for o in outcomes)
    return {
        "base_url": info.base_url, "model": info.model, "prompt_mode": info.prompt_mode,
        "max_model_len": info.max_model_len, "trace": args.trace, "speedup": args.speedup, "rate": args.rate,
        "num_sent": len(requests), "num_ok": sum(o.status == "ok" for o in outcomes),
        "ignore_eos": options.ignore_eos, "temperature": options.temperature,
        "send_lag_s": {"p50": float(np.percentile(lag, 50)), "p99": float(np.percentile(lag, 99)), "max": float(lag.max())},
        "num_usage_mismatch": int(usage_mismatch),
        "num_short": sum(o.status == "ok" and o.num_tokens < r.max_tokens for r, o in zip(requests, outcomes)),
        "replay_cpu_s": round(replay_cpu_s, 3),
    }  # fmt: skip


# -- --compare-sim ----------------------------------------------------------------------------------


def _load_config_file(path: str):
    """``get_config()`` of a config file (configs/*.py import ``configs.default``: its root goes on the path)."""
    file = Path(path)
    if not file.is_file():
        raise BadInput(f"--sim-config {path}: no such file")
    root = str(file.resolve().parents[1])
    if root not in sys.path:
        sys.path.append(root)
    spec = importlib.util.spec_from_file_location(f"_bench_serving_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as e:  # noqa: BLE001 - a config file may raise anything; report it as one line
        raise BadInput(f"--sim-config {path}: {type(e).__name__}: {e}") from None


def sim_config(args, info, pool):
    """The simulator's config: ``--sim-config``, the profiled cost model of ``--profile``, the server's
    context and KV pool when it reports them, then the ``--sim-set`` overrides."""
    if not args.profile:
        raise BadInput("--compare-sim needs --profile (a profile of the server's engine: python -m jaxserve.profile)")
    config = _load_config_file(args.sim_config)
    values = {"sim.cost_model": "profiled", "sim.profile": args.profile, "model.max_context": info.max_model_len or 0}
    if pool is not None:
        values["kv.num_blocks"], values["kv.block_size"] = pool
    try:
        config = override(config, values)
        for item in args.sim_set:
            key, sep, text = item.partition("=")
            if not sep:
                raise BadInput(f"--sim-set {item!r}: expected KEY=VALUE")
            config = override(config, {key: parse_value(config, key, text)})
    except ConfigError as e:
        raise BadInput(f"--sim-set: {e}") from None
    return config


def ensure_profile(args, console: Console) -> None:
    """Measures ``--profile`` from ``--profile-model`` when the file is missing (imports the engine)."""
    if not args.profile or os.path.exists(args.profile):
        if args.profile and args.profile_model:
            console.print(f"--profile {args.profile} exists; not measuring it again")
        return
    if not args.profile_model:
        raise BadInput(f"--profile {args.profile}: no such file (give --profile-model DIR to measure it)")
    from jaxserve.calibration.profiler import profile_model

    console.print(f"profiling {args.profile_model} ({args.profile_grid} grid) -> {args.profile}")
    profile_model(args.profile_model, args.profile, grid=args.profile_grid, repeats=3, progress=not args.quiet)


def run_compare(args, info, pool, requests, outcomes, live_metrics: dict, console: Console) -> dict:
    from jaxserve.sim.simulate import build_sim, run_sim

    config = sim_config(args, info, pool)
    try:
        results = run_sim(build_sim(config, requests=compare_sim.sim_requests(requests, outcomes)))
    except ConfigError as e:
        raise BadInput(f"--compare-sim: {e} (set it with --sim-set)") from None
    rows = compare_sim.compare(live_metrics, results.metrics)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sim_metrics.json"), "w") as f:  # the simulator's metrics.json, whole
        json.dump(results.metrics, f, indent=2, sort_keys=True)
    console.print(comparison_table(rows))
    return {"profile": args.profile, "scheduler": str(config.scheduler.name), "num_kv_blocks": results.kv.num_blocks,
            "rows": rows, "worst_error": compare_sim.worst_error(rows), "sim_metrics": "sim_metrics.json"}  # fmt: skip


def comparison_table(rows) -> Table:
    table = Table(title="simulator vs live server (same arrivals)")
    for col in ("metric", "live", "sim", "error"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    for r in rows:
        table.add_row(r["metric"], fmt(r["live"]), fmt(r["sim"]), "-" if r["error"] is None else f"{100 * r['error']:+.1f}%")
    return table


# -- outputs ----------------------------------------------------------------------------------------


def write(results: Results, out: str, title: str) -> list[str]:
    """metrics.json, requests.csv and the plots, as ``python -m jaxserve.experiment`` writes them."""
    from jaxserve.experiment import write_outputs

    return write_outputs(results, out, title)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(stderr=True, quiet=args.quiet)
    out = Console(width=120)
    try:
        options = send_options(args)
        load_workload.build_load(workload_spec(args, args.max_context or 0))  # bad workload flags: before any request
        if args.compare_sim:
            ensure_profile(args, console)
        info, requests, outcomes, pool, replay_cpu_s = asyncio.run(run_replay(args, options, console))
        log = load_log.outcome_log(requests, outcomes)
        metrics = load_log.summarize_client(log, slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot)
        metrics["load_client"] = client_facts(args, info, requests, outcomes, options, replay_cpu_s)
        from jaxserve.experiment import run_notes, summary_table

        title = f"{info.model} at {info.base_url} | {args.trace or args.arrivals or 'poisson'}"
        out.print(summary_table(metrics, title))
        for line in run_notes(metrics):
            out.print(line)
        if args.compare_sim:
            metrics["compare_sim"] = run_compare(args, info, pool, requests, outcomes, metrics, out)
        paths = write(Results(metrics, request_metrics(log).rows(), log, None, None), args.out, title)
    except (BadInput, EndpointError, load_workload.WorkloadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out.print(f"wrote {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
