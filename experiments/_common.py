"""Shared helpers for the paper-reproduction scripts in ``experiments/``.

Every run goes through the same config path as ``python -m jaxserve.experiment``: a config from
``configs/<policy>.py``'s ``get_config()``, checked overrides (``jaxserve.config.override``, the
function the CLI's ``--config.<key>=<value>`` goes through), then ``jaxserve.sim.simulate``'s
``build_sim``/``run_sim``. So an experiment's point is a config a reader can rerun on the CLI:

* ``config_for(policy, overrides)``: ``configs/<policy>.py`` with dotted-key overrides;
* ``poisson_workload(...)`` / ``fixed_lengths(...)``: the overrides of a Poisson workload;
* ``cli_command(policy, overrides)``: the same run as a ``python -m jaxserve.experiment`` command;
* ``setup_for(config)``: the cost model, KV cache and context limit the config builds;
* ``load_lengths(path, max_total)`` and ``lengths_file``: a shared length CSV, optionally filtered to
  requests that fit a context window (written next to the outputs, for ``workload.lengths.path``);
* ``run(config)``: one simulated replica -> ``RunResult`` (log, metrics, per-request);
* ``parallel_map(...)``: a process pool with a rich progress bar;
* output helpers: ``output_dir``, ``write_csv``, ``save_figure``, ``write_summary``.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import importlib
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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

from jaxserve.config import get, override
from jaxserve.kv.config import KVConfig
from jaxserve.metrics import RequestMetrics, request_metrics
from jaxserve.runtime.events import FrozenLog
from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.simulate import build_cost_model, build_kv, build_sim, max_context, run_sim
from jaxserve.workload import Empirical, read_trace, resolve_trace_path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # configs/ is a package at the repository root, not part of jaxserve
    sys.path.append(str(ROOT))
console = Console()

SHAREGPT = "vidur_processed/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
ARXIV = "vidur_processed/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"


# -- configs ----------------------------------------------------------------------------------------


def config_for(policy: str, overrides: Mapping[str, Any] | None = None):
    """``configs/<policy>.py``'s config with ``overrides`` (dotted keys) applied and checked."""
    config = importlib.import_module(f"configs.{policy}").get_config()
    return override(config, overrides or {})


def poisson_workload(rate: float, num_requests: int, *, seed: int = 0, lengths_path: str | None = None,
                     client_id: str = "default") -> dict:
    """Overrides for ``num_requests`` Poisson(``rate``/s) arrivals from t=0 (no time window), lengths
    sampled from ``lengths_path`` (a length CSV) unless other ``workload.lengths`` overrides follow."""
    out = {"workload.kind": "poisson", "workload.qps": float(rate), "workload.num_requests": int(num_requests),
           "workload.seed": int(seed), "workload.client_id": client_id, "workload.duration_s": None}
    if lengths_path is not None:
        out |= {"workload.lengths.kind": "trace", "workload.lengths.path": str(lengths_path)}
    return out


def cli_command(policy: str, overrides: Mapping[str, Any]) -> str:
    """The ``python -m jaxserve.experiment`` command line that runs ``config_for(policy, overrides)``."""
    args = [f"--config.{k}={'none' if v is None else v}" for k, v in overrides.items()]
    return " ".join(["python -m jaxserve.experiment", f"--config=configs/{policy}.py", *args])


def fixed_lengths(prompt_len: int, output_len: int) -> dict:
    return {"workload.lengths.kind": "fixed", "workload.lengths.prompt_len": int(prompt_len),
            "workload.lengths.output_len": int(output_len)}


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
            f"{self.model} ({cm.dtype}) on {gpus}{self.hardware}: KV cache {self.kv.num_blocks:,} blocks x "
            f"{self.kv.block_size} = {self.kv_tokens:,} tokens (vLLM sizing, 90% of memory minus weights and "
            f"activations), context {self.max_context:,}; roofline mfu={cm.mfu}, mbu={cm.mbu}, "
            f"{cm.step_overhead_s * 1e3:.0f} ms overhead per step"
        )


def setup_for(config) -> Setup:
    """The cost model, KV cache and context limit ``simulate(config)`` builds."""
    cost_model = build_cost_model(config)
    return Setup(get(config, "model.name"), get(config, "hardware.name"), get(config, "hardware.tp"), cost_model,
                 build_kv(config, cost_model), max_context(config, cost_model))


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


def lengths_file(lengths: Lengths, out: Path) -> str:
    """A ``workload.lengths.path`` for ``lengths``: the shared file itself when nothing was
    filtered, else the kept rows written to ``out`` (a length-only CSV)."""
    if lengths.rows_kept == lengths.rows_total:
        return lengths.path
    path = out / f"lengths_{Path(lengths.path).stem}_max{lengths.max_total}.csv"
    dist = lengths.dist
    write_csv(path, ({"num_prefill_tokens": int(p), "num_decode_tokens": int(o)}
                     for p, o in zip(dist.prompt_lens, dist.output_lens)))
    return str(path)


# -- running ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunResult:
    log: FrozenLog
    metrics: dict
    requests: RequestMetrics
    wall_s: float


def run(config, requests: Sequence | None = None) -> RunResult:
    """Simulates ``config`` as ``python -m jaxserve.experiment`` would (``build_sim``/``run_sim``),
    serving ``requests`` (several config-built streams merged) instead of its workload when given.
    Requests beyond the context or the KV cache are rejected and counted in ``metrics["num_rejected"]``."""
    t0 = time.perf_counter()
    results = run_sim(build_sim(config, requests=requests))
    return RunResult(results.log, results.metrics, request_metrics(results.log), time.perf_counter() - t0)


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
