"""Run one experiment config: ``python -m jaxserve.experiment --config=configs/sarathi.py``.

Overrides: ``--config.scheduler.chunk_size=256 --config.workload.qps=6`` (``--config.<bool key>``
alone means True, ``--noconfig.<bool key>`` False, ``=none`` unsets an optional key).
``--config_help`` lists every key with its default and meaning. Writes ``metrics.json``,
``requests.csv`` and PNG plots to ``config.output_dir`` and prints a summary table. A bad config
(unknown key, wrong type, missing trace, bad value) stops with one line that names the key, exit 2.

config_flags loads the config file; the ``--config.*`` overrides are taken out of the command line
before absl parses it and applied here, through ``jaxserve.config.override`` — the same checked path
the experiments use — because ml_collections' own override parsing cannot add did-you-mean, lets
``--config.workload.qps=abc`` through as a flags error (exit 1), and types placeholders loosely.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import importlib
import json
import math
import operator
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Optional

from absl import app, flags
from ml_collections import config_flags

from jaxserve.config import ConfigError, check_keys, get, key_type, leaf_keys, override, parse_value

if TYPE_CHECKING:  # rich is imported where a table or progress bar is drawn: write_outputs alone needs none
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Path to an experiment config file (configs/*.py). Override keys with --config.<key>=<value>; "
    "--config_help lists every key with its default and meaning.",
)  # fmt: skip
_CONFIG_HELP = flags.DEFINE_bool("config_help", False, "List every config key with its default and meaning, then exit.")

BACKENDS = ("sim", "engine")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds configs/ in a checkout
CONFIG_ERROR_EXIT = 2


@dataclasses.dataclass(frozen=True)
class Override:
    """One ``--config.<key>`` argument: ``text`` is None for a bare flag (``--config.x`` /
    ``--noconfig.x``, True / False for a bool key)."""

    key: str
    text: Optional[str]
    negated: bool
    arg: str  # as written


_OVERRIDE = re.compile(r"^--?(no)?config\.(.+)$")


def split_overrides(argv: list[str]) -> tuple[list[str], tuple[Override, ...]]:
    """(argv without the ``--config.*`` arguments, those arguments). ``--config.k=v`` and
    ``--config.k v`` both work; the next argument is taken as the value unless it starts with '-'."""
    rest, found, i = [], [], 0
    while i < len(argv):
        arg, m = argv[i], _OVERRIDE.match(argv[i]) if i else None
        i += 1
        if m is None:
            rest.append(arg)
            continue
        negated, body = bool(m.group(1)), m.group(2)
        if "=" in body:
            key, text = body.split("=", 1)
        elif not negated and i < len(argv) and not argv[i].startswith("-"):
            key, text, arg = body, argv[i], f"{arg} {argv[i]}"
            i += 1
        else:
            key, text = body, None
        found.append(Override(key, text, negated, arg))
    return rest, tuple(found)


def apply_overrides(config, overrides: tuple[Override, ...]):
    """A copy of ``config`` with the command-line overrides applied (later ones win); ConfigError
    names the key for an unknown key, an ill-typed value or a bare flag on a non-bool key."""
    values = {}
    for o in overrides:
        if o.text is None:
            kind, _ = key_type(config, o.key)
            if kind is not bool:
                raise ConfigError(f"{o.arg}: {o.key} is not a bool; give a value: --config.{o.key}=<value>")
            values[o.key] = not o.negated
        elif o.negated:
            raise ConfigError(f"{o.arg}: --noconfig takes no value; write --config.{o.key}={o.text}")
        else:
            values[o.key] = parse_value(config, o.key, o.text)
    return override(config, values)


def _defaults_module():
    """``configs.default`` (the declared keys): the one the config files import."""
    try:
        return importlib.import_module("configs.default")
    except ImportError as e:
        raise ConfigError(f"cannot import configs/default.py, which declares the keys ({e}); run from a checkout "
                          "or keep your configs/ next to a copy of it") from None


def config_help(config, keys, source: str) -> str:
    """The --config_help listing: every key of ``config`` in declaration order, its value, its help."""
    declared = {k.path: k for k in keys}
    order = [k.path for k in keys if k.path in set(leaf_keys(config))]
    order += [k for k in leaf_keys(config) if k not in declared]
    shown = {k: _show(get(config, k), declared.get(k)) for k in order}
    width, vwidth = max(map(len, order)), min(max(map(len, shown.values())), 40)
    lines = [f"Config keys of {source}, with their defaults. Set one with --config.<key>=<value>"
             " (=none unsets an optional key):", ""]
    for k in order:
        lines.append(f"  {k:<{width}}  {shown[k]:<{vwidth}}  {declared[k].help if k in declared else ''}".rstrip())
    return "\n".join(lines)


def _show(value, key) -> str:
    if value is None:
        return f"unset ({key.type.__name__})" if key is not None else "None"
    return repr(value)


def write_outputs(results, output_dir: str, title: str) -> list[str]:
    """Writes ``metrics.json``, ``requests.csv`` and the run's plots into ``output_dir``; returns
    their paths."""
    with _collection_paused():
        from jaxserve.metrics import request_metrics
        from jaxserve.plots import plot_run

        os.makedirs(output_dir, exist_ok=True)
        paths = [os.path.join(output_dir, "metrics.json"), os.path.join(output_dir, "requests.csv")]
        with open(paths[0], "w") as f:
            json.dump(results.metrics, f, indent=2, sort_keys=True, default=_json_default)
        write_rows_csv(paths[1], results.requests)
        paths += plot_run(results.log, request_metrics(results.log), output_dir, title)
    return paths


@contextlib.contextmanager
def _collection_paused():
    """Python's cyclic garbage collector off inside, then as it was. Importing matplotlib and
    drawing allocate some 10^5 objects, enough to set off full collections that walk every object
    alive, a whole run's requests and log among them (0.14 s of 1.1 on the Azure hour's first
    outputs); the few cycles made inside are collected by the next collection after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def write_rows_csv(path: str, rows: list[dict]) -> None:
    """The rows as a CSV file, columns in the first row's key order: ``csv.DictWriter``'s bytes
    (a missing key an empty cell, an extra one a ValueError). Rows with the first row's keys, as
    ``request_metrics(...).rows()`` gives them, go through the plain writer as tuples, without
    DictWriter's per-row key check (a fifth of the time on an hour's 19k rows)."""
    fields = list(rows[0]) if rows else ["request_id"]
    with open(path, "w", newline="") as f:
        keys = rows[0].keys() if rows else None
        if len(fields) > 1 and all(row.keys() == keys for row in rows):
            writer = csv.writer(f)
            writer.writerow(fields)
            writer.writerows(map(operator.itemgetter(*fields), rows))
            return
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def summary_table(metrics: dict, title: str) -> Table:
    from rich.table import Table

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
        "num_compilations", "compile_s", "num_replicas", "num_retried", "num_failed",
    ):
        if key in metrics and not (key in ("num_retried", "num_failed") and not metrics[key]):
            v = metrics[key]
            scalars.add_row(key, "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
    if metrics.get("migration_mode", "off") != "off":
        down = metrics["migration_downtime_s"]
        scalars.add_row(f"num_migrations ({metrics['migration_mode']})", str(metrics["num_migrations"]))
        scalars.add_row("migration_aborts", str(metrics["num_migration_aborts"]))
        scalars.add_row("migration_downtime_s p50/p99", "-" if down is None else f"{down['p50']:.4g} / {down['p99']:.4g}")
    outer = Table.grid()
    outer.add_row(table)
    outer.add_row(scalars)
    return outer


def _title(config, built) -> str:
    sched, workload = get(config, "scheduler.name"), get(config, "workload.kind")
    if get(config, "backend") == "engine":
        import jax

        model = os.path.basename(os.path.normpath(get(config, "model.path") or "?"))
        engines = f"{len(built.specs)} engines, {get(config, 'cluster.router')}" if hasattr(built, "specs") else "engine"
        return f"{sched} | {model} on {jax.default_backend()} ({engines}) | {workload}"
    cost_model = built.cost_model
    machine = cost_model.machine
    if hasattr(built, "specs"):  # a cluster: its size and router
        machine = f"{len(built.specs)} x {machine}, {get(config, 'cluster.router')}"
    if hasattr(cost_model, "num_instances"):  # a LoongServe node: its own scheduler, not scheduler.name
        sched, machine = "loongserve (elastic SP)", f"{cost_model.num_instances} x {machine} instances"
    if get(config, "sim.cost_model") == "profiled":  # the profile's model and machine, not model.name's
        return f"{sched} | {cost_model.model.name} on {machine} (profiled) | {workload}"
    return f"{sched} | {cost_model.model.name} on {machine} | {workload}"


REJECTION_WARN_FRACTION = 0.02  # above this share of rejected requests the summary warns


def run_notes(metrics: dict) -> list[str]:
    """Lines after the summary table: rejections by reason, and warnings a reader must not miss
    (nothing finished, more than a few percent rejected)."""
    n, rejected, finished = metrics["num_requests"], metrics["num_rejected"], metrics["num_finished"]
    lines = [f"rejected {count} of {n} ({count / n:.1%}): {reason}" for reason, count in metrics["rejections"].items()]
    lines += [f"[bold red]failed[/] {count} of {n} ({count / n:.1%}): {reason}" for reason, count in metrics["failures"].items()]
    if n and finished == 0:
        lines.append(f"[bold red]warning:[/] no request finished ({rejected} of {n} rejected); the metrics above are empty")
    elif n and rejected / n > REJECTION_WARN_FRACTION:
        lines.append(f"[bold yellow]warning:[/] {rejected / n:.1%} of requests were rejected; their reasons are in "
                     "requests.csv (finish_reason) and above")  # fmt: skip
    return lines


def client_table(metrics: dict) -> Optional[Table]:
    """Per-client service (w_p = 1 per prompt token, w_q = 2 per output token, as VTC counts), when
    the run had more than one client."""
    clients = metrics.get("clients")
    if not clients:
        return None
    from rich.table import Table

    table = Table(title="per client")
    for col in ("client", "requests", "finished", "service", "share", "ttft p50 (s)", "e2e p50 (s)"):
        table.add_column(col, justify="left" if col == "client" else "right")
    total = sum(c["service"] for c in clients.values()) or 1.0
    for name, c in clients.items():
        table.add_row(name, str(c["num_requests"]), str(c["num_finished"]), f"{c['service']:.0f}",
                      f"{c['service'] / total:.1%}", *("-" if c[k] is None else f"{c[k]:.3f}" for k in ("ttft_p50_s", "e2e_p50_s")))  # fmt: skip
    return table


def _progress(console: Console) -> Progress:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[what]}"), TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
    )  # fmt: skip


def run(config, console: Console) -> dict:
    """Runs ``config`` on its backend, writes the outputs and prints the summary; returns metrics."""
    backend = get(config, "backend", str)
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    output_dir = get(config, "output_dir", str)
    wall = time.perf_counter()
    # Read and build everything first: a config error then stops before the progress bar starts.
    from jaxserve.cluster.config import build_cluster_sim, is_cluster, run_cluster_sim

    cluster = is_cluster(config)  # cluster.* keys: a cluster of simulated replicas or of real engines
    if backend == "engine" and not cluster:
        from jaxserve.engine.serve_config import build_engine, serve_engine

        built, verb, unit = build_engine(config), "serving", "s served"
    elif backend == "engine":
        built, verb, unit = build_cluster_sim(config), "serving", "s served"
        simulate_run = run_cluster_sim
    else:
        from jaxserve.cluster.esp_config import build_loongserve_sim, is_loongserve, run_loongserve_sim
        from jaxserve.sim.simulate import build_sim, run_sim

        if is_loongserve(config):  # one node of elastic instances (LoongServe) instead of replicas
            build, simulate_run = build_loongserve_sim, run_loongserve_sim
        else:
            build, simulate_run = (build_cluster_sim, run_cluster_sim) if cluster else (build_sim, run_sim)
        built, verb, unit = build(config), "simulating", "s simulated"
    title = _title(config, built)
    with _progress(console) as progress:
        task = progress.add_task(verb, total=len(built.requests), what="requests", detail="")

        def on_progress(p):
            progress.update(task, completed=p.num_done, detail=f"{p.now:.1f} {unit}, {p.num_steps} steps")

        if backend == "engine" and not cluster:
            compile_task = None

            def on_warmup(done, total, shape):
                nonlocal compile_task
                if compile_task is None:
                    compile_task = progress.add_task("compiling", total=total, what="step shapes", detail="")
                progress.update(compile_task, completed=done, detail=f"(decode rows, prefill blocks) = {shape}")

            results = serve_engine(built, on_progress, on_warmup)
        else:
            results = simulate_run(built, on_progress)
        progress.add_task("writing outputs", total=None, what="", detail=output_dir)
        paths = write_outputs(results, output_dir, title)
    wall = time.perf_counter() - wall
    console.print(summary_table(results.metrics, title))
    clients = client_table(results.metrics)
    if clients is not None:
        console.print(clients)
    for line in run_notes(results.metrics):
        console.print(line)
    console.print(f"{results.metrics['num_steps']} steps in {wall:.1f} s wall; wrote {', '.join(paths)}")
    return results.metrics


def _one_line(e: BaseException) -> str:
    """An exception as one line (config_flags wraps a config file's own error in a traceback)."""
    text = str(e).replace("\\'", "'")
    text = text.split("Traceback (most recent call last)")[0]
    return " ".join(text.split()) or type(e).__name__


def load_config(overrides: tuple[Override, ...]):
    """The --config file's config (configs/default.py's without one) with the overrides applied and
    its keys checked against the declared ones."""
    try:
        loaded = _CONFIG.value
        if loaded is not None:
            loaded.lock  # config_flags defers a config file's load error to the first access  # noqa: B018
    except Exception as e:  # noqa: BLE001 - a config file may raise anything; report it as one line
        raise ConfigError(f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}: {_one_line(e)}") from None
    defaults = _defaults_module()
    if loaded is None:
        if not _CONFIG_HELP.value:
            raise ConfigError("pass --config=configs/<name>.py (--config_help lists the keys)")
        loaded = defaults.get_config()
    check_keys(loaded, defaults.get_config())
    return apply_overrides(loaded, overrides), defaults


QUIET_LOGGERS = ("jax", "matplotlib", "absl", "orbax")  # INFO chatter ("Unable to initialize backend 'tpu'", fonts)


def quiet_logs() -> None:
    """Library INFO lines off unless ``--verbosity`` (absl's flag) was given."""
    import logging

    if flags.FLAGS["verbosity"].present:
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv, overrides: tuple[Override, ...] = ()) -> int:
    del argv
    quiet_logs()
    try:
        config, defaults = load_config(overrides)
        if _CONFIG_HELP.value:
            path = config_flags.get_config_filename(flags.FLAGS["config"]) if _CONFIG.value is not None else None
            source = os.path.relpath(path) if path else "configs/default.py"
            print(config_help(config, defaults.keys(), source))
            return 0
        from rich.console import Console

        run(config, Console(width=120))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"config error: {_one_line(e)}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    return 0


def _put_config_root_on_path(argv: list[str]) -> None:
    """Config files import their base as ``from configs import default``: make that work from any
    working directory by putting the folder that holds the config's ``configs`` package on the path
    (and, behind everything, the checkout's, for config files kept elsewhere)."""
    for arg in argv[1:]:
        if arg.startswith("--config="):
            folder = os.path.dirname(os.path.abspath(arg.split("=", 1)[1]))
            if os.path.isfile(os.path.join(folder, "__init__.py")):
                root = os.path.dirname(folder)
                if root not in sys.path:
                    sys.path.insert(0, root)
    if os.path.isfile(os.path.join(REPO_ROOT, "configs", "default.py")) and REPO_ROOT not in sys.path:
        sys.path.append(REPO_ROOT)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that a config file that fails while config_flags runs its
    ``get_config()`` is a config error like any other: one line, exit 2."""
    given = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "?")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if not str(e).startswith("flag --config="):  # another flag: absl's usual message and exit 1
            sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.\n")
            sys.exit(1)
        # config_flags wraps the config file's exception with its traceback; its last line says what.
        cause = [line for line in str(e).splitlines() if line.strip()][-1].strip()
        print(f"config error: --config={given}: {cause}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - a config file may raise anything
        print(f"config error: --config={given}: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
    sys.exit(CONFIG_ERROR_EXIT)


def cli():
    _put_config_root_on_path(sys.argv)
    # config_flags reads --config.* overrides from sys.argv itself: take them out, apply them in main().
    sys.argv, overrides = split_overrides(sys.argv)
    app.run(lambda argv: sys.exit(main(argv, overrides)), flags_parser=_parse_flags)


if __name__ == "__main__":
    cli()
