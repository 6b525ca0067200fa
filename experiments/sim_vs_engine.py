"""How far is the simulator from the engine? The profiled cost model against real CPU serving (issue 6).

    python experiments/sim_vs_engine.py [--quick] [--model DIR] [--fresh-profile] [--out DIR]

1. A small random Llama (4 layers, hidden 384, 12.6M parameters, f32) is written as a HF checkpoint
   (or ``--model`` names one) and profiled on this machine with ``jaxserve.profile``'s default grid
   (kept in the output directory and resumed; ``--fresh-profile`` measures it again).
2. Each workload — Poisson arrivals with ShareGPT lengths, and the Azure LLM 2023 conversation trace
   (its arrival pattern rescaled to a rate) — is served by ``sarathi`` and by ``vllm`` twice: on
   the engine (real model, measured-time clock compensated for the machine's drift, below) and in
   the simulator with the profiled cost model of that profile (``sim.cost_model=profiled``), from
   the same requests.
3. Step times: every plan the engine ran is also costed by the profiled model (and, for contrast, by
   the uncalibrated roofline of the same model on the ``cpu`` hardware spec); MAPE against the
   measured time (compensated, and raw). Latencies: TTFT, TBT and E2E P50/P90/P99 of the simulated
   run against the engine's. Targets: step-time MAPE <= 10 %, P50 and P99 within 15 %.

Writes ``outputs/experiments/sim_vs_engine/``: steps.csv (every engine step), probes.csv (every
speed probe), requests.csv (each request's latencies on both), latency.csv,
step_times.png, latency_cdfs.png, machine_speed.png, summary.md (the error tables), profile.json,
model/. The profile and the engine runs are timed minutes apart, so the engine runs on a
drift-compensated clock (``jaxserve.calibration.speed``): speed probes between its steps divide each step's time
by the machine's speed relative to the profile. Run it on an otherwise idle machine all the same.

Cost on the 2-core CI machine: ``--quick`` (the small grid, 3 repeats, 8 requests per run; a smoke
run whose errors mean nothing) about 70 s; a full run profiles the default grid 12 times over and
serves 100 requests per run, tens of minutes (with the default grid and 3 repeats alone, 30
requests per run took about 18 minutes). The profile is kept and resumed, so a rerun skips it.
"""

from __future__ import annotations

import argparse
import os
import time

import _common as C
import matplotlib.pyplot as plt
import numpy as np

from jaxserve.calibration.fit import fit
from jaxserve.calibration.profile_format import load_profile
from jaxserve.calibration.profiler import profile_model
from jaxserve.calibration.speed import DriftCompensatedRunner, SpeedProbe
from jaxserve.config import build_scheduler, build_workload
from jaxserve.engine.engine import Engine
from jaxserve.engine.model_runner import step_limits
from jaxserve.engine.serve_config import build_runner, engine_settings, with_token_ids
from jaxserve.metrics import request_metrics
from jaxserve.model.config import ModelConfig
from jaxserve.model.export import save_hf_checkpoint
from jaxserve.model.llama import params_of, random_model
from jaxserve.runtime import RunLimits
from jaxserve.sim import get_hardware
from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.profiled_cost_model import model_spec
from jaxserve.sim.simulate import build_cost_model, build_kv, build_sim, run_sim
from jaxserve.workload import build_requests, read_trace, resolve_trace_path

NAME = "sim_vs_engine"
MODEL = ModelConfig(
    vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=4, num_heads=6, num_kv_heads=2,
    head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5,
)  # fmt: skip
BLOCK_SIZE, NUM_BLOCKS = 16, 4096  # 64k tokens of KV
PROFILE_REPEATS = 12  # samples per profile point: the medians the fit and the speed probe divide by
PROBE_PAGES = 512  # the speed probe's reserve of pages beyond the scheduler's pool
PROBE_EVERY = 32  # engine steps between speed probes
PROBE_POINTS = 4  # profile shapes a speed probe times
PROBE_WINDOW = 3  # the clock divides by the median of this many latest probes
MAX_TOTAL = 1536  # prompt + output tokens per request (the model's context is 2048)
SCHEDULERS = {  # label -> (configs/<name>.py, overrides)
    "sarathi": ("sarathi", {"scheduler.chunk_size": 256, "scheduler.max_num_seqs": 64}),
    "vllm": ("vllm", {"scheduler.max_num_batched_tokens": 2048, "scheduler.max_num_seqs": 64}),
}
AZURE = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
TARGET_STEP_MAPE, TARGET_LATENCY_ERROR = 0.10, 0.15
LATENCIES = ("ttft_s", "tbt_s", "e2e_s")
PERCENTILES = (50, 90, 99)


# -- configs ----------------------------------------------------------------------------------------


def poisson_workload(out, n: int, qps: float, seed: int) -> dict:
    """Workload overrides: Poisson arrivals, ShareGPT lengths that fit ``MAX_TOTAL``."""
    lengths = C.lengths_file(C.load_lengths(C.SHAREGPT, max_total=MAX_TOTAL), out)
    return C.poisson_workload(qps, n, seed=seed, lengths_path=lengths, client_id="sharegpt")


def azure_workload(out, n: int, qps: float, seed: int) -> dict:
    """Workload overrides: the first ``n`` conversation requests that fit ``MAX_TOTAL``, their
    arrival gaps rescaled so the mean rate is ``qps`` (the trace's burstiness kept). The fitting
    rows are written to ``out`` as a trace file (a config cannot filter by length)."""
    trace = read_trace(resolve_trace_path(AZURE))
    rows = [r for r in build_requests(trace, max_requests=20 * n) if r.max_total_tokens <= MAX_TOTAL]
    # repr: write_csv would round floats to 6 digits, and the arrival times must survive exactly.
    path = C.write_csv(out / "azure_fitting.csv", ({"arrived_at": repr(r.arrival_time), "num_prefill_tokens": r.prompt_len,
                                                    "num_decode_tokens": r.sampling.max_new_tokens} for r in rows))
    return {"workload.kind": "trace", "workload.trace_path": str(path), "workload.trace_format": "vidur",
            "workload.qps": qps, "workload.max_requests": n, "workload.seed": seed, "workload.client_id": "azure",
            "workload.duration_s": None, "workload.lengths.kind": "trace"}


def run_config(sname: str, workload: dict, shared: dict, *, jitter: bool = False):
    """One run's config: ``sname``'s policy config, the shared model / KV / profile keys, the
    workload, and ``sim.profile_jitter``."""
    policy, options = SCHEDULERS[sname]
    return C.config_for(policy, {**shared, **options, **workload, "sim.profile_jitter": jitter})


# -- runs -------------------------------------------------------------------------------------------


def step_kind(plan) -> str:
    decodes = int((plan.num_new_tokens == 1).sum())
    return "decode" if decodes == plan.num_seqs else ("prefill" if decodes == 0 else "mixed")


def serve_on_engine(runner, probe, config, requests, profiled, roofline):
    """The engine's run of ``config``'s scheduler on the drift-compensated clock, and one row per
    step: measured seconds (raw and divided by the machine speed at the time), predicted seconds."""
    steps = []
    kv = build_kv(config, profiled)  # the scheduler's pool: the config's kv.*
    sched = build_scheduler(config)
    executor = DriftCompensatedRunner(runner, probe, kv, every=PROBE_EVERY, window=PROBE_WINDOW)

    def record(plan, out):
        steps.append({"kind": step_kind(plan), "num_seqs": plan.num_seqs, "num_tokens": plan.num_tokens,
                      "context_tokens": int(plan.num_computed_tokens.sum()), "measured_s": out.duration_s,
                      "raw_s": executor.raw_s[-1], "speed": executor.speeds[-1],
                      "profiled_s": profiled.step(plan).duration_s, "roofline_s": roofline.step(plan).duration_s})

    run = Engine(executor, sched, executor.kv).serve(
        requests, limits=RunLimits(max_context=runner.max_model_len), on_step=record)
    return run.log.freeze(), steps, executor.probes


def simulate(config, requests):
    """The simulator's run of ``config`` on the engine's requests (same ids, lengths and arrivals)."""
    return run_sim(build_sim(config, requests=requests)).log


# -- errors -----------------------------------------------------------------------------------------


def ape(predicted, measured) -> np.ndarray:
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    return np.abs(predicted - measured) / measured


def step_errors(steps: list[dict], measured_key: str = "measured_s") -> dict:
    """MAPE (fractions) of the profiled predictions and the roofline's against ``measured_key``
    (drift-compensated or raw seconds), overall and per step kind, and the busy-time error."""
    measured = np.array([s[measured_key] for s in steps])
    profiled = np.array([s["profiled_s"] for s in steps])
    kinds = np.array([s["kind"] for s in steps])
    out = {"steps": len(steps), "mape": float(ape(profiled, measured).mean()),
           "p90_ape": float(np.percentile(ape(profiled, measured), 90)),
           "total_time_error": float(profiled.sum() / measured.sum() - 1),
           "roofline_mape": float(ape([s["roofline_s"] for s in steps], measured).mean())}
    for kind in ("decode", "prefill", "mixed"):
        sel = kinds == kind
        out[f"{kind}_steps"] = int(sel.sum())
        out[f"{kind}_mape"] = float(ape(profiled[sel], measured[sel]).mean()) if sel.any() else float("nan")
    return out


def noise_floor(profile) -> float:
    """Mean |sample − median| / median over the profile's repeats: the error a perfect model of the
    medians would still show against single measured steps on this machine."""
    return float(np.mean([np.mean(np.abs(np.array(p.times_s) - p.median_s)) / p.median_s for p in profile.points]))


def latency_rows(em, sm) -> list[dict]:
    """One row per latency metric and percentile: the engine's value, the simulator's, the error
    (from the two runs' ``request_metrics``)."""
    rows = []
    for metric in LATENCIES:
        e, s = (getattr(m, metric) for m in (em, sm))
        e, s = e[np.isfinite(e)], s[np.isfinite(s)]
        for q in PERCENTILES:
            ev, sv = float(np.percentile(e, q)), float(np.percentile(s, q))
            rows.append({"metric": metric, "percentile": q, "engine_s": ev, "sim_s": sv, "error": sv / ev - 1})
    return rows


def request_rows(em, sm) -> list[dict]:
    """One row per request: its TTFT, queueing delay and E2E (seconds) on the engine and in the
    simulator (from the two runs' ``request_metrics``)."""
    sim_index = {rid: i for i, rid in enumerate(sm.request_id)}
    rows = []
    for i, rid in enumerate(em.request_id):
        j = sim_index[rid]
        row = {"request_id": rid, "arrival_s": float(em.arrival_s[i]), "prompt_len": int(em.prompt_len[i]),
               "num_output": int(em.num_output[i])}  # fmt: skip
        for side, m, k in (("engine", em, i), ("sim", sm, j)):
            row |= {f"{side}_ttft_s": float(m.ttft_s[k]), f"{side}_queueing_s": float(m.queueing_s[k]),
                    f"{side}_e2e_s": float(m.e2e_s[k]), f"{side}_preemptions": int(m.preemptions[k])}  # fmt: skip
        rows.append(row)
    return rows


# -- plots ------------------------------------------------------------------------------------------

KIND_COLORS = {"decode": "tab:blue", "prefill": "tab:orange", "mixed": "tab:green"}


def plot_steps(out, runs):
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.2), squeeze=False)
    for ax, (label, run) in zip(axes[0], runs.items()):
        steps = run["steps"]
        for kind, color in KIND_COLORS.items():
            sel = [s for s in steps if s["kind"] == kind]
            if sel:
                ax.scatter([1e3 * s["measured_s"] for s in sel], [1e3 * s["profiled_s"] for s in sel], s=5,
                           alpha=0.4, color=color, label=f"{kind} ({len(sel)})")
        lo = 1e3 * min(min(s["measured_s"], s["profiled_s"]) for s in steps)
        hi = 1e3 * max(max(s["measured_s"], s["profiled_s"]) for s in steps)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="engine step (ms, measured / machine speed)",
               ylabel="simulator step (ms, profiled)", title=f"{label}: MAPE {100 * run['errors']['mape']:.1f}%")
        ax.legend(fontsize=7, markerscale=2)
    fig.suptitle("Per-step time: profiled cost model vs the measured engine (drift-compensated), same plans", y=1.02)
    return C.save_figure(fig, out / "step_times.png")


def plot_speed(out, runs):
    """The machine's speed (probe time / profiled time) over each engine run."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for label, run in runs.items():
        ax.plot(PROBE_EVERY * np.arange(len(run["probes"])), run["probes"], lw=1, label=label)
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set(xlabel="engine step", ylabel="step time now / profiled", title="Machine speed during the engine runs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return C.save_figure(fig, out / "machine_speed.png")


def plot_latency_cdfs(out, runs):
    fig, axes = plt.subplots(len(runs), len(LATENCIES), figsize=(4 * len(LATENCIES), 2.6 * len(runs)), squeeze=False)
    for row, (label, run) in zip(axes, runs.items()):
        em, sm = run["engine_metrics"], run["sim_metrics"]
        for ax, metric in zip(row, LATENCIES):
            for m, style, name in ((em, "-", "engine"), (sm, "--", "simulator")):
                v = np.sort(getattr(m, metric)[np.isfinite(getattr(m, metric))])
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), style, label=name)
            ax.set(xscale="log", xlabel=f"{metric} (s)", ylabel="CDF", title=f"{label}: {metric}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return C.save_figure(fig, out / "latency_cdfs.png")


# -- main -------------------------------------------------------------------------------------------


def prepare_model(args, out) -> str:
    if args.model:
        return args.model
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        save_hf_checkpoint(str(model_dir), MODEL, params_of(random_model(MODEL, seed=args.seed)))
    return str(model_dir)


def _worst_latency_error(rows) -> float:
    return max(abs(r["error"]) for r in rows if r["percentile"] in (50, 99))


QUICK_NOTE = ("**A `--quick` smoke run**: the small profile grid, 3 repeats and 8 requests per workload "
              "check that every part runs; its errors say nothing about the simulator (run without --quick).")


def summary_text(profile, report, jitter, runs, wall_s, quick=False) -> str:
    pct = lambda x: f"{100 * x:+.1f}%"  # noqa: E731
    lines = [
        "# Simulator vs engine (profiled cost model)", "",
        f"`{C.command_line()}` — {wall_s:.0f} s wall.", "",
        *([QUICK_NOTE, ""] if quick else []),
        f"Model: `{profile.model_name}` ({profile.model_config().num_params / 1e6:.1f}M parameters, {profile.dtype}) on "
        f"{profile.device['backend']} ({profile.device['kind']}); profile of {len(profile.points)} step shapes, "
        f"held-out fit MAPE {100 * report.holdout_mape:.1f}% (train {100 * report.train_mape:.1f}%). Machine noise: "
        f"a profiled step's samples differ from their median by {100 * noise_floor(profile):.1f}% on average, a floor "
        "under any per-step MAPE.",
        f"Schedulers: {', '.join(f'{k} {v[1]}' for k, v in SCHEDULERS.items())}; KV {NUM_BLOCKS} blocks x {BLOCK_SIZE}.",
        "",
        "**Machine speed.** This VM's speed drifts by tens of percent within minutes, more than the cost "
        f"model's error, and the simulator cannot know it. So every {PROBE_EVERY} engine steps a speed probe "
        f"times {PROBE_POINTS} profile shapes again (on {PROBE_PAGES} KV pages reserved beyond the scheduler's "
        "pool, outside the engine's clock); *speed* is their median time now / in the profile (1.00: as fast "
        "as when profiled; `machine_speed.png`). The engine's measured-time clock advances by each step's "
        f"time divided by the speed (median of the last {PROBE_WINDOW} probes), so the engine runs in the profile's "
        "seconds, as the simulator does. *Raw* compares the undivided step times.",
        "", "## Step time (every step the engine ran, costed by the simulator's models)", "",
        "| run | steps | speed min / median / max | MAPE | P90 APE | decode / prefill / mixed MAPE | busy-time error"
        " | MAPE raw | roofline MAPE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for label, run in runs.items():
        e, raw = run["errors"], run["raw_errors"]
        kinds = " / ".join("n/a" if np.isnan(e[f"{k}_mape"]) else f"{100 * e[f'{k}_mape']:.1f}%"
                           for k in ("decode", "prefill", "mixed"))  # fmt: skip
        ok = "ok" if e["mape"] <= TARGET_STEP_MAPE else "missed"
        probes = np.asarray(run["probes"])
        lines.append(f"| {label} | {e['steps']} | {probes.min():.2f} / {np.median(probes):.2f} / {probes.max():.2f} | {100 * e['mape']:.1f}% "
                     f"({ok}) | {100 * e['p90_ape']:.1f}% | {kinds} | {pct(e['total_time_error'])} | "
                     f"{100 * raw['mape']:.1f}% | {100 * e['roofline_mape']:.0f}% |")  # fmt: skip
    lines += ["", "## Latency percentiles (simulation vs the drift-compensated engine run of the same requests)", "",
              "The simulator scales each step by a jitter factor drawn from the profile's repeats "
              "(`sim.profile_jitter=True`, mean factor "
              f"{jitter.mean:.3f}): a real machine's steps scatter around "
              "the fitted median, and tail latencies follow the scatter. Without jitter: the next table.", "",
              "| run | metric | P50 engine / sim (err) | P90 engine / sim (err) | P99 engine / sim (err) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for label, run in runs.items():
        by = {(r["metric"], r["percentile"]): r for r in run["latency"]}
        for metric in LATENCIES:
            cells = [f"{by[(metric, q)]['engine_s']:.3g} / {by[(metric, q)]['sim_s']:.3g} s ({pct(by[(metric, q)]['error'])})"
                     for q in PERCENTILES]  # fmt: skip
            lines.append(f"| {label} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "Without jitter (every step at the fitted median), the simulator's latency errors:", "",
              "| run | " + " | ".join(f"{m} P{q}" for m in LATENCIES for q in (50, 99)) + " |",
              "|---|" + "---|" * (2 * len(LATENCIES))]  # fmt: skip
    for label, run in runs.items():
        by = {(r["metric"], r["percentile"]): r["error"] for r in run["median_latency"]}
        lines.append(f"| {label} | " + " | ".join(pct(by[(m, q)]) for m in LATENCIES for q in (50, 99)) + " |")
    mape = max(run["errors"]["mape"] for run in runs.values())
    mape_raw = max(run["raw_errors"]["mape"] for run in runs.values())
    worst = max(_worst_latency_error(run["latency"]) for run in runs.values())
    within = sum(abs(r["error"]) <= TARGET_LATENCY_ERROR for run in runs.values() for r in run["latency"]
                 if r["percentile"] in (50, 99))  # fmt: skip
    total = sum(r["percentile"] in (50, 99) for run in runs.values() for r in run["latency"])
    lines += ["", f"Worst step-time MAPE {100 * mape:.1f}% ({100 * mape_raw:.1f}% raw; target <= "
              f"{100 * TARGET_STEP_MAPE:.0f}%; the profile's noise floor {100 * noise_floor(profile):.1f}%); "
              f"{within} of {total} P50/P99 latencies within {100 * TARGET_LATENCY_ERROR:.0f}%, worst error "
              f"{100 * worst:.1f}%.", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: the small profile grid, 3 repeats, 8 requests per workload (~70 s on 2 cores)")
    parser.add_argument("--model", default="", help="a local HF model directory (default: a random one is written)")
    parser.add_argument("--fresh-profile", action="store_true", help="measure the profile again")
    parser.add_argument("--grid", default="", help="the profile grid (jaxserve.profile --grid; default 'default', --quick 'small')")
    parser.add_argument("--num-requests", type=int, default=0, help="per workload (default 100, --quick 8)")
    parser.add_argument("--poisson-qps", type=float, default=0.8, help="about 70%% of the engine's capacity")
    parser.add_argument("--azure-qps", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = C.output_dir(NAME, args.out)
    n = args.num_requests or (8 if args.quick else 100)
    grid = args.grid or ("small" if args.quick else "default")

    model_dir = prepare_model(args, out)
    profile_path = out / "profile.json"
    if args.fresh_profile and profile_path.exists():
        os.remove(profile_path)
    C.console.print(f"[bold]profiling[/] {model_dir} -> {profile_path}")
    profile_model(model_dir, str(profile_path), grid=grid, repeats=3 if args.quick else PROFILE_REPEATS,
                  block_size=BLOCK_SIZE, kv_cache_gb=1.0)
    profile = load_profile(str(profile_path))
    _, report = fit(profile.points, profile.engine, holdout_fraction=0.2, seed=args.seed)
    C.console.print(report.summary())
    # What every run shares: the model (engine) and its profile (simulator), the KV pool, the seed.
    shared = {"model.path": model_dir, "sim.cost_model": "profiled",
              "sim.profile": str(profile_path), "kv.block_size": BLOCK_SIZE, "kv.num_blocks": NUM_BLOCKS,
              "seed": args.seed}  # fmt: skip
    workloads = {"poisson": poisson_workload(out, n, args.poisson_qps, args.seed),
                 "azure": azure_workload(out, n, args.azure_qps, args.seed)}  # fmt: skip
    first = run_config(next(iter(SCHEDULERS)), workloads["poisson"], shared)
    profiled = build_cost_model(first)
    jittered = build_cost_model(run_config(next(iter(SCHEDULERS)), workloads["poisson"], shared, jitter=True))
    roofline = RooflineCostModel(model_spec(profile), get_hardware("cpu"), dtype="fp32")  # contrast, uncalibrated

    # The engine's pool has PROBE_PAGES more pages than the scheduler's, reserved for the speed probe.
    engine_config = C.override(first, {"kv.num_blocks": NUM_BLOCKS + PROBE_PAGES})
    runner, _ = build_runner(engine_settings(engine_config), step_limits(build_scheduler(first))[0])
    cfg = runner.cfg
    shared["model.max_context"] = runner.max_model_len  # the simulator rejects what the engine would
    if runner.geometry != profile.engine:
        raise SystemExit(f"the engine's step geometry {runner.geometry} differs from the profile's {profile.engine}")
    probe = SpeedProbe(runner, profile, first_page=NUM_BLOCKS, num_points=PROBE_POINTS, seed=args.seed)
    runs, step_rows, latency, probe_rows, per_request = {}, [], [], [], []
    with C.progress_bar() as bar:
        task = bar.add_task("serve", total=len(workloads) * len(SCHEDULERS), last="")
        for wname, workload in workloads.items():
            # As backend="engine" does: the config's workload, random prompt ids drawn with workload.seed.
            reqs = with_token_ids(build_workload(run_config(next(iter(SCHEDULERS)), workload, shared)), cfg.vocab_size,
                                  args.seed)  # fmt: skip
            for sname in SCHEDULERS:
                label = f"{wname}/{sname}"
                bar.update(task, last=label)
                config = run_config(sname, workload, shared)
                engine_log, steps, probes = serve_on_engine(runner, probe, config, reqs, profiled, roofline)
                em, sm, mm = (request_metrics(log) for log in (
                    engine_log, simulate(run_config(sname, workload, shared, jitter=True), reqs),
                    simulate(config, reqs)))  # fmt: skip
                run = {"engine_metrics": em, "sim_metrics": sm, "steps": steps, "probes": probes,
                       "errors": step_errors(steps), "raw_errors": step_errors(steps, "raw_s"),
                       "latency": latency_rows(em, sm), "median_latency": latency_rows(em, mm)}  # fmt: skip
                runs[label] = run
                step_rows += [{"run": label, "step": i, **s} for i, s in enumerate(steps)]
                latency += [{"run": label, "sim": "jitter", **r} for r in run["latency"]]
                latency += [{"run": label, "sim": "median", **r} for r in run["median_latency"]]
                per_request += [{"run": label, **r} for r in request_rows(em, sm)]
                probe_rows += [{"run": label, "after_step": PROBE_EVERY * i, "speed": v} for i, v in enumerate(probes)]
                bar.update(task, advance=1)

    C.write_csv(out / "steps.csv", step_rows)
    C.write_csv(out / "latency.csv", latency)
    C.write_csv(out / "probes.csv", probe_rows)
    C.write_csv(out / "requests.csv", per_request)
    plot_steps(out, runs)
    plot_latency_cdfs(out, runs)
    plot_speed(out, runs)
    path = C.write_summary(out, summary_text(profile, report, jittered.jitter, runs, time.perf_counter() - t0, args.quick))
    C.print_summary(path, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
