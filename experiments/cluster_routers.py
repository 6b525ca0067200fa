"""Router comparison on a 16-replica simulated cluster (issue 16, item 6).

    python experiments/cluster_routers.py [--quick] [--routers round_robin,shortest_queue,...] [--load 1.0]

Two panels, each one run per router through the CLI's config path (``configs/cluster_routers.py``
+ checked overrides -> ``build_cluster_sim`` / ``run_cluster_sim``, the path of
``python -m jaxserve.experiment --config=configs/cluster_routers.py --config.cluster.router=...``):

* **azure**: the whole Azure 2023 conversation hour (19,366 requests, lengths only) replayed 16x
  faster on 16 replicas (Llama-3-8B on one A100-80GB each, vLLM scheduling): each replica sees
  about the trace's own rate, which keeps it near capacity.
* **mooncake**: the Mooncake FAST'25 synthetic trace (17 min, prompts of ~15k tokens with 512-token
  prefix-block hash ids; 64 % of block references repeat) replayed 4x faster on 16 replicas
  (Mistral-7B, 32k context, on one A100-80GB each): the panel where a prefix-aware router can matter.

Both use vLLM with prefix caching on every replica. Per router: TTFT / TBT / TPOT / E2E P50 and
P99, throughput, per-replica imbalance (coefficient of variation over replicas of requests placed,
prompt tokens placed and busy time) and the fraction of prompt tokens served from the prefix cache.
Writes ``outputs/experiments/cluster_routers/``: results.csv, replicas.csv, routers.png, summary.md.
``--quick``: the first 30 s of the shipped 10-minute Azure sample and of Mooncake, 4 replicas.
"""

from __future__ import annotations

import argparse
import math
import time

import _common as C
import numpy as np

from jaxserve.cluster.config import build_cluster_sim, run_cluster_sim
from jaxserve.config import build_workload, get
from jaxserve.kv.prefix_hash import prompt_block_hashes
from jaxserve.metrics import request_metrics
from jaxserve.workload import resolve_trace_path

NAME = "cluster_routers"
POLICY = "cluster_routers"  # configs/cluster_routers.py
ROUTERS = ("round_robin", "shortest_queue", "prefix_affinity", "freeness", "least_kv", "fair")
COLORS = {"round_robin": "tab:gray", "shortest_queue": "tab:blue", "prefix_affinity": "tab:green",
          "freeness": "tab:red", "least_kv": "tab:purple", "fair": "tab:orange"}
AZURE = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
AZURE_SAMPLE = "sample:azure_conv_2023_first_10min.csv"
MOONCAKE = "mooncake_fast25/synthetic_trace.jsonl"
TITLES = {"azure": "Azure conversation 2023 (lengths only, no prefix ids)",
          "mooncake": "Mooncake synthetic (512-token prefix-block hash ids)"}

CTX: dict = {}  # set in main() before workers are forked


def panel_overrides(panel: str, args) -> dict:
    """The overrides of ``configs/cluster_routers.py`` that make ``panel`` (router excluded)."""
    n = args.replicas
    if panel == "azure":
        out = {"workload.trace_path": args.azure_trace, "workload.time_scale": 1.0 / (args.azure_speedup * args.load),
               "workload.duration_s": args.duration_s}
    else:
        out = {"workload.trace_path": MOONCAKE, "workload.time_scale": 1.0 / (args.mooncake_speedup * args.load),
               "workload.duration_s": args.duration_s,
               # 32k context keeps 84 % of the trace (longer prompts are rejected and counted); whole
               # prompts must fit vLLM's step budget
               "model.name": "mistral-7b", "scheduler.max_num_batched_tokens": 32768}
    return {**out, "cluster.num_replicas": n}


def ideal_hit_rate(config, max_context: int) -> float:
    """Prompt tokens one infinite prefix cache shared by every request would serve: the leading
    prompt blocks whose keys an earlier (served) request already had, over all served prompts."""
    block = get(config, "kv.block_size")
    seen, hit, total = set(), 0, 0
    for request in build_workload(config):
        if request.prompt_len + request.sampling.max_new_tokens > max_context:
            continue  # rejected
        keys = prompt_block_hashes(request, block)
        n = next((i for i, k in enumerate(keys) if k not in seen), len(keys))
        hit, total = hit + n * block, total + request.prompt_len
        seen.update(keys)
    return hit / total if total else math.nan


def cv(x) -> float:
    x = np.asarray(x, np.float64)
    return float(x.std() / x.mean()) if len(x) and x.mean() > 0 else math.nan


def serve(item):
    panel, router = item
    args = CTX["args"]
    config = C.config_for(POLICY, {**panel_overrides(panel, args), "cluster.router": router})
    t0 = time.perf_counter()
    res = run_cluster_sim(build_cluster_sim(config))
    wall = time.perf_counter() - t0
    m, log = res.metrics, res.log
    per = m["per_replica"]
    makespan = m["makespan_s"] or math.nan
    replicas = sorted(per, key=int)
    prompt_by_replica = {r: 0 for r in replicas}
    for row, p in zip(res.requests, log.prompt_len.tolist()):
        if row["replica"] != "":
            prompt_by_replica[str(row["replica"])] += p
    busy = np.array([per[r]["busy_s"] for r in replicas]) / makespan
    placed = np.array([per[r]["num_placed"] for r in replicas])
    ptoks = np.array([prompt_by_replica[r] for r in replicas])
    started = ~np.isnan(log.first_scheduled_s)
    prompt_started = int(log.prompt_len[started].sum())
    prefill_computed = int(log.step_prefill_tokens.sum())
    row = {
        "panel": panel, "router": router, "num_replicas": m["num_replicas"],
        "num_requests": m["num_requests"], "num_rejected": m["num_rejected"], "num_finished": m["num_finished"],
        "num_preemptions": m["num_preemptions"],
        **{f"{name}_{s}": m[name][s] for name in ("ttft_s", "tbt_s", "tpot_s", "e2e_s", "queueing_s")
           for s in ("p50", "p99")},
        "throughput_req_s": m["throughput_req_s"], "throughput_tok_s": m["throughput_tok_s"], "makespan_s": makespan,
        "busy_mean": float(busy.mean()), "busy_max": float(busy.max()), "cv_busy": cv(busy),
        "cv_placed": cv(placed), "cv_prompt_tokens": cv(ptoks),
        # tokens the prefix cache saved: 1 - prefill tokens computed / prompt tokens of started
        # requests (a recompute after preemption would count against it; see num_preemptions)
        "prefix_hit_rate": 1.0 - prefill_computed / prompt_started if prompt_started else math.nan,
        "wall_s": wall,
    }
    # bursts sent to one replica: the fraction of consecutive arrivals (in arrival order) placed on
    # the same replica (1 / replicas for a random choice, 0 for round robin)
    placed_on = np.array([-1 if row["replica"] == "" else int(row["replica"]) for row in res.requests])
    order = np.argsort(log.arrival_s, kind="stable")
    seq = placed_on[order][placed_on[order] >= 0]
    row["same_replica_consecutive"] = float((seq[1:] == seq[:-1]).mean()) if len(seq) > 1 else math.nan
    rm = request_metrics(log)
    ttft = rm.ttft_s[~np.isnan(rm.ttft_s)]
    e2e = rm.e2e_s[~np.isnan(rm.e2e_s)]
    replica_rows = [{"panel": panel, "router": router, "replica": int(r), "num_placed": int(per[r]["num_placed"]),
                     "prompt_tokens": int(prompt_by_replica[r]), "busy_s": per[r]["busy_s"],
                     "busy_fraction": float(b), "num_steps": per[r]["num_steps"]}
                    for r, b in zip(replicas, busy)]
    return {"row": row, "ttft": ttft, "e2e": e2e, "replicas": replica_rows,
            "cli": C.cli_command(POLICY, {**panel_overrides(panel, args), "cluster.router": router})}


# -- plots ------------------------------------------------------------------------------------------


def plot(results: dict, panels, routers, path):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(len(panels), 3, figsize=(16, 4.4 * len(panels)), squeeze=False)
    for row_axes, panel in zip(axes, panels):
        ax_ttft, ax_bars, ax_rep = row_axes
        for router in routers:
            r = results[(panel, router)]
            x = np.sort(r["ttft"])
            ax_ttft.plot(np.maximum(x, 1e-3), np.arange(1, len(x) + 1) / max(len(x), 1), color=COLORS[router],
                         label=f"{router} (P99 {r['row']['ttft_s_p99']:.2f} s)")
        ax_ttft.set_xscale("log")
        ax_ttft.xaxis.set_minor_formatter(NullFormatter())
        ax_ttft.set_xlabel("TTFT (s, log)")
        ax_ttft.set_ylabel("fraction of requests")
        ax_ttft.set_title(f"{TITLES[panel]}\nTTFT CDF", fontsize=10)
        ax_ttft.grid(alpha=0.3, which="both")
        ax_ttft.legend(fontsize=8, loc="lower right")

        metrics = [("ttft_s_p99", "TTFT P99"), ("tbt_s_p99", "TBT P99"), ("tpot_s_p99", "TPOT P99"),
                   ("e2e_s_p99", "E2E P99")]
        base = results[(panel, routers[0])]["row"]
        width = 0.8 / len(routers)
        for j, router in enumerate(routers):
            row = results[(panel, router)]["row"]
            vals = [row[k] / base[k] if base[k] else math.nan for k, _ in metrics]
            x = np.arange(len(metrics)) + (j - (len(routers) - 1) / 2) * width
            bars = ax_bars.bar(x, vals, width, color=COLORS[router], label=router)
            for b, (k, _) in zip(bars, metrics):
                ax_bars.annotate(f"{row[k]:.2g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                                 va="bottom", fontsize=6, rotation=90, xytext=(0, 1), textcoords="offset points")
        ax_bars.axhline(1.0, color="k", lw=0.8)
        ax_bars.set_xticks(np.arange(len(metrics)), [lab for _, lab in metrics])
        ax_bars.set_ylabel(f"relative to {routers[0]} (labels: seconds)")
        ax_bars.set_title("tail latency per router", fontsize=10)
        ax_bars.grid(alpha=0.3, axis="y")

        for j, router in enumerate(routers):
            reps = results[(panel, router)]["replicas"]
            share = np.array([r["prompt_tokens"] for r in reps], float)
            share = share / share.mean() if share.mean() > 0 else share
            jitter = (np.arange(len(reps)) / max(len(reps) - 1, 1) - 0.5) * 0.5
            ax_rep.scatter(j + jitter, share, s=12, color=COLORS[router], alpha=0.8)
            hit = results[(panel, router)]["row"]["prefix_hit_rate"]
            ax_rep.annotate(f"CV {cv(share):.2f}\nhit {hit:.0%}", (j, float(share.max()) if len(share) else 1.0),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax_rep.margins(y=0.2)
        ax_rep.set_xticks(np.arange(len(routers)), routers, rotation=20, fontsize=8)
        ax_rep.set_ylabel("prompt tokens per replica / mean")
        ax_rep.set_title("load per replica (dots) and prefix-cache hit rate", fontsize=10)
        ax_rep.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    C.save_figure(fig, path)


# -- summary ----------------------------------------------------------------------------------------


def table(results, panel, routers) -> str:
    head = ("| router | TTFT P50 / P99 (s) | TBT P50 / P99 (ms) | TPOT P50 / P99 (ms) | E2E P50 / P99 (s) | "
            "tok/s | CV placed / prompt tok / busy | same replica | busy mean / max | prefix hit | rejected | sim wall (s) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for router in routers:
        r = results[(panel, router)]["row"]
        lines.append(
            f"| {router} | {r['ttft_s_p50']:.3f} / {r['ttft_s_p99']:.2f} | {r['tbt_s_p50'] * 1e3:.1f} / "
            f"{r['tbt_s_p99'] * 1e3:.0f} | {r['tpot_s_p50'] * 1e3:.1f} / {r['tpot_s_p99'] * 1e3:.1f} | "
            f"{r['e2e_s_p50']:.2f} / {r['e2e_s_p99']:.1f} | {r['throughput_tok_s']:,.0f} | {r['cv_placed']:.3f} / "
            f"{r['cv_prompt_tokens']:.3f} / {r['cv_busy']:.3f} | {r['same_replica_consecutive']:.1%} | {r['busy_mean']:.2f} / {r['busy_max']:.2f} | "
            f"{r['prefix_hit_rate']:.1%} | {r['num_rejected']} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def same_run(a: dict, b: dict) -> bool:
    keys = ("ttft_s_p50", "ttft_s_p99", "tbt_s_p99", "e2e_s_p99", "cv_placed", "makespan_s")
    return all(a[k] == b[k] for k in keys)


def findings(results, panel, routers) -> list[str]:
    rows = {r: results[(panel, r)]["row"] for r in routers}
    out = []
    best = min(routers, key=lambda r: rows[r]["ttft_s_p99"])
    worst = max(routers, key=lambda r: rows[r]["ttft_s_p99"])
    out.append(f"Lowest TTFT P99: **{best}** ({rows[best]['ttft_s_p99']:.2f} s); highest: {worst} "
               f"({rows[worst]['ttft_s_p99']:.2f} s, {C.fmt_ratio(rows[worst]['ttft_s_p99'], rows[best]['ttft_s_p99'])}).")
    if "round_robin" in rows:
        rr = rows["round_robin"]
        for r in routers:
            if r != "round_robin":
                out.append(f"{r} vs round_robin: TTFT P99 {C.fmt_ratio(rows[r]['ttft_s_p99'], rr['ttft_s_p99'])}, "
                           f"TBT P99 {C.fmt_ratio(rows[r]['tbt_s_p99'], rr['tbt_s_p99'])}, "
                           f"E2E P99 {C.fmt_ratio(rows[r]['e2e_s_p99'], rr['e2e_s_p99'])}.")
    if "prefix_affinity" in rows and "shortest_queue" in rows:
        pa, sq = rows["prefix_affinity"], rows["shortest_queue"]
        if same_run(pa, sq):
            out.append("prefix_affinity made **exactly the same run** as shortest_queue (identical latencies and "
                       "placements): no request carries a prefix identity, so no replica ever matches and the "
                       "router falls back to the shortest queue every time.")
        else:
            out.append(f"prefix_affinity served {pa['prefix_hit_rate']:.1%} of prompt tokens from the prefix cache "
                       f"against {sq['prefix_hit_rate']:.1%} for shortest_queue, at a placement CV of "
                       f"{pa['cv_placed']:.3f} vs {sq['cv_placed']:.3f}.")
    if "fair" in rows and "shortest_queue" in rows and same_run(rows["fair"], rows["shortest_queue"]):
        out.append("fair made exactly the same run as shortest_queue: with one client its counters never choose "
                   "between clients, and it places on the replica with the fewest requests, as JSQ does (it only "
                   "holds requests at the router when every replica has `max_waiting` waiting, which never happened).")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~20 s smoke run (30 s of each trace, 4 replicas)")
    parser.add_argument("--routers", default=",".join(ROUTERS), help="comma-separated router names")
    parser.add_argument("--panels", default="azure,mooncake", help="azure and/or mooncake")
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--azure-speedup", type=float, default=16.0, help="Azure arrival-rate multiplier")
    parser.add_argument("--mooncake-speedup", type=float, default=4.0, help="Mooncake arrival-rate multiplier")
    parser.add_argument("--load", type=float, default=1.0, help="extra multiplier on both panels' rates")
    parser.add_argument("--duration-s", type=float, default=None, help="seconds of each trace (default: all)")
    parser.add_argument("--jobs", type=int, default=C.default_jobs())
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.azure_trace = AZURE
    if args.quick:
        args.replicas = min(args.replicas, 4)
        args.azure_speedup, args.mooncake_speedup = 4.0, 1.0
        args.duration_s = 30.0
        args.azure_trace = AZURE_SAMPLE  # shipped with the package
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    panels = [p.strip() for p in args.panels.split(",") if p.strip()]
    if not resolve_trace_path(MOONCAKE).exists() and "mooncake" in panels:
        C.console.print(f"[yellow]{MOONCAKE} not found (../shared/traces or $JAXSERVE_TRACES): mooncake panel skipped")
        panels.remove("mooncake")
    if not args.quick and not resolve_trace_path(AZURE).exists():
        C.console.print(f"[yellow]{AZURE} not found: the Azure panel replays the shipped 10-minute sample")
        args.azure_trace = AZURE_SAMPLE
    t0 = time.perf_counter()
    out = C.output_dir(NAME, args.out)
    CTX.update(args=args)
    setups = {p: C.setup_for(C.config_for(POLICY, panel_overrides(p, args))) for p in panels}
    for p, s in setups.items():
        C.console.print(f"[bold]{p}:[/bold] {s.describe()}")

    items = [(p, r) for p in panels for r in routers]
    outs = C.parallel_map(serve, items, jobs=args.jobs, description="cluster runs", label=lambda it: f"{it[0]}/{it[1]}")
    results = dict(zip(items, outs))
    C.write_csv(out / "results.csv", (o["row"] for o in outs))
    C.write_csv(out / "replicas.csv", (row for o in outs for row in o["replicas"]))
    plot(results, panels, routers, out / "routers.png")

    wall = time.perf_counter() - t0
    sections = []
    for p in panels:
        cfg = C.config_for(POLICY, panel_overrides(p, args))
        first = results[(p, routers[0])]["row"]
        rate = first["num_requests"] / (first["makespan_s"] or math.nan)
        ideal = ideal_hit_rate(cfg, setups[p].max_context)
        sections.append(f"""## {TITLES[p]}

* {setups[p].describe()}; scheduler `{get(cfg, 'scheduler.name')}` with prefix caching, {args.replicas} replicas.
* Workload: `{get(cfg, 'workload.trace_path')}`, {'the whole trace' if get(cfg, 'workload.duration_s') is None else f"first {get(cfg, 'workload.duration_s'):g} s"}, arrival gaps x {get(cfg, 'workload.time_scale'):.4g} ({1 / get(cfg, 'workload.time_scale'):g}x the recorded rate): {first['num_requests']:,} requests
  ({first['num_rejected']} rejected as longer than the {setups[p].max_context:,}-token context), {rate:.1f} req/s over the {first['makespan_s']:.0f} s run.
* Prefix reuse in the trace: one infinite cache shared by every request would serve {ideal:.1%} of the
  served prompt tokens (the ceiling of the "prefix hit" column).
* Rerun one router: `{results[(p, routers[0])]['cli']}`

{table(results, p, routers)}

""" + "\n".join(f"* {line}" for line in findings(results, p, routers)) + "\n")
    text = f"""# Routers on a {args.replicas}-replica simulated cluster

Command: `{C.command_line()}` ({wall:.0f} s wall on {args.jobs} process(es)).

Columns: latencies over all requests (TBT = gaps between a request's tokens, TPOT = its mean gap);
tok/s = output tokens per second of the whole run; CV = coefficient of variation over replicas of
requests placed, prompt tokens placed and busy time (busy = seconds of steps / makespan); same
replica = fraction of consecutive arrivals placed on the same replica (bursts; 1/replicas if
random, 0 for round robin); prefix hit = 1 - prefill tokens computed / prompt tokens of started requests (tokens the prefix cache
saved); sim wall = wall seconds of that one simulation.

{''.join(sections)}
![routers](routers.png)

{CTX.get('notes', NOTES)}
"""
    path = C.write_summary(out, text)
    C.print_summary(path, wall)


NOTES = """## Reading it
* **Why this load.** 16x the Azure conversation rate on 16 replicas gives each replica about the
  trace's own 5.5 req/s, which keeps a Llama-3-8B vLLM replica on an A100-80GB busy for nearly all
  of the run (busy mean above): near capacity, where a replica that receives a burst queues it and
  the router's choice shows in the tail. Below that load every router's tail is the same (nothing
  queues); far above it every replica is saturated and only the arrival order matters. `--load`
  scales both panels' rates.
* **Mooncake's rate** (4x) puts the routers that ignore prefixes at capacity (busy ~0.97-0.99 of
  the run, TTFT medians of seconds): prefix hits remove prefill work, so there the router decides
  how much work the cluster has to do at all, not only where it queues.
* **vLLM prioritizes prefills**: a prefill stalls the decodes beside it, so TBT P99 mostly measures
  how much prefill lands on a replica at once. Routers that send consecutive arrivals to the same
  replica (the "same replica" column) batch several prompts into one step there and stretch its
  decodes' gaps, which is consistent with the load-aware routers' slightly higher TBT P99 than
  round robin on Azure while their TTFT P99 is lower.
* **fair** with one client is join-the-shortest-queue that holds requests at the router until some
  replica has fewer than `max_waiting` (2) waiting: late binding, which spreads bursts.
* **Azure has lengths only**: its requests have no token ids and no prefix hash ids, so no prefix
  can be matched and prefix caching cannot hit; the Mooncake panel (prefix-block hash ids) is where
  prefix affinity is tested.
* **Freeness** (Llumnix) ranks replicas by free KV per running request. With an A100-80GB's KV pool
  (hundreds of thousands of tokens per replica) a queued prompt changes a replica's freeness by
  little, and the running batch only grows at that replica's next step, so arrivals that come
  between two of its steps all go to the same replica (the "same replica" column): freeness is a
  memory-pressure signal, and balances well only when KV is the scarce resource.
* Simulated replicas (roofline cost model), not measured GPUs; one seedless trace replay per router.
"""


if __name__ == "__main__":
    main()
