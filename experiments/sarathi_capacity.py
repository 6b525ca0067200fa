"""Sarathi-Serve (OSDI'24) capacity: max QPS under a P99-TBT SLO for Orca, vLLM and Sarathi-Serve.

    python experiments/sarathi_capacity.py [--quick]

Mistral-7B on one simulated A100-80GB, ShareGPT and arXiv-summarization lengths (Sarathi-Serve's
processed files), Poisson arrivals. Capacity (Sarathi-Serve's definition) = the highest request rate
at which the P99 time-between-tokens stays under the SLO and the median scheduling delay (arrival to
first scheduled) stays under 2 s, found by bisection with ``jaxserve.metrics.search_max_rate``; the
TBT-only search of ``jaxserve.metrics.capacity`` is reported next to it. Also plots the generation
stall picture: one decode request's token gaps while long prompts arrive, under vLLM vs Sarathi.
Writes ``outputs/experiments/sarathi_capacity/``: capacity.csv, evaluations.csv, stall.csv,
capacity.png, stall.png, summary.md.
"""

from __future__ import annotations

import argparse
import time

import _common as C
import numpy as np

from jaxserve.metrics import capacity, search_max_rate

NAME = "sarathi_capacity"
SCHEDULERS = {  # label -> (configs/<name>.py, overrides)
    "Orca": ("orca", {}),
    "vLLM": ("vllm", {}),
    "Sarathi-512": ("sarathi", {"scheduler.chunk_size": 512}),
    "Sarathi-2048": ("sarathi", {"scheduler.chunk_size": 2048}),
}
COLORS = {"Orca": "tab:orange", "vLLM": "tab:blue", "Sarathi-512": "tab:green", "Sarathi-2048": "tab:olive"}
DATASETS = {"ShareGPT": C.SHAREGPT, "arXiv-Summarization": C.ARXIV}
PAPER = "Sarathi-Serve paper: up to 2.6x the capacity of vLLM for Mistral-7B on one A100 (strict SLO)"

CTX: dict = {}  # set in main() before workers are forked


def point(label: str, dataset: str, rate: float, num_requests: int) -> tuple[str, dict]:
    """(policy config, overrides) of one point: the model and hardware, ``label``'s scheduler
    options, Poisson arrivals with ``dataset``'s lengths (keys ``python -m jaxserve.experiment`` takes)."""
    policy, options = SCHEDULERS[label]
    workload = C.poisson_workload(rate, num_requests, seed=CTX["args"].seed, lengths_path=DATASETS[dataset])
    return policy, {**CTX["base"], **options, **workload}


def run_config(label: str, dataset: str, rate: float, num_requests: int):
    return C.config_for(*point(label, dataset, rate, num_requests))


def evaluate(dataset: str, label: str, rate: float, memo: dict) -> dict:
    key = round(rate, 6)
    if key not in memo:
        args = CTX["args"]
        result = C.run(run_config(label, dataset, rate, args.num_requests))
        memo[key] = {"dataset": dataset, "scheduler": label, "rate_req_s": rate, **C.flat_metrics(result.metrics),
                     "wall_s": result.wall_s}
    return memo[key]


def search_pair(item):
    """Capacity of one scheduler on one dataset under every SLO (one memo: shared simulations)."""
    dataset, label = item
    args, memo = CTX["args"], {}
    out = []
    for slo_name, slo in CTX["slos"].items():
        def passes(rate, slo=slo):
            m = evaluate(dataset, label, rate, memo)
            return m["tbt_s_p99"] <= slo and m["queueing_s_p50"] <= args.max_sched_delay

        full = search_max_rate(passes, args.low, args.high, rel_tol=args.rel_tol)
        # jaxserve.metrics.capacity: the same search on P99 TBT alone (evaluate -> summarize-like dict).
        tbt_only = capacity(lambda r: {"tbt_s": {"p99": evaluate(dataset, label, r, memo)["tbt_s_p99"]}},
                            slo, args.low, args.high, rel_tol=args.rel_tol)
        out.append({"dataset": dataset, "scheduler": label, "slo": slo_name, "p99_tbt_slo_s": slo,
                    "capacity_req_s": full.rate, "capacity_tbt_only_req_s": tbt_only.rate,
                    "hit_search_ceiling": full.rate >= args.high,
                    "tried": " ".join(f"{r:.3g}:{'ok' if ok else 'fail'}" for r, ok in full.tried)})
    return out, list(memo.values())


def stall_run(label):
    args = CTX["args"]
    return C.run(run_config(label, args.stall_dataset, args.stall_rate, args.stall_requests)).log


def pick_victim(log, min_output: int) -> int:
    """The first request that arrives after 40 % of the arrivals and generates >= min_output tokens."""
    outputs = np.bincount(log.token_req, minlength=log.num_requests)
    start = int(0.4 * log.num_requests)
    for i in range(start, log.num_requests):
        if outputs[i] >= min_output:
            return i
    return int(np.argmax(outputs))


def token_times(log, i: int) -> np.ndarray:
    return np.sort(log.token_time_s[log.token_req == i])


def plot_capacity(rows, path, slos):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(12, 4.6), sharey=False)
    labels = list(SCHEDULERS)
    width = 0.8 / len(labels)
    for ax, dataset in zip(axes, DATASETS):
        top = 0.0
        for j, label in enumerate(labels):
            vals = []
            for k, slo_name in enumerate(slos):
                row = next(r for r in rows if r["dataset"] == dataset and r["scheduler"] == label and r["slo"] == slo_name)
                vals.append(row["capacity_req_s"])
            x = np.arange(len(slos)) + (j - (len(labels) - 1) / 2) * width
            bars = ax.bar(x, vals, width, color=COLORS[label], label=label)
            for b, v in zip(bars, vals):
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 1), textcoords="offset points")
            top = max(top, max(vals))
        ax.set_xticks(np.arange(len(slos)))
        ax.set_xticklabels([f"{n}\nP99 TBT <= {s * 1e3:.0f} ms" for n, s in slos.items()])
        ax.set_ylabel("capacity (req/s)")
        ax.set_ylim(0, top * 1.18 + 1e-9)
        ax.set_title(dataset)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    setup = CTX["setup"]
    fig.suptitle(f"Capacity: max Poisson rate with P99 TBT under the SLO and median scheduling delay <= "
                 f"{CTX['args'].max_sched_delay:g} s ({setup.model}, 1x {setup.hardware})", fontsize=11)
    fig.tight_layout()
    C.save_figure(fig, path)


def plot_stall(stall, path, slos):
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    victim = next(iter(stall.values()))
    t0 = victim["arrival_s"]
    top = max(slos.values())
    for label, s in stall.items():
        gaps = np.diff(s["times"])
        top = max(top, gaps.max())
        # each gap drawn over the interval the request waited: [token k, token k+1)
        ax.step(s["times"][:-1] - t0, gaps * 1e3, where="post", color=COLORS[label], lw=1.1,
                label=f"{label}: max gap {gaps.max() * 1e3:.0f} ms, {len(gaps)} gaps")
    for (name, slo), ls in zip(slos.items(), ("--", ":")):
        ax.axhline(slo * 1e3, color="k", ls=ls, lw=0.9, label=f"{name} P99 TBT SLO {slo * 1e3:.0f} ms")
    ax.set_yscale("log")
    ax.set_ylim(top=top * 1e3 * 4)
    ax.set_ylabel("time between tokens (ms, log)")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"Generation stalls: request {victim['request_id']} ({victim['prompt_len']} prompt, "
                 f"{len(victim['times'])} output tokens), {CTX['args'].stall_dataset} at {CTX['args'].stall_rate:g} req/s")
    # other requests' arrivals in the window, sized by prompt length
    arr, plen = victim["others_arrival"] - t0, victim["others_prompt"]
    end = max(s["times"][-1] for s in stall.values()) - t0
    keep = (arr >= 0) & (arr <= end)
    ax2.scatter(arr[keep], plen[keep], s=14, color="tab:red", label="arrivals of other requests (prompt length)")
    ax2.set_ylabel("prompt (tokens)")
    ax2.set_ylim(0, max(plen[keep].max() if keep.any() else 1, 1) * 1.25)
    ax2.set_xlabel(f"time since request {victim['request_id']} arrived (s)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    C.save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run")
    parser.add_argument("--model", default="mistral-7b")
    parser.add_argument("--hardware", default="a100-80gb")
    parser.add_argument("--slo-strict", type=float, default=0.1, help="strict P99 TBT SLO (s)")
    parser.add_argument("--slo-relaxed", type=float, default=0.5, help="relaxed P99 TBT SLO (s)")
    parser.add_argument("--max-sched-delay", type=float, default=2.0, help="median scheduling delay bound (s)")
    parser.add_argument("--num-requests", type=int, default=1000, help="requests per simulated rate")
    parser.add_argument("--low", type=float, default=0.05, help="search floor (req/s)")
    parser.add_argument("--high", type=float, default=8.0, help="search ceiling (req/s)")
    parser.add_argument("--rel-tol", type=float, default=0.03)
    parser.add_argument("--stall-dataset", default="arXiv-Summarization", choices=list(DATASETS))
    parser.add_argument("--stall-rate", type=float, default=1.0, help="req/s of the stall picture's run")
    parser.add_argument("--stall-requests", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=C.default_jobs())
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.num_requests = min(args.num_requests, 250)
        args.rel_tol = max(args.rel_tol, 0.15)
        args.stall_requests = min(args.stall_requests, 150)
    t0 = time.perf_counter()
    out = C.output_dir(NAME, args.out)

    base = {"model.name": args.model, "hardware.name": args.hardware}
    setup = C.setup_for(C.config_for("vllm", base))
    lengths = {name: C.load_lengths(path) for name, path in DATASETS.items()}  # for the summary
    slos = {"strict": args.slo_strict, "relaxed": args.slo_relaxed}
    CTX.update(setup=setup, base=base, args=args, slos=slos)
    C.console.print(f"[bold]{setup.describe()}[/bold]")

    pairs = [(d, s) for d in DATASETS for s in SCHEDULERS]
    results = C.parallel_map(search_pair, pairs, jobs=args.jobs, description="capacity searches",
                             label=lambda p: f"{p[1]} on {p[0]}")
    cap_rows = [r for rows, _ in results for r in rows]
    evals = sorted((e for _, es in results for e in es), key=lambda e: (e["dataset"], e["scheduler"], e["rate_req_s"]))
    C.write_csv(out / "capacity.csv", cap_rows)
    C.write_csv(out / "evaluations.csv", evals)
    plot_capacity(cap_rows, out / "capacity.png", slos)

    # -- generation stalls --------------------------------------------------------------------------
    stall_labels = ["vLLM", "Sarathi-512"]
    logs = C.parallel_map(stall_run, stall_labels, jobs=args.jobs, description="stall runs", label=str)
    victim = pick_victim(logs[0], 256)
    stall, stall_rows = {}, []
    for label, log in zip(stall_labels, logs):
        times = token_times(log, victim)
        others = np.arange(log.num_requests) != victim
        stall[label] = {"times": times, "request_id": log.requests[victim].request_id,
                        "arrival_s": float(log.arrival_s[victim]),
                        "prompt_len": int(log.prompt_len[victim]),
                        "others_arrival": log.arrival_s[others], "others_prompt": log.prompt_len[others]}
        gaps = np.diff(times)
        stall_rows += [{"scheduler": label, "request_id": log.requests[victim].request_id, "token": k + 1,
                        "time_s": times[k + 1], "gap_s": g} for k, g in enumerate(gaps)]
    C.write_csv(out / "stall.csv", stall_rows)
    plot_stall(stall, out / "stall.png", slos)

    # -- summary --------------------------------------------------------------------------------
    def cap(dataset, label, slo, key="capacity_req_s"):
        return next(r[key] for r in cap_rows if r["dataset"] == dataset and r["scheduler"] == label and r["slo"] == slo)

    table = []
    for dataset in DATASETS:
        for label in SCHEDULERS:
            cells = " | ".join(f"{cap(dataset, label, s):.2f} ({cap(dataset, label, s, 'capacity_tbt_only_req_s'):.2f})"
                               for s in slos)
            table.append(f"| {dataset} | {label} | {cells} |")
    headline = []
    for dataset in DATASETS:
        best = max(("Sarathi-512", "Sarathi-2048"), key=lambda s: cap(dataset, s, "strict"))
        headline.append(f"{dataset}: {best} / vLLM = {C.fmt_ratio(cap(dataset, best, 'strict'), cap(dataset, 'vLLM', 'strict'))}"
                        f" ({cap(dataset, best, 'strict'):.2f} vs {cap(dataset, 'vLLM', 'strict'):.2f} req/s)")
    relaxed = [f"{d}: {C.fmt_ratio(max(cap(d, 'Sarathi-512', 'relaxed'), cap(d, 'Sarathi-2048', 'relaxed')), cap(d, 'vLLM', 'relaxed'))}"
               for d in DATASETS]
    ceiling = [f"{r['scheduler']} on {r['dataset']} ({r['slo']})" for r in cap_rows if r["hit_search_ceiling"]]
    sgaps = {label: np.diff(s["times"]) for label, s in stall.items()}
    cm = setup.cost_model

    def chunk_ms(n):  # GEMM time of an n-token step plus the fixed overhead (attention excluded)
        return (n * cm.model.linear_flops_per_token() / (cm.hardware.peak_flops(cm.dtype) * cm.mfu)
                + cm.step_overhead_s) * 1e3

    sarathi_ceiling = [r for r in cap_rows if r["scheduler"].startswith("Sarathi")
                       and r["capacity_tbt_only_req_s"] >= args.high]
    def at_capacity(dataset, label, slo):
        rate = cap(dataset, label, slo)
        return next(e for e in evals if e["dataset"] == dataset and e["scheduler"] == label
                    and abs(e["rate_req_s"] - rate) < 1e-9)

    notes = []
    for dataset in DATASETS:
        small, big = cap(dataset, "Sarathi-512", "relaxed"), cap(dataset, "Sarathi-2048", "relaxed")
        if big < small:
            e_small, e_big = at_capacity(dataset, "Sarathi-512", "relaxed"), at_capacity(dataset, "Sarathi-2048", "relaxed")
            notes.append(
                f"* On {dataset} the 2048-token budget does not beat 512 even under the relaxed SLO ({big:.2f} vs "
                f"{small:.2f} req/s): bigger chunks make every decode step longer, so more requests are decoding at once "
                f"(Little's law), the KV cache fills (peak use {e_big['peak_kv_usage']:.2f} vs {e_small['peak_kv_usage']:.2f} "
                f"at capacity), admission waits for blocks and decode steps become KV-read-bound; the median scheduling "
                f"delay, not the TBT, binds.")
        if cap(dataset, "Orca", "relaxed") > 1.1 * cap(dataset, "vLLM", "relaxed"):
            notes.append(
                f"* On {dataset} Orca beats vLLM under the relaxed SLO ({cap(dataset, 'Orca', 'relaxed'):.2f} vs "
                f"{cap(dataset, 'vLLM', 'relaxed'):.2f} req/s): with Mistral-7B's 470k-token KV cache Orca's full "
                f"reservation costs nothing, and Orca runs decodes in the same step as a new prompt while vLLM's "
                f"prefill-first steps skip every decode, for several steps in a row when prompts queue up.")
    d1 = setup.decode_step_s(1, 1024)
    d32 = setup.decode_step_s(32, 4096)
    wall = time.perf_counter() - t0
    text = f"""# Sarathi-Serve: capacity under a P99 TBT SLO (Orca, vLLM, Sarathi-Serve)

Command: `{C.command_line()}` ({wall:.0f} s wall on {args.jobs} process(es)).

## Setup
* {setup.describe()}.
* Lengths (whole files; every request fits Mistral-7B's context and the KV cache):
  * ShareGPT: {lengths['ShareGPT'].describe()}.
  * arXiv-Summarization: {lengths['arXiv-Summarization'].describe()}.
* Poisson arrivals, {args.num_requests} requests per simulated rate (seed {args.seed}: the same draws at every
  rate, rescaled in time). Every point is a config; e.g. Sarathi-512 on ShareGPT at 1 req/s:
  `{C.cli_command(*point("Sarathi-512", "ShareGPT", 1.0, args.num_requests))}`.
* Schedulers: `orca` (whole prompts, full KV reservation), `vllm` (prefill-first, paged, recompute
  preemption), `sarathi` with token budget (chunk) 512 and 2048 (stall-free: decodes first, chunked prefills);
  max_num_seqs 256, whole-prompt policies max_num_batched_tokens 8192.
* SLOs: strict P99 TBT <= {args.slo_strict * 1e3:.0f} ms, relaxed <= {args.slo_relaxed * 1e3:.0f} ms. These are the
  Mistral-7B values as we recall them from Sarathi-Serve's table (≈, not checked against the paper); the paper
  derives its SLOs as 5x (strict) and 25x (relaxed) a decode iteration's latency. In this simulator one decode
  iteration takes {d1 * 1e3:.1f} ms at batch 1 (1k context) and {d32 * 1e3:.1f} ms at batch 32 (4k context each),
  so 5x / 25x of those span {5 * d1 * 1e3:.0f}-{5 * d32 * 1e3:.0f} ms / {25 * d1 * 1e3:.0f}-{25 * d32 * 1e3:.0f} ms:
  the values used sit inside that range. Override with `--slo-strict/--slo-relaxed`.
* Capacity = the highest rate with P99 TBT (over every inter-token gap of every request) <= SLO **and** median
  scheduling delay <= {args.max_sched_delay:g} s (Sarathi-Serve's definition), by `search_max_rate` on
  [{args.low:g}, {args.high:g}] req/s (rel. tol. {args.rel_tol}). In brackets: `jaxserve.metrics.capacity`,
  which checks P99 TBT only.

## Result: capacity (req/s), in brackets the TBT-only `metrics.capacity`
| dataset | scheduler | strict | relaxed |
|---|---|---|---|
{chr(10).join(table)}

**Headline (strict SLO): {'; '.join(headline)}.** {PAPER}.
Relaxed SLO, best Sarathi / vLLM: {'; '.join(relaxed)}.
{('Searches that hit the ceiling of ' + format(args.high, 'g') + ' req/s: ' + ', '.join(ceiling) + '.') if ceiling else ''}
{chr(10).join(notes)}

![capacity](capacity.png)

### Generation stalls
{args.stall_dataset} lengths at {args.stall_rate:g} req/s ({args.stall_requests} requests); request
{stall['vLLM']['request_id']} (the first after 40 % of arrivals with >= 256 output tokens). Its largest token gap is
{sgaps['vLLM'].max() * 1e3:.0f} ms under vLLM ({int((sgaps['vLLM'] > args.slo_strict).sum())} of {len(sgaps['vLLM'])} gaps
over the strict SLO) and {sgaps['Sarathi-512'].max() * 1e3:.0f} ms under Sarathi-512
({int((sgaps['Sarathi-512'] > args.slo_strict).sum())} over): under vLLM every arriving prompt is prefilled in a step
of its own while all decodes wait; Sarathi-Serve mixes at most 512 prompt tokens into each decode step.

![stalls](stall.png)

## Why it may differ from the paper
* **Roofline cost model, no kernels**: a step costs 4 ms + max(FLOPs / (312 TF x 0.6), bytes / (2039 GB/s x 0.8)).
  A 512-token step is compute-bound at ~{chunk_ms(512):.0f} ms and a 2048-token one at ~{chunk_ms(2048):.0f} ms (GEMMs + overhead);
  real chunked prefills pay extra for re-reading the KV prefix and for tile misalignment, and real
  prefill-only steps have different efficiency than a fixed MFU. Both change where the TBT tails sit.
* **SLO values**: see Setup; capacity ratios move a lot with the SLO because vLLM's P99 TBT is set by
  its prefill stalls (hundreds of ms for multi-thousand-token prompts), so under a strict SLO its capacity is the
  rate at which fewer than 1 % of gaps contain a prefill.
* **vLLM configuration**: the paper tunes vLLM's max batch size (32/64/128) and uses its own prefill limit;
  here vLLM runs with max_num_seqs 256 and batches up to 8192 prefill tokens per step (bigger stalls).
* **Finite runs**: {args.num_requests} requests per point; the scheduling-delay bound is what limits
  Sarathi-Serve (its TBT tail stays near the chunk's step time at any load{'; its TBT-only capacity in brackets hits the search ceiling in ' + str(len(sarathi_ceiling)) + ' of ' + str(sum(r['scheduler'].startswith('Sarathi') for r in cap_rows)) + ' Sarathi cases' if sarathi_ceiling else ''}),
  and a finite queue's median delay depends on the run length.
* Mistral-7B's sliding-window attention (4096) is not modelled; with these lengths (<= 8.2k tokens) it matters
  only for the longest ShareGPT conversations.
"""
    path = C.write_summary(out, text)
    C.print_summary(path, wall)


if __name__ == "__main__":
    main()
