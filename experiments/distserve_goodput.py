"""DistServe (OSDI'24) on simulated A100s: placement search, goodput per GPU and SLO attainment,
disaggregated prefill/decode against colocated vLLM (issue 17, item 6).

    python experiments/distserve_goodput.py [--quick] [--gpus 4] [--num-requests 400] [--time-budget-s 300]

OPT-13B, the chatbot application of DistServe's Table 1 (ShareGPT lengths, TTFT 0.25 s, TPOT 0.1 s),
Poisson arrivals. Every run goes through the CLI's config path (``configs/distserve.py`` + checked
overrides -> ``build_cluster_sim``), so each point is a ``python -m jaxserve.experiment`` command.

1. **Placement search** (``jaxserve.cluster.placement``): every placement of at most ``--gpus`` GPUs
   (prefill and decode TP, PP and instance counts that fit) screened at once by the analytic phase
   model, the most promising confirmed by simulation with goodput bisection within a wall-time budget.
2. **Colocated baseline**: vLLM replicas on the same GPUs (TP 1 and TP 2, as many as fit), their
   goodput by the same bisection; the best per GPU is the baseline.
3. **SLO attainment vs rate per GPU** for the chosen placement and the baseline (DistServe Fig. 8's
   top row), and **vs SLO scale** at the baseline's goodput (its bottom row: both SLOs multiplied by
   a factor; the tightest factor still meeting 90 % attainment).

Writes ``outputs/experiments/distserve_goodput/``: screen.csv, confirmed.csv, rate.csv,
slo_scale.csv, goodput.png, summary.md. ``--quick``: a 2-GPU budget, 80 requests per run, a short
search (well under a minute).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import time

import _common as C
import numpy as np

from jaxserve.cluster.config import build_cluster_sim, run_cluster_sim
from jaxserve.cluster.phase_model import PhaseWorkload
from jaxserve.cluster.placement import Placement, cost_models_from_config, screen_placements, search_placement
from jaxserve.metrics import request_metrics, search_max_rate, slo_met
from jaxserve.workload import resolve_trace_path

NAME = "distserve_goodput"
POLICY = "distserve"  # configs/distserve.py
TTFT_S, TPOT_S, ATTAINMENT = 0.25, 0.1, 0.9  # DistServe Table 1, chatbot (OPT-13B); 90 % attainment
CONTEXT = 2048  # OPT-13B's
SCALES = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0)
TPOTS = (0.1, 0.075, 0.06, 0.05, 0.04, 0.035, 0.03, 0.025, 0.02)  # TPOT targets of panel 3 (TTFT kept at 0.25 s)
COLOCATED_TPS = (1, 2)
CTX: dict = {}  # set in main() before workers are forked


# -- deployments as config overrides ------------------------------------------------------------------
def disaggregated(p: Placement) -> dict:
    return {"cluster.num_replicas": p.prefill.count + p.decode.count, "cluster.pools.prefill": p.prefill.count,
            "cluster.pools.decode": p.decode.count,
            "cluster.pools.prefill_overrides": f"hardware.tp={p.prefill.tp},hardware.pp={p.prefill.pp}",
            "cluster.pools.decode_overrides": f"hardware.tp={p.decode.tp},hardware.pp={p.decode.pp}"}  # fmt: skip


def colocated(tp: int, count: int) -> dict:
    return {"cluster.num_replicas": count, "cluster.pools.prefill": 0, "cluster.pools.decode": 0,
            "cluster.pools.prefill_overrides": "", "hardware.tp": tp}  # fmt: skip


def describe(p: Placement) -> str:
    def pool(c):
        return f"{c.count} x TP{c.tp}" + (f"·PP{c.pp}" if c.pp > 1 else "")

    return f"prefill {pool(p.prefill)} + decode {pool(p.decode)}"


def config_at(deploy: dict, rate: float):
    args = CTX["args"]
    workload = C.poisson_workload(rate, args.num_requests, seed=args.seed)
    return C.config_for(POLICY, {**deploy, **workload, **CTX["lengths"]})


def attainment(rm, scale: float = 1.0, tpot_s: float = TPOT_S) -> float:
    """Of admitted requests, the fraction finished within both SLOs (TTFT_S, ``tpot_s``) times ``scale``."""
    admitted = ~rm.rejected
    return float(slo_met(rm, TTFT_S * scale, tpot_s * scale)[admitted].mean()) if admitted.any() else 0.0


def simulate(deploy: dict, rate: float):
    """Per-request metrics and metrics.json of one run of ``deploy`` at ``rate`` req/s (total)."""
    results = run_cluster_sim(build_cluster_sim(config_at(deploy, rate)))
    return request_metrics(results.log), results.metrics


# -- parallel work items (module level: forked workers run them) -----------------------------------------
def colocated_goodput(tp: int) -> dict:
    """The best colocated goodput with ``tp``: as many replicas as the budget holds, bisected."""
    args = CTX["args"]
    count = args.gpus // tp
    deploy = colocated(tp, count)
    search = search_max_rate(lambda r: attainment(simulate(deploy, r)[0]) >= ATTAINMENT,
                             0.1 * args.gpus, 6.0 * args.gpus, rel_tol=0.04)  # fmt: skip
    return {"tp": tp, "count": count, "gpus": tp * count, "goodput": search.rate,
            "goodput_per_gpu": search.rate / (tp * count), "simulations": len(search.tried), "deploy": deploy}  # fmt: skip


def screen_all(workload):
    """The analytic screen of every placement of the budget (run in a child process: it initializes
    jax, which the parent must not have running when it forks its simulation workers)."""
    args = CTX["args"]
    return screen_placements(cost_models_from_config(config_at({}, 1.0)), args.gpus, workload, TTFT_S, TPOT_S, max_pp=1)


def curve_point(item) -> dict:
    """One run: attainment at the SLOs (and at every scale), the latency tails, the transfers."""
    label, deploy, gpus, rate = item
    rm, m = simulate(deploy, rate)
    row = {"deployment": label, "gpus": gpus, "rate": rate, "rate_per_gpu": rate / gpus,
           "attainment": attainment(rm), "ttft_p90_s": m["ttft_s"]["p90"], "tpot_p90_s": m["tpot_s"]["p90"],
           "kv_transfer_p50_s": (m.get("kv_transfer_s") or {}).get("p50", "")}  # fmt: skip
    row.update({f"scale_{s:g}": attainment(rm, s) for s in SCALES})
    row.update({f"tpot_{t:g}": attainment(rm, tpot_s=t) for t in TPOTS})
    return row


def goodput_by_tpot(rate_rows, label: str) -> dict[float, float]:
    """Per TPOT target: the highest rate per GPU of the sweep at which >= 90 % met TTFT_S and it
    (the sweep's resolution; 0 when none did)."""
    rows = [r for r in rate_rows if r["deployment"] == label]
    return {t: max((r["rate_per_gpu"] for r in rows if r[f"tpot_{t:g}"] >= ATTAINMENT), default=0.0) for t in TPOTS}


# -- output ----------------------------------------------------------------------------------------------
def tightest_scale(row: dict) -> float:
    """The smallest SLO scale whose attainment is still >= 90 % (inf if none is)."""
    ok = [s for s in SCALES if row[f"scale_{s:g}"] >= ATTAINMENT]
    return min(ok) if ok else float("inf")


def plot(rate_rows, scale_rows, labels, path):
    fig, (ax1, ax2, ax3) = C.plt.subplots(1, 3, figsize=(16, 4))
    for label, color in zip(labels, ("tab:red", "tab:blue")):
        by_tpot = goodput_by_tpot(rate_rows, label)
        ax3.plot(TPOTS, [by_tpot[t] for t in TPOTS], "o-", color=color, label=label)
        rows = sorted((r for r in rate_rows if r["deployment"] == label), key=lambda r: r["rate_per_gpu"])
        ax1.plot([r["rate_per_gpu"] for r in rows], [100 * r["attainment"] for r in rows], "o-", color=color, label=label)
        (row,) = [r for r in scale_rows if r["deployment"] == label]
        ax2.plot(SCALES, [100 * row[f"scale_{s:g}"] for s in SCALES], "o-", color=color, label=label)
    for ax, xlabel in ((ax1, "rate per GPU (req/s)"), (ax2, "SLO scale (x TTFT 0.25 s, TPOT 0.1 s)")):
        ax.axhline(100 * ATTAINMENT, color="gray", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    ax2.invert_xaxis()  # tighter SLOs to the right, as DistServe draws it
    ax3.invert_xaxis()
    ax3.set_xlabel(f"TPOT SLO (s; TTFT {TTFT_S} s)")
    ax3.set_ylabel("goodput per GPU (req/s, sweep resolution)")
    ax3.set_title("goodput vs TPOT target")
    ax3.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title("attainment vs rate")
    ax2.set_title(f"attainment vs SLO scale at {scale_rows[0]['rate_per_gpu']:.2f} req/s/GPU")
    C.save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 GPUs, 80 requests, a short search")
    parser.add_argument("--gpus", type=int, default=4, help="GPU budget of both deployments")
    parser.add_argument("--num-requests", type=int, default=400, help="requests per simulated run")
    parser.add_argument("--time-budget-s", type=float, default=300.0, help="wall budget of the placement search's simulations")
    parser.add_argument("--top-k", type=int, default=4, help="placements the search confirms by simulation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=C.default_jobs())
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.gpus, args.num_requests, args.time_budget_s, args.top_k = 2, 80, 20.0, 2
    t0 = time.perf_counter()
    out = C.output_dir(NAME, args.out)
    if resolve_trace_path(C.SHAREGPT).exists():
        lengths = C.load_lengths(C.SHAREGPT, CONTEXT)
        CTX["lengths"] = {"workload.lengths.kind": "trace", "workload.lengths.path": C.lengths_file(lengths, out)}
        lengths_text, prompts, outputs = lengths.describe(), lengths.dist.prompt_lens, lengths.dist.output_lens
    else:  # a fresh clone without ../shared/traces: the shipped Azure sample's lengths (configs/distserve.py)
        C.console.print(f"[yellow]{C.SHAREGPT} not found (../shared/traces or $JAXSERVE_TRACES): the config's lengths")
        CTX["lengths"] = {}
        base = C.config_for(POLICY)
        trace = C.load_lengths(base.workload.lengths.path, CONTEXT)
        lengths_text, prompts, outputs = trace.describe(), trace.dist.prompt_lens, trace.dist.output_lens
    CTX["args"] = args

    # 1. placement search: the analytic screen, then simulation of the promising placements
    workload = PhaseWorkload.from_lengths(prompts, outputs)
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as child:
        screen = child.submit(screen_all, workload).result()
    C.console.print(f"screened {len(screen.candidates)} placements in {screen.tables_s + screen.model_s:.2f} s")
    result = search_placement(screen, lambda p, r: attainment(simulate(disaggregated(p), r)[0]),
                              time_budget_s=args.time_budget_s, top_k=args.top_k, attainment=ATTAINMENT)  # fmt: skip
    chosen = result.chosen
    C.console.print(f"chosen: {describe(chosen)}: {result.goodput_per_gpu:.2f} req/s/GPU "
                    f"({result.num_simulations} simulations, {result.wall_s:.0f} s)")

    # 2. the colocated baseline
    colo = C.parallel_map(colocated_goodput, [tp for tp in COLOCATED_TPS if tp <= args.gpus], jobs=args.jobs,
                          description="colocated goodput", label=lambda tp: f"TP{tp}")  # fmt: skip
    best = max(colo, key=lambda c: c["goodput_per_gpu"])

    # 3. attainment vs rate per GPU and vs SLO scale
    dis_label = f"DistServe: {describe(chosen)}"
    colo_label = f"vLLM colocated: {best['count']} x TP{best['tp']}"
    deployments = ((dis_label, disaggregated(chosen), chosen.num_gpus), (colo_label, best["deploy"], best["gpus"]))
    top = max(result.goodput_per_gpu, best["goodput_per_gpu"])
    per_gpu = np.linspace(0.1, 1.6, 4 if args.quick else 16) * top
    items = [(label, deploy, g, float(x * g)) for label, deploy, g in deployments for x in per_gpu]
    scale_rate = best["goodput_per_gpu"]  # per GPU: the baseline's goodput
    scale_items = [(label, deploy, g, scale_rate * g) for label, deploy, g in deployments]
    rows = C.parallel_map(curve_point, items + scale_items, jobs=args.jobs, description="attainment curves",
                          label=lambda it: f"{it[0][:20]} {it[3]:.1f}/s")  # fmt: skip
    rate_rows, scale_rows = rows[: len(items)], rows[len(items):]

    C.write_csv(out / "screen.csv", ({"placement": describe(p), "gpus": p.num_gpus, "estimated_goodput": float(g),
                                      "estimated_per_gpu": float(g) / p.num_gpus}
                                     for p, g in zip(screen.candidates, screen.goodput)))  # fmt: skip
    C.write_csv(out / "confirmed.csv", ({"placement": describe(c.placement), "gpus": c.placement.num_gpus,
                                         "estimate": c.estimate, "goodput": c.goodput,
                                         "goodput_per_gpu": c.goodput_per_gpu, "complete": c.complete,
                                         "simulations": len(c.tried)} for c in result.confirmed))  # fmt: skip
    C.write_csv(out / "rate.csv", rate_rows)
    C.write_csv(out / "slo_scale.csv", scale_rows)
    plot(rate_rows, scale_rows, (dis_label, colo_label), out / "goodput.png")

    ratio = result.goodput_per_gpu / best["goodput_per_gpu"] if best["goodput_per_gpu"] else float("inf")
    tight = {r["deployment"]: tightest_scale(r) for r in scale_rows}
    slo_ratio = tight[colo_label] / tight[dis_label]
    dis_scale = next(r for r in scale_rows if r["deployment"] == dis_label)
    tpot_dis, tpot_colo = goodput_by_tpot(rate_rows, dis_label), goodput_by_tpot(rate_rows, colo_label)
    wins = [t for t in TPOTS if tpot_dis[t] > tpot_colo[t]]
    crossover = (f"disaggregation has the higher goodput per GPU at TPOT targets <= {max(wins):g} s" if wins else
                 f"colocation has the higher (or equal) goodput per GPU at every TPOT target down to {min(TPOTS):g} s")
    tpot_lines = "\n".join(f"| {t:g} | {tpot_dis[t]:.2f} | {tpot_colo[t]:.2f} |" for t in TPOTS)
    wall = time.perf_counter() - t0
    colo_lines = "\n".join(f"| colocated {c['count']} x TP{c['tp']} | {c['gpus']} | {c['goodput']:.2f} | "
                           f"{c['goodput_per_gpu']:.2f} | {c['simulations']} |" for c in colo)  # fmt: skip
    text = f"""# DistServe: disaggregated prefill and decode vs colocated vLLM (simulated)

Command: `{C.command_line()}` ({wall:.0f} s wall on {args.jobs} process(es)).

* Model and hardware: OPT-13B (fp16) on A100-80GB; KV handed over NVLink 3 (`cluster.pools.link=nvlink3`), sent
  after the prefill; JSQ routing to the prefill pool, least-KV choice of decode replica.
* Workload: Poisson, {args.num_requests} requests per run (seed {args.seed}); lengths: {lengths_text}.
* SLOs (DistServe Table 1, chatbot): TTFT {TTFT_S} s, TPOT {TPOT_S} s; goodput = the highest rate with >= 90 % of
  requests meeting both (bisection, 4-5 % tolerance).

## Placement search ({args.gpus}-GPU budget)

{len(screen.candidates)} placements screened by the analytic model in {screen.tables_s + screen.model_s:.2f} s (step
tables {screen.tables_s:.2f} s, one vmapped model call {screen.model_s:.3f} s); {result.num_simulated} confirmed by
simulation ({result.num_simulations} runs, {result.wall_s:.0f} s wall{", budget spent" if result.budget_spent else ""}).
Chosen: **{describe(chosen)}**, {result.goodput:.2f} req/s = **{result.goodput_per_gpu:.2f} req/s per GPU**.

| deployment | GPUs | goodput (req/s) | per GPU | simulations |
|---|---|---|---|---|
| DistServe {describe(chosen)} | {chosen.num_gpus} | {result.goodput:.2f} | {result.goodput_per_gpu:.2f} | {result.num_simulations} |
{colo_lines}

## Headline

| | paper (DistServe §6.2, all workloads) | ours (OPT-13B chatbot) |
|---|---|---|
| goodput per GPU, disaggregated / colocated vLLM | up to 7.4x | {ratio:.2f}x |
| tightest SLO scale with 90 % attainment, vLLM / DistServe | up to 12.6x | {slo_ratio:.2f}x ({tight[colo_label]:g} vs {tight[dis_label]:g} at {scale_rate:.2f} req/s/GPU) |
| KV transfer share of latency | small with NVLink-class bandwidth | p50 {float(dis_scale['kv_transfer_p50_s'] or 0) * 1e3:.1f} ms per request |

Goodput per GPU (req/s, at the sweep's resolution) against the TPOT target, TTFT kept at {TTFT_S} s —
{crossover}:

| TPOT SLO (s) | disaggregated | colocated |
|---|---|---|
{tpot_lines}

Why ours differs: DistServe's gain comes from removing prefill-decode interference, which costs goodput only where
the TPOT target is tight compared with a prefill's duration. In this roofline model of vLLM on A100-80GB, OPT-13B
decode steps take ~20-40 ms, so at the chatbot's 0.1 s TPOT a colocated replica absorbs the prefills stalling its
decodes and keeps every GPU doing both phases, while a disaggregated prefill pool of fewer GPUs queues prompts
against the 0.25 s TTFT. The table above shows where the direction turns as the TPOT target tightens. The
paper's largest gains come from tight-TPOT and long-prompt workloads (code completion, summarization) and
OPT-66B/175B, and its measured vLLM has real per-step overheads and kernel interference this model does not
charge (its step cost is the roofline plus a fixed 4 ms).

![goodput](goodput.png)
"""
    C.print_summary(C.write_summary(out, text), wall)


if __name__ == "__main__":
    main()
