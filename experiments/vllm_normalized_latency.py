"""vLLM (SOSP'23) Figure-12 style: normalized latency vs request rate for static batching, Orca and vLLM.

    python experiments/vllm_normalized_latency.py [--quick]

OPT-13B on one simulated A100-40GB (the vLLM paper's GPU for OPT-13B), ShareGPT lengths
(Sarathi-Serve's processed ShareGPT file, filtered to prompt + output <= 2048, OPT's context),
Poisson arrivals. Sweeps the request rate, plots mean normalized latency (mean over requests of
E2E latency / output tokens, s/token) per scheduler, and finds the highest rate each sustains with
normalized latency under a threshold (bisection with ``jaxserve.metrics.search_max_rate``).
Writes ``outputs/experiments/vllm_normalized_latency/``: sweep.csv, search.csv, normalized_latency.png,
summary.md.
"""

from __future__ import annotations

import argparse
import time

import _common as C
import numpy as np

from jaxserve.metrics import search_max_rate

NAME = "vllm_normalized_latency"
# label -> (configs/<name>.py, overrides); "Orca (Max)" gets its max_num_seqs in main() (see orca_max_seqs).
SCHEDULERS: dict = {
    "static": ("static", {}),
    "Orca (Max)": ("orca", {}),
    "Orca (Oracle)": ("orca", {}),
    "vLLM": ("vllm", {}),
}
COLORS = {"static": "tab:gray", "Orca (Max)": "tab:red", "Orca (Oracle)": "tab:orange", "vLLM": "tab:blue"}
PAPER = ("vLLM paper (Sec. 6.2, ShareGPT, ≈): 1.7-2.7x the request rate of Orca (Oracle) and 2.7-8x that of "
         "Orca (Max) at similar latency (PAPERS.md: 2-4x vs Orca overall)")


def orca_max_seqs(kv, context: int, watermark: float) -> int:
    """Orca (Max) reserves the whole context for every request. With a uniform reservation that is
    exactly a cap on the batch: the most requests whose ``context`` tokens fit the blocks left
    after the admission watermark. Plain ``orca`` (which reserves prompt + max_new_tokens, never
    more than ``context``) with this ``max_num_seqs`` admits exactly the same requests."""
    per_request = -(-context // kv.block_size)
    return max(1, (kv.num_blocks - int(watermark * kv.num_blocks)) // per_request)

# Filled in main() before any worker is forked; workers read them (fork copies the parent's globals).
CTX: dict = {}
CACHE: dict = {}  # (label, rate) -> flat metrics row


def point(label: str, rate: float) -> tuple[str, dict]:
    """(policy config, overrides) of one point (keys ``python -m jaxserve.experiment`` takes)."""
    args = CTX["args"]
    policy, options = SCHEDULERS[label]
    workload = C.poisson_workload(rate, args.num_requests, seed=args.seed, lengths_path=CTX["lengths_path"])
    return policy, {**CTX["base"], **options, **workload}


def simulate_point(item):
    label, rate = item
    key = (label, round(rate, 6))
    if key in CACHE:
        return CACHE[key]
    result = C.run(C.config_for(*point(label, rate)))
    m = result.metrics
    row = {"scheduler": label, "rate_req_s": rate, **C.flat_metrics(m),
           "mean_batch_tokens": m["mean_batch_tokens"], "wall_s": result.wall_s}
    CACHE[key] = row
    return row


def search_threshold(label):
    """Highest rate with mean normalized latency <= threshold, bracketed by the sweep."""
    args, threshold = CTX["args"], CTX["args"].threshold
    rows = sorted((r for r in CACHE.values() if r["scheduler"] == label), key=lambda r: r["rate_req_s"])
    ok = [r["normalized_latency_s_mean"] <= threshold for r in rows]
    if not ok[0]:
        return {"scheduler": label, "rate_req_s": rows[0]["rate_req_s"], "bracket": "fails at the lowest rate",
                "tried": []}
    if all(ok):
        return {"scheduler": label, "rate_req_s": rows[-1]["rate_req_s"], "bracket": "passes at the highest rate",
                "tried": []}
    first_fail = ok.index(False)
    low, high = rows[first_fail - 1]["rate_req_s"], rows[first_fail]["rate_req_s"]
    found = search_max_rate(
        lambda rate: simulate_point((label, rate))["normalized_latency_s_mean"] <= threshold,
        low, high, rel_tol=args.rel_tol,
    )
    return {"scheduler": label, "rate_req_s": found.rate, "bracket": f"[{low:g}, {high:g}]",
            "tried": [(r, ok) for r, ok in found.tried], "rows": [CACHE[(label, round(r, 6))] for r, _ in found.tried]}


def plot(rows, found, args, path):
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for label in SCHEDULERS:
        pts = sorted((r for r in rows if r["scheduler"] == label), key=lambda r: r["rate_req_s"])
        x = np.array([r["rate_req_s"] for r in pts])
        y = np.array([r["normalized_latency_s_mean"] for r in pts])
        ax.plot(x, y, "o-", ms=4, color=COLORS[label], label=f"{label} (sustains {found[label]:.2f} req/s)")
        ax.axvline(found[label], color=COLORS[label], ls=":", lw=1)
        thr = [r["throughput_req_s"] for r in pts]
        ax2.plot(x, thr, "o-", ms=4, color=COLORS[label], label=label)
    ax.axhline(args.threshold, color="k", ls="--", lw=1, label=f"threshold {args.threshold} s/token")
    ax.set_ylim(0, args.ylim)
    ax.set_xlim(left=0)
    ax.set_xlabel("request rate (req/s, Poisson)")
    ax.set_ylabel("mean normalized latency (s/token)")
    ax.set_title("Normalized latency vs load (curves leave the plot when they blow up)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    top = max(r["rate_req_s"] for r in rows)
    ax2.plot([0, top], [0, top], color="k", lw=0.8, ls="--", label="offered = served")
    ax2.set_xlim(0, top * 1.02)
    ax2.set_ylim(0, top * 1.02)
    ax2.set_xlabel("request rate (req/s, Poisson)")
    ax2.set_ylabel("completed requests / s (over the run)")
    ax2.set_title("Served throughput")
    ax2.legend(loc="upper left", fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{CTX['setup'].model} on 1x {CTX['setup'].hardware}, ShareGPT lengths (prompt+output <= "
                 f"{CTX['lengths'].max_total}), {args.num_requests} requests per point", fontsize=11)
    fig.tight_layout()
    C.save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run: fewer requests and rates")
    parser.add_argument("--model", default="opt-13b")
    parser.add_argument("--hardware", default="a100-40gb", help="a100-40gb (the vLLM paper's) or a100-80gb")
    parser.add_argument("--lengths", default=C.SHAREGPT, help="length CSV under the shared traces folder")
    parser.add_argument("--no-filter", action="store_true",
                        help="keep requests longer than the context (they are rejected and counted)")
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="request rates to sweep (req/s)")
    parser.add_argument("--threshold", type=float, default=0.2, help="normalized-latency threshold (s/token)")
    parser.add_argument("--rel-tol", type=float, default=0.02, help="relative tolerance of the rate search")
    parser.add_argument("--ylim", type=float, default=1.0, help="y-axis top of the latency plot (s/token)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=C.default_jobs())
    parser.add_argument("--out", default=None, help="output folder (default outputs/experiments/" + NAME + ")")
    args = parser.parse_args()
    if args.rates is None:
        args.rates = ([0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.6] if args.quick
                      else [round(0.1 * i, 1) for i in range(1, 17)])
    if args.quick:
        args.num_requests = min(args.num_requests, 500)
        args.rel_tol = max(args.rel_tol, 0.08)
    t0 = time.perf_counter()
    out = C.output_dir(NAME, args.out)

    base = {"model.name": args.model, "hardware.name": args.hardware}
    orca = C.config_for("orca", base)
    setup = C.setup_for(orca)
    lengths = C.load_lengths(args.lengths, None if args.no_filter else setup.max_context)
    max_seqs = orca_max_seqs(setup.kv, setup.max_context, C.get(orca, "scheduler.watermark"))
    SCHEDULERS["Orca (Max)"] = ("orca", {"scheduler.max_num_seqs": max_seqs})
    CTX.update(setup=setup, lengths=lengths, lengths_path=C.lengths_file(lengths, out), base=base, args=args)
    C.console.print(f"[bold]{setup.describe()}[/bold]\n{lengths.describe()}")

    items = [(label, rate) for label in SCHEDULERS for rate in args.rates]
    rows = C.parallel_map(simulate_point, items, jobs=args.jobs, description="rate sweep",
                          label=lambda it: f"{it[0]} @ {it[1]:g} req/s")
    for row in rows:  # results computed in workers: bring them into this process's cache
        CACHE[(row["scheduler"], round(row["rate_req_s"], 6))] = row
    searches = C.parallel_map(search_threshold, list(SCHEDULERS), jobs=args.jobs,
                              description=f"search rate at {args.threshold} s/token", label=str)
    found = {s["scheduler"]: s["rate_req_s"] for s in searches}
    extra = [r for s in searches for r in s.get("rows", [])]
    sweep_keys = {(r["scheduler"], r["rate_req_s"]) for r in rows}
    all_rows = rows + [r for r in extra if (r["scheduler"], r["rate_req_s"]) not in sweep_keys]
    all_rows.sort(key=lambda r: (list(SCHEDULERS).index(r["scheduler"]), r["rate_req_s"]))
    C.write_csv(out / "sweep.csv", all_rows)
    C.write_csv(out / "search.csv", [
        {"scheduler": s["scheduler"], "max_rate_req_s": s["rate_req_s"], "threshold_s_per_token": args.threshold,
         "bracket": s["bracket"], "tried": " ".join(f"{r:.4g}:{'ok' if ok else 'fail'}" for r, ok in s["tried"])}
        for s in searches])
    plot(all_rows, found, args, out / "normalized_latency.png")

    # -- summary --------------------------------------------------------------------------------
    def at(label, rate):
        pts = [r for r in all_rows if r["scheduler"] == label]
        return min(pts, key=lambda r: abs(r["rate_req_s"] - rate))

    low_rate = args.rates[0]
    peak = {label: max(r["throughput_req_s"] for r in all_rows if r["scheduler"] == label) for label in SCHEDULERS}
    preempt = {label: at(label, found[label]) for label in SCHEDULERS}
    rejected = max(r["num_rejected"] for r in all_rows)
    table = "\n".join(
        f"| {label} | {found[label]:.2f} | {peak[label]:.2f} | {at(label, low_rate)['normalized_latency_s_mean']:.3f} | "
        f"{preempt[label]['num_preemptions']} | {preempt[label]['peak_kv_usage']:.2f} |"
        for label in SCHEDULERS)
    wall = time.perf_counter() - t0
    text = f"""# vLLM: normalized latency vs request rate (static batching, Orca, vLLM)

Command: `{C.command_line()}` ({wall:.0f} s wall on {args.jobs} process(es)).

## Setup
* {setup.describe()}.
  The vLLM paper ran OPT-13B on one A100-40GB; so does this script (`--hardware a100-80gb` to compare).
* Lengths: {lengths.describe()}.
  {"Requests longer than the context were kept and are rejected by the simulator (counted: up to " + str(rejected) + " per run)." if args.no_filter else "Filtering (rather than rejecting) keeps every scheduler on the same admitted requests; " + str(rejected) + " requests were rejected in any run."}
* Arrivals: Poisson, {args.num_requests} requests per point (seed {args.seed}, the same draws at every rate
  up to the time scale); rates {args.rates[0]:g}-{args.rates[-1]:g} req/s plus bisection points. Every point is a
  config; e.g. vLLM at 1 req/s: `{C.cli_command(*point("vLLM", 1.0))}`.
* Schedulers (configs/<name>.py), all with max_num_batched_tokens 8192:
  * `static`: a new batch only when the previous one has finished; KV for prompt + max_new_tokens reserved.
  * Orca (Oracle) = `orca`: iteration-level batching, whole prompts, KV for prompt + max_new_tokens reserved
    at admission. The simulator ends every request exactly at max_new_tokens = its true output length, so
    this reservation is the paper's *oracle* one (no over-reservation, only reserving outputs up front).
  * Orca (Max) = `orca` with max_num_seqs = {max_seqs}: reserving the whole
    {setup.max_context}-token context per request (the paper's Orca (Max)) caps the batch at that many
    requests ({setup.kv.num_blocks} blocks less the 1% watermark, {-(-setup.max_context // setup.kv.block_size)}
    blocks each); with that cap plain `orca` admits exactly the same requests. Orca (Pow2) cannot be expressed
    with the public options and is left out.
  * `vllm`: paged KV on demand, prefill-first steps, recompute preemption of the latest arrival; max_num_seqs 256.
* Metric: normalized latency = mean over finished requests of E2E latency / output tokens (s/token).
  "Sustains" = the highest rate with mean normalized latency <= {args.threshold} s/token, found by
  `search_max_rate` between the last passing and first failing sweep rate (rel. tol. {args.rel_tol}).

## Result
| scheduler | sustained rate (req/s) | peak served throughput (req/s) | norm. latency at {low_rate:g} req/s (s/token) | preemptions at the sustained rate | peak KV use there |
|---|---|---|---|---|---|
{table}

**Headline: vLLM sustains {C.fmt_ratio(found['vLLM'], found['Orca (Oracle)'])} the rate of Orca (Oracle),
{C.fmt_ratio(found['vLLM'], found['Orca (Max)'])} that of Orca (Max) and {C.fmt_ratio(found['vLLM'], found['static'])} that of static batching**
(at <= {args.threshold} s/token). {PAPER}; vs FasterTransformer (static batching with its own kernels) the paper
reports up to 22x (≈).

![normalized latency](normalized_latency.png)

## Why it may differ from the paper
* **Orca (Oracle) loses only by reserving outputs up front**: an admitted request holds its whole output
  length from the start while vLLM holds on average about half of it, so the gain over it scales with
  output / (prompt + output); vLLM gives part of it back by recomputing preempted requests. Orca (Max)'s
  loss is the over-reservation of the full context, which depends on how far requests are from 2048 tokens.
* **Different ShareGPT sample.** This is Sarathi-Serve's processed ShareGPT-4 file (multi-turn, Llama-2
  tokenizer); filtered to OPT's 2048 context it has mean prompt {lengths.dist.prompt_lens.mean():.0f} and
  output {lengths.dist.output_lens.mean():.0f} tokens. The vLLM paper sampled its own ShareGPT requests (OPT tokenizer);
  as we recall (≈) their prompts are shorter than their outputs on average, the regime in which reserving
  outputs up front (Orca) wastes the most and vLLM's on-demand allocation gains the most.
* **Roofline cost model, no kernels.** Step time = 4 ms overhead + max(FLOPs/(312 TF x 0.6), bytes/(1555 GB/s
  x 0.8)); the paper's Orca and FasterTransformer baselines are its own re-implementations with their own
  kernels; here all four share one cost model, so only scheduling and memory policy differ.
* **vLLM preempts by recompute** (the default); near saturation many requests are preempted and their
  prompt + generated tokens recomputed, which the cost model charges in full.
* **Static batching** retires each request when its own last token is produced (its E2E latency does not
  wait for the rest of the batch), which is kinder than FasterTransformer-style serving.
* Finite runs: past saturation the queue, and so the normalized latency, grows with the number of requests;
  the sustained rate is where the curve leaves the flat region, which depends little on it.
"""
    path = C.write_summary(out, text)
    C.print_summary(path, wall)


if __name__ == "__main__":
    main()
