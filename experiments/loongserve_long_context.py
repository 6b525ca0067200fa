"""LoongServe (SOSP'24) on a simulated 8 x A100-80GB node: elastic sequence parallelism against
chunked prefill and against prefill/decode disaggregation on long-context workloads (issue 18, item 4).

    python experiments/loongserve_long_context.py [--quick] [--num-requests 300] [--out DIR]

Model: Llama-2-7B's shape with LWM-1M-Text's 1M-token context (``configs/loongserve.py``).
Systems, all on the same 8 GPUs, all from ``configs/loongserve.py`` plus checked overrides:

* **LoongServe**: one node of 8 elastic single-GPU instances (``cluster.esp.enabled``).
* **Chunked prefill** (Sarathi-Serve / vLLM's chunked prefill, chunk 512) on fixed layouts: one
  TP-8 replica, and four TP-2 replicas behind a shortest-queue router.
* **Disaggregation** (DistServe-style phase pools, KV over NVLink3): a TP-4 prefill replica and
  two TP-2 decode replicas, and two TP-2 prefill + one TP-4 decode replica.

Workloads (lengths only; ``../shared/traces``): the Mooncake synthetic trace's lengths, a mix of
ShareGPT conversations with 20 % long Mooncake requests (prompts >= 16k), and ShareGPT alone.

Two measurements per system and workload, as the paper reports throughput and latency:
**throughput at saturating load** (every request arrives within a fraction of a second; finished
requests / makespan) and **latency at a common moderate load** (Poisson at half of LoongServe's
saturated throughput: P50/P99 TTFT, TPOT and normalized latency). A layout that rejects requests
(too long for its KV) is listed but not chosen as the best of its kind.

Writes ``outputs/experiments/loongserve_long_context/``: runs.csv, headline.csv, loongserve.png,
summary.md. ``--quick``: 40 requests, one layout per baseline (well under a minute).
"""

from __future__ import annotations

import argparse
import time

import _common as C
import matplotlib.pyplot as plt
import numpy as np

from jaxserve.cluster.config import build_cluster_sim, is_cluster, run_cluster_sim
from jaxserve.cluster.esp_config import build_loongserve_sim, is_loongserve, run_loongserve_sim
from jaxserve.sim.simulate import build_sim, run_sim

NAME = "loongserve_long_context"
POLICY = "loongserve"  # configs/loongserve.py
MOONCAKE = "mooncake_fast25/synthetic_trace.jsonl"
LONG_SHARE, LONG_MIN = 0.2, 16384  # the mixed workload: 20 % Mooncake requests with prompts >= 16k
SATURATING_QPS = 1000.0  # arrivals within ~num_requests/1000 s: a backlog from the start
PAPER = {"chunked prefill": 3.85, "disaggregation": 5.81}  # LoongServe's max-throughput gains (PAPERS.md §6)

OFF = {"cluster.esp.enabled": False}
# DistServe's prefill instances run whole prompts: a token budget that holds the longest (Mooncake's 191k)
WHOLE = {"scheduler.name": "vllm", "scheduler.max_num_batched_tokens": 1 << 18}
SYSTEMS = {  # system -> kind, overrides of configs/loongserve.py
    "loongserve (8 elastic instances)": ("loongserve", {}),
    "chunked prefill TP8": ("chunked prefill", {**OFF, "scheduler.name": "sarathi", "hardware.tp": 8}),
    "chunked prefill 4xTP2": ("chunked prefill", {**OFF, "scheduler.name": "sarathi", "hardware.tp": 2,
                                                  "cluster.num_replicas": 4, "cluster.router": "shortest_queue"}),
    "disaggregated P1xTP4 + D2xTP2": ("disaggregation", {
        **OFF, **WHOLE, "hardware.tp": 2, "cluster.num_replicas": 3, "cluster.router": "shortest_queue", "cluster.pools.prefill": 1,
        "cluster.pools.decode": 2, "cluster.pools.prefill_overrides": "hardware.tp=4", "cluster.pools.link": "nvlink3"}),
    "disaggregated P2xTP2 + D1xTP4": ("disaggregation", {
        **OFF, **WHOLE, "hardware.tp": 2, "cluster.num_replicas": 3, "cluster.router": "shortest_queue", "cluster.pools.prefill": 2,
        "cluster.pools.decode": 1, "cluster.pools.decode_overrides": "hardware.tp=4", "cluster.pools.link": "nvlink3"}),
}  # fmt: skip
QUICK_SYSTEMS = ("loongserve (8 elastic instances)", "chunked prefill TP8", "disaggregated P1xTP4 + D2xTP2")


# -- workloads ----------------------------------------------------------------------------------------
def workloads(out, num: int, seed: int) -> dict[str, str]:
    """Workload name -> a length CSV (``workload.lengths.path``) of ``num`` (prompt, output) rows."""
    rng = np.random.default_rng(seed)
    mooncake, sharegpt = C.load_lengths(MOONCAKE).dist, C.load_lengths(C.SHAREGPT).dist
    long_rows = np.flatnonzero(mooncake.prompt_lens >= LONG_MIN)

    def rows(dist, picks):
        return [(int(dist.prompt_lens[i]), int(dist.output_lens[i])) for i in picks]

    moon = rows(mooncake, rng.integers(0, len(mooncake.prompt_lens), num))
    share = rows(sharegpt, rng.integers(0, len(sharegpt.prompt_lens), num))
    is_long = rng.random(num) < LONG_SHARE
    mixed = [rows(mooncake, [rng.choice(long_rows)])[0] if flag else s for flag, s in zip(is_long, share)]
    paths = {}
    for name, pairs in (("mooncake", moon), ("mixed", mixed), ("sharegpt", share)):
        paths[name] = str(C.write_csv(out / f"lengths_{name}.csv", (
            {"num_prefill_tokens": p, "num_decode_tokens": o} for p, o in pairs)))  # fmt: skip
    return paths


def overrides(system: str, lengths: str, qps: float, num: int, seed: int) -> dict:
    workload = C.poisson_workload(qps, num, seed=seed, lengths_path=lengths)
    return {**SYSTEMS[system][1], **workload}


def simulate(config) -> dict:
    """metrics.json of ``config`` on the node, a cluster or one replica, as the CLI would run it."""
    if is_loongserve(config):
        return run_loongserve_sim(build_loongserve_sim(config)).metrics
    return (run_cluster_sim(build_cluster_sim(config)) if is_cluster(config) else run_sim(build_sim(config))).metrics


def run_point(item) -> dict:
    """One simulation: (workload, lengths csv, system, load, qps, num, seed) -> a CSV row."""
    workload, lengths, system, load, qps, num, seed = item
    ov = overrides(system, lengths, qps, num, seed)
    t0 = time.process_time()
    m = simulate(C.config_for(POLICY, ov))
    row = {"workload": workload, "system": system, "kind": SYSTEMS[system][0], "load": load, "qps": qps}
    row |= C.flat_metrics(m)
    row["cpu_s"] = time.process_time() - t0
    row["command"] = C.cli_command(POLICY, ov)
    return row


# -- the report -----------------------------------------------------------------------------------------
def best_of(rows, workload: str, kind: str, load: str) -> dict | None:
    """The highest-throughput system of ``kind`` that served every request (else the highest)."""
    cands = [r for r in rows if r["workload"] == workload and r["kind"] == kind and r["load"] == load]
    full = [r for r in cands if r["num_rejected"] == 0]
    return max(full or cands, key=lambda r: r["throughput_req_s"], default=None)


def headline(rows, names) -> list[dict]:
    out = []
    for w in names:
        loong = best_of(rows, w, "loongserve", "saturating")
        for kind in ("chunked prefill", "disaggregation"):
            base = best_of(rows, w, kind, "saturating")
            out.append({"workload": w, "baseline": kind, "baseline_system": base["system"],
                        "loongserve_req_s": loong["throughput_req_s"], "baseline_req_s": base["throughput_req_s"],
                        "gain": loong["throughput_req_s"] / base["throughput_req_s"], "paper_gain": PAPER[kind]})  # fmt: skip
    return out


def plot(rows, names, out):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    width = 0.8 / len(systems)
    for j, s in enumerate(systems):
        sat = [next((r["throughput_req_s"] for r in rows if r["workload"] == w and r["system"] == s
                     and r["load"] == "saturating"), np.nan) for w in names]  # fmt: skip
        lat = [next((r["normalized_latency_s_p50"] for r in rows if r["workload"] == w and r["system"] == s
                     and r["load"] == "moderate"), np.nan) for w in names]  # fmt: skip
        x = np.arange(len(names)) + j * width
        axes[0].bar(x, sat, width, label=s)
        axes[1].bar(x, lat, width, label=s)
    for ax, title in zip(axes, ("throughput at saturating load (req/s)", "P50 normalized latency at moderate load (s/token)")):
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        ax.set_title(title, fontsize=10)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("LoongServe (ESP) vs chunked prefill vs disaggregation, Llama-2-7B (1M context) on 8 x A100-80GB (simulated)")
    return C.save_figure(fig, out / "loongserve.png")


def summary(rows, heads, names, args, wall_s) -> str:
    lines = [f"# LoongServe: elastic sequence parallelism on 8 simulated A100-80GB ({'quick' if args.quick else 'full'} run)",
             "", f"Command: `{C.command_line()}`; {args.num_requests} requests per run, seed {args.seed}.", "",
             "## Max throughput (saturating load), LoongServe over the best baseline layout of each kind", "",
             "| workload | baseline | best baseline layout | LoongServe req/s | baseline req/s | ours | paper (up to) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for h in heads:
        lines.append(f"| {h['workload']} | {h['baseline']} | {h['baseline_system']} | {h['loongserve_req_s']:.3f} | "
                     f"{h['baseline_req_s']:.3f} | {h['gain']:.2f}x | {h['paper_gain']:.2f}x |")
    lines += ["", "## Every run", "",
              "| workload | load | system | req/s | rejected | TTFT p50 / p99 (s) | TPOT p50 / p99 (s) | norm. latency p50 / p99 (s/tok) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['workload']} | {r['load']} ({r['qps']:.2f}/s) | {r['system']} | {r['throughput_req_s']:.3f} | "
                     f"{r['num_rejected']} | {r['ttft_s_p50']:.2f} / {r['ttft_s_p99']:.2f} | "
                     f"{r['tpot_s_p50']:.3f} / {r['tpot_s_p99']:.3f} | "
                     f"{r['normalized_latency_s_p50']:.3f} / {r['normalized_latency_s_p99']:.3f} |")
    lines += ["", "## Why our gains differ from the paper's", "", EXPLANATION, "",
              f"Outputs: runs.csv (every run, with its `python -m jaxserve.experiment` command), headline.csv, "
              f"loongserve.png. {wall_s:.0f} s wall."]
    return "\n".join(lines) + "\n"


EXPLANATION = """\
* The roofline gives every layout the same FLOPs: a TP-8 replica divides a long prefill's GEMMs and
  attention by 8 just as ring attention does, so on prefill-bound long-context traffic fixed TP-8
  chunked prefill is about as fast as ESP here. The paper's baselines lose more than this model
  charges them: real chunked attention re-reads the prefix KV for every chunk at a fraction of the
  kernel efficiency, TP-8 GEMMs of a 7B model run far below the MFU a 1-GPU instance reaches, and
  vLLM's scheduler overheads grow with batch size; none of that is in a roofline with one MFU.
* Our ESP decode runs on disjoint instances from prefill, so decode steps (bound by reading KV)
  never overlap prefill compute, while chunked prefill hides decode rows inside compute-bound
  chunks (a roofline step costs max(compute, memory)). This favours the baseline on throughput
  and shows in its low TPOT.
* Simplifications of LoongServe in the node: a scheduling round waits for all of its prefill
  batches (the artifact greedily fills idle instances inside a round), decode is one lockstep
  group, preemption recomputes instead of offloading, and ring communication and the multi-master
  exchange use roofline link numbers, not measured NCCL/rnccl behaviour.
* ESP's structural advantages show only where fixed layouts are stuck: no layout here rejects a
  prompt (TP-2 already holds Mooncake's 191k tokens), so the one case it wins in the full run is
  disaggregation on Mooncake, whose decode pool idles while the prefill pool is the bottleneck."""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 requests, one layout per baseline")
    parser.add_argument("--num-requests", type=int, default=300, help="requests per simulated run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=C.default_jobs())
    parser.add_argument("--out", default=None, help="output directory")
    args = parser.parse_args()
    if args.quick:
        args.num_requests = 40
    wall = time.perf_counter()
    out = C.output_dir(NAME, args.out)
    paths = workloads(out, args.num_requests, args.seed)
    names = list(paths)
    systems = QUICK_SYSTEMS if args.quick else tuple(SYSTEMS)
    loong = systems[0]
    sat = [(w, paths[w], s, "saturating", SATURATING_QPS, args.num_requests, args.seed) for w in names for s in systems]
    rows = C.parallel_map(run_point, sat, jobs=args.jobs, description="saturating load", label=lambda i: f"{i[0]} {i[2]}")
    moderate = []
    for w in names:  # a common moderate load: half of LoongServe's saturated throughput
        qps = 0.5 * next(r["throughput_req_s"] for r in rows if r["workload"] == w and r["system"] == loong)
        moderate += [(w, paths[w], s, "moderate", qps, args.num_requests, args.seed) for s in systems]
    rows += C.parallel_map(run_point, moderate, jobs=args.jobs, description="moderate load", label=lambda i: f"{i[0]} {i[2]}")
    C.write_csv(out / "runs.csv", rows)
    heads = headline(rows, names)
    C.write_csv(out / "headline.csv", heads)
    plot(rows, names, out)
    wall = time.perf_counter() - wall
    C.print_summary(C.write_summary(out, summary(rows, heads, names, args, wall)), wall)


if __name__ == "__main__":
    main()
