"""Run one experiment config: ``python -m jaxserve.experiment --config=configs/sarathi.py``.

Overrides: ``--config.scheduler.chunk_size=256 --config.workload.qps=6``. Writes ``metrics.json``,
``requests.csv`` and PNG plots to ``config.output_dir`` and prints a summary table. A bad config
(unknown key, wrong type, missing trace, bad value) stops with one message that names it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiment config file (configs/*.py).")

BACKENDS = ("sim", "engine")


def write_outputs(results, output_dir: str, title: str) -> list[str]:
    from jaxserve.metrics import request_metrics
    from jaxserve.plots import plot_run

    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, "metrics.json"), os.path.join(output_dir, "requests.csv")]
    with open(paths[0], "w") as f:
        json.dump(results.metrics, f, indent=2, sort_keys=True, default=_json_default)
    with open(paths[1], "w", newline="") as f:
        rows = results.requests
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["request_id"])
        writer.writeheader()
        writer.writerows(rows)
    paths += plot_run(results.log, request_metrics(results.log), output_dir, title)
    return paths


def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def summary_table(metrics: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    for col in ("mean", "p50", "p90", "p99"):
        table.add_column(col, justify="right")
    for key in ("ttft_s", "tbt_s", "tpot_s", "e2e_s", "normalized_latency_s", "queueing_s"):
        d = metrics[key]
        table.add_row(key, *("-" if d[c] is None else f"{d[c]:.4f}" for c in ("mean", "p50", "p90", "p99")))
    scalars = Table(show_header=False)
    for key in (
        "num_requests", "num_finished", "num_rejected", "num_preemptions", "throughput_req_s",
        "throughput_tok_s", "slo_attainment", "energy_j_per_token", "cost_usd_per_mtok", "num_kv_blocks",
        "num_compilations",
    ):
        if key in metrics:
            v = metrics[key]
            scalars.add_row(key, f"{v:.4g}" if isinstance(v, float) else str(v))
    outer = Table.grid()
    outer.add_row(table)
    outer.add_row(scalars)
    return outer


def _title(config) -> str:
    sched, workload = config.scheduler.name, config.workload.kind
    if config.backend == "engine":
        import jax

        model = os.path.basename(os.path.normpath(config.model.path or "?"))
        return f"{sched} | {model} on {jax.default_backend()} (engine) | {workload}"
    return f"{sched} | {config.model.name} on {config.hardware.name} | {workload}"


def run(config, console: Console) -> dict:
    """Runs ``config`` on its backend, writes the outputs and prints the summary; returns metrics."""
    backend = config.backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "engine":
        from jaxserve.engine.serve_config import run_engine as execute

        verb, unit = "serving", "s served"
    else:
        from jaxserve.sim.simulate import simulate as execute

        verb, unit = "simulating", "s simulated"
    title = _title(config)
    wall = time.perf_counter()
    with Progress(
        TextColumn(f"[bold]{verb}"), BarColumn(), TextColumn("{task.fields[clock]:.1f} " + unit),
        TextColumn("{task.completed} steps"), TimeElapsedColumn(), console=console, transient=True,
    ) as progress:
        task = progress.add_task(verb, total=None, clock=0.0)
        results = execute(config, on_progress=lambda t, steps: progress.update(task, completed=steps, clock=t))
    wall = time.perf_counter() - wall
    paths = write_outputs(results, config.output_dir, title)
    console.print(summary_table(results.metrics, title))
    console.print(f"{results.metrics['num_steps']} steps in {wall:.1f} s wall; wrote {', '.join(paths)}")
    return results.metrics


def main(argv):
    del argv
    console = Console(width=120)
    try:
        config = _CONFIG.value
    except Exception as e:  # noqa: BLE001 - config_flags raises many kinds; report them all plainly
        console.print(f"[red]config error:[/red] {e}")
        return 2
    if config is None:
        console.print("[red]config error:[/red] pass --config=configs/<name>.py")
        return 2
    from jaxserve.config import ConfigError

    try:
        run(config, console)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        console.print(f"[red]config error:[/red] {e}")
        return 2
    return 0


def _put_config_root_on_path(argv: list[str]) -> None:
    """Config files import their base as ``from configs import default``: make that work from any
    working directory by putting the folder that holds the config's ``configs`` package on the path."""
    for arg in argv[1:]:
        if arg.startswith("--config="):
            folder = os.path.dirname(os.path.abspath(arg.split("=", 1)[1]))
            if os.path.isfile(os.path.join(folder, "__init__.py")):
                root = os.path.dirname(folder)
                if root not in sys.path:
                    sys.path.insert(0, root)


def cli():
    _put_config_root_on_path(sys.argv)
    try:
        app.run(lambda argv: sys.exit(main(argv)))
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, ImportError, OSError) as e:
        # --config.a.b=v overrides are applied while absl parses flags, before main() runs: an
        # unknown key or a value of the wrong type surfaces here.
        msg = str(e).replace("\\'", "'").replace("\\n", " ").replace("\n", " ").strip("'\"")
        overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
        arg = next((a for a in overrides if a.split("=")[0].rsplit(".", 1)[-1] in msg), "")
        print(f"config error: {arg + ': ' if arg else ''}{msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
