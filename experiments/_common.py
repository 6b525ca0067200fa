"""Shared helpers for the paper-reproduction scripts in ``experiments/``.

Everything here goes through jaxserve's public API (``jaxserve.sim.simulate``'s builders,
``run_replica``, the workload builders, ``jaxserve.metrics``), so the experiments see exactly what
``python -m jaxserve.experiment`` would for the same settings:

* ``make_setup(model, hardware)``: the roofline cost model and the KV cache vLLM would size for it;
* ``load_lengths(path, max_total)``: an ``Empirical`` (prompt, output) distribution from a shared
  length CSV, optionally filtered to requests that fit a context window;
* ``poisson_requests(...)``: Poisson arrivals with lengths from a pair distribution;
* ``run(setup, scheduler, requests)``: one simulated replica -> ``RunResult`` (log, metrics, per-request);
* ``parallel_map(...)``: a process pool over the 2 cores with a rich progress bar;
* output helpers: ``output_dir``, ``write_csv``, ``save_figure``, ``write_summary``.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported anywhere
import matplotlib.pyplot as plt
import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

import jaxserve.scheduler as schedulers
from jaxserve.runtime.events import FrozenLog
from jaxserve.kv.config import KVConfig
from jaxserve.metrics import RequestMetrics, request_metrics, summarize
from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.simulate import build_cost_model, build_kv
from jaxserve.runtime import RunLimits, run_replica
from jaxserve.sim.executor import SimExecutor
from jaxserve.workload import (
    ArrivalProcess,
    Empirical,
    build_requests,
    read_trace,
    resolve_trace_path,
)

ROOT = Path(__file__).resolve().parents[1]
console = Console()

SHAREGPT = "vidur_processed/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
ARXIV = "vidur_processed/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"


# -- model x hardware ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    """A model on one replica: its cost model, KV cache and context limit."""

    model: str
    hardware: str
    tp: int
    cost_model: RooflineCostModel
    kv: KVConfig
    max_context: int

    @property
    def kv_tokens(self) -> int:
        return self.kv.capacity_tokens

    def decode_step_s(self, batch: int = 1, context: int = 1024) -> float:
        """Modelled duration of one decode step of ``batch`` rows with ``context`` tokens each."""
        return float(self.cost_model.decode_run(batch, batch * context, context, 1)[0][0])

    def describe(self) -> str:
        cm = self.cost_model
        gpus = f"{self.tp}x " if self.tp > 1 else "1x "
        return (
            f"{self.model} (bf16) on {gpus}{self.hardware}: KV cache {self.kv.num_blocks:,} blocks x "
            f"{self.kv.block_size} = {self.kv_tokens:,} tokens (vLLM sizing, 90% of memory minus weights and "
            f"activations), context {self.max_context:,}; roofline mfu={cm.mfu}, mbu={cm.mbu}, "
            f"{cm.step_overhead_s * 1e3:.0f} ms overhead per step"
        )


def make_setup(model: str, hardware: str, *, tp: int = 1, block_size: int = 16, memory_fraction: float = 0.9,
               num_blocks: int = 0, max_context: int | None = None) -> Setup:
    """Cost model and KV cache exactly as ``simulate(config)`` builds them for these keys."""
    config = {
        "model": {"name": model, "dtype": "bf16"},
        "hardware": {"name": hardware, "tp": tp, "pp": 1},
        "kv": {"block_size": block_size, "num_blocks": num_blocks, "memory_fraction": memory_fraction},
    }
    cost_model = build_cost_model(config)
    kv = build_kv(config, cost_model)
    context = max_context or cost_model.model.max_position_embeddings
    return Setup(model, hardware, tp, cost_model, kv, int(context))


# -- workloads --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lengths:
    """An empirical length distribution and what was kept of its file."""

    path: str
    dist: Empirical
    rows_total: int
    rows_kept: int
    max_total: int | None

    def describe(self) -> str:
        p, o = self.dist.prompt_lens, self.dist.output_lens
        kept = (f", filtered to prompt + output <= {self.max_total:,} tokens: {self.rows_kept:,} of "
                f"{self.rows_total:,} rows ({self.rows_kept / self.rows_total:.0%}) kept"
                if self.max_total else f", {self.rows_total:,} rows")
        return (f"`{self.path}`{kept}; prompt mean {p.mean():.0f} / median {np.median(p):.0f} / max {p.max():,}, "
                f"output mean {o.mean():.0f} / median {np.median(o):.0f} / max {o.max():,} tokens")


def load_lengths(path: str, max_total: int | None = None) -> Lengths:
    """(prompt, output) pairs of a shared length CSV (resolved by jaxserve's trace resolver, never
    copied); with ``max_total``, only rows with prompt + output <= max_total."""
    trace = read_trace(resolve_trace_path(path))
    prompt, output = np.asarray(trace.prompt_len), np.asarray(trace.output_len)
    keep = np.ones(len(prompt), bool) if max_total is None else (prompt + output) <= max_total
    return Lengths(path, Empirical(prompt[keep], output[keep]), len(prompt), int(keep.sum()), max_total)


def poisson_requests(lengths, rate: float, num_requests: int, *, seed: int = 0, client_id: str = "default"):
    """``num_requests`` length-only requests with Poisson(``rate``/s) arrivals from t=0."""
    dist = lengths.dist if isinstance(lengths, Lengths) else lengths
    return build_requests(arrivals=ArrivalProcess("poisson", rate), lengths=dist, num_requests=num_requests,
                          seed=seed, client_id=client_id)


# -- running ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunResult:
    log: FrozenLog
    metrics: dict
    requests: RequestMetrics
    wall_s: float


def make_scheduler(spec):
    """A scheduler from a name, a (name, options) pair, or an already built one."""
    if isinstance(spec, str):
        return schedulers.make(spec)
    if isinstance(spec, tuple):
        name, options = spec
        return schedulers.make(name, **options)
    return spec


def run(setup: Setup, scheduler, requests, *, max_sim_time_s: float = math.inf) -> RunResult:
    """Serves ``requests`` on one simulated replica (requests beyond the context or the KV cache
    are rejected and counted in ``metrics["num_rejected"]``)."""
    t0 = time.perf_counter()
    limits = RunLimits(max_context=setup.max_context, max_sim_time_s=max_sim_time_s)
    log = run_replica(make_scheduler(scheduler), setup.kv, SimExecutor(setup.cost_model), requests,
                      limits=limits).freeze()
    metrics = summarize(log, price_per_hour_usd=setup.cost_model.cost_usd_per_hour())
    return RunResult(log, metrics, request_metrics(log), time.perf_counter() - t0)


def flat_metrics(metrics: dict, keys: Sequence[str] = (
        "num_requests", "num_rejected", "num_finished", "num_preemptions", "throughput_req_s",
        "throughput_tok_s", "makespan_s", "busy_fraction", "peak_kv_usage")) -> dict:
    """A CSV-friendly subset of ``summarize`` output: scalars plus mean/p50/p99 of distributions."""
    row = {k: metrics[k] for k in keys if k in metrics}
    for name in ("normalized_latency_s", "ttft_s", "tbt_s", "tpot_s", "e2e_s", "queueing_s"):
        for stat in ("mean", "p50", "p99"):
            row[f"{name}_{stat}"] = metrics[name][stat]
    return row


# -- parallel sweeps with progress ----------------------------------------------------------------


def default_jobs() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=console)


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], *, jobs: int, description: str,
                 label: Callable[[Any], str] = str) -> list:
    """``[fn(x) for x in items]`` over ``jobs`` forked processes (``fn`` must be a module-level
    function), with a progress bar; results in input order."""
    items = list(items)
    results: list = [None] * len(items)
    with progress_bar() as progress:
        task = progress.add_task(description, total=len(items), last="")
        if jobs <= 1 or len(items) <= 1:
            for i, item in enumerate(items):
                results[i] = fn(item)
                progress.update(task, advance=1, last=label(item))
            return results
        ctx = multiprocessing.get_context("fork")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            for future in cf.as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                progress.update(task, advance=1, last=label(items[i]))
    return results


# -- outputs ----------------------------------------------------------------------------------------


def output_dir(name: str, root: str | None = None) -> Path:
    out = Path(root) if root else ROOT / "outputs" / "experiments" / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_csv(path: Path, rows: Iterable[dict]) -> Path:
    rows = list(rows)
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def _csv_value(v):
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else f"{float(v):.6g}"
    if isinstance(v, np.integer):
        return int(v)
    return v


def save_figure(fig, path: Path) -> Path:
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def write_summary(out: Path, text: str) -> Path:
    path = out / "summary.md"
    path.write_text(text)
    return path


def print_summary(path: Path, wall_s: float) -> None:
    console.rule(f"[bold]{path}")
    print(path.read_text())
    console.print(f"[dim]outputs in {path.parent} ({wall_s:.0f} s wall)[/dim]")


def fmt_ratio(a: float, b: float) -> str:
    if not (b > 0) or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}x"


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
