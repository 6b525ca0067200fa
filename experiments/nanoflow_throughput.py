"""NanoFlow (arXiv:2408.12757) in the simulator: offline throughput against the compute-bound optimum
(issue 19, item 6).

    python experiments/nanoflow_throughput.py [--quick] [--num-requests 4000] [--jobs 2] [--out DIR]

Llama-2-70B on 8xA100-80GB (TP 8), offline: every request arrives at once (Poisson at 10^6 req/s), so
the batch is saturated and throughput (prompt + output tokens per second per GPU, NanoFlow's metric)
is what the scheduler and the step's execution allow. Workloads as NanoFlow §6.2: constant lengths
(512/512, 1024/512, 512/1024) and length distributions of real traces (Splitwise = the Azure 2023
conversation trace, ShareGPT; LMSYS-Chat-1M is not in ../shared/traces), trimmed to Llama-2's 4096
tokens. Systems:

* **vLLM**: ``configs/vllm.py`` (whole prompts first, 256 rows, 8192-token budget); the roofline.
* **Sarathi-Serve**: ``configs/sarathi.py`` (stall-free batching, 512-token chunks); the roofline.
* **NanoFlow batch**: ``configs/nanoflow.py``'s batch formation (a 2048-token dense batch, rows bound
  by the KV cache), each step unsplit on the roofline: what the batch alone buys.
* **NanoFlow**: the same batches nano-batched (``OverlapCostModel``) with the schedule the offline
  search (``nano_search``) picks for the workload's steady-state step, host time in series;
* **NanoFlow + async**: and the host's scheduling hidden under the device (async scheduling).

Optimum (NanoFlow Eq. 5): peak FLOP/s / (2 · parameters) per GPU, with the A100's datasheet bf16 peak
(312 TFLOP/s: 2261 tok/s/GPU for 69.0 B parameters); the paper divides by the peak CUTLASS measured
(1857 tok/s/GPU). Writes ``outputs/experiments/nanoflow_throughput/``: throughput.csv (every run),
schedules.csv (the searched schedule per workload and the steady-state step's times), throughput.png,
summary.md. ``--quick``: 300 requests, two workloads.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import _common as C
import matplotlib.pyplot as plt
import numpy as np

from jaxserve.sim.nano_search import search_schedule, steady_state_plan
from jaxserve.sim.overlap_cost_model import NanoSchedule, OverlapCostModel, sequential_ops_s
from jaxserve.sim.simulate import build_sim, run_sim

NAME = "nanoflow_throughput"
BASE = {"model.name": "llama-2-70b", "hardware.name": "a100-80gb", "hardware.tp": 8}
GPUS = 8
DENSE = 2048  # configs/nanoflow.py's token budget: NanoFlow's 70B dense batch
# label -> (configs/<name>.py, nano-batched, async scheduling)
SYSTEMS = {
    "vLLM": ("vllm", False, False),
    "Sarathi-Serve": ("sarathi", False, False),
    "NanoFlow batch": ("nanoflow", False, False),
    "NanoFlow": ("nanoflow", True, False),
    "NanoFlow + async": ("nanoflow", True, True),
}
COLORS = dict(zip(SYSTEMS, ("tab:blue", "tab:green", "tab:gray", "tab:orange", "tab:red")))
CONSTANT = {"512/512": (512, 512), "1024/512": (1024, 512), "512/1024": (512, 1024)}
TRACES = {"Splitwise": "vidur_processed/splitwise_conv.csv", "ShareGPT": C.SHAREGPT}
# NanoFlow's figures (arXiv:2408.12757 §6.2, Fig. 7): optimal 1857 tok/s/GPU from CUTLASS's measured
# peak; best case 68.5 % of it; over TensorRT-LLM 1.73x (constant lengths) and 1.91x (traces), over
# vLLM 2.62x and 4.18x. Ablation (§6.4, Fig. 9): nano-batching without overlap -13.2 %, overlap
# +1.07x (prefill-only) to +1.17x (decode-heavy).
PAPER_OPTIMAL, PAPER_FRACTION = 1857.0, 0.685
CTX: dict = {}  # set in main() before workers are forked


def workload_overrides(workload: str) -> dict:
    args = CTX["args"]
    out = C.poisson_workload(1.0e6, args.num_requests, seed=args.seed, lengths_path=CTX["lengths_paths"].get(workload))
    return out | (C.fixed_lengths(*CONSTANT[workload]) if workload in CONSTANT else {})


def simulate(item: tuple[str, str]) -> dict:
    workload, system = item
    policy, nano, asynchronous = SYSTEMS[system]
    overrides = {**BASE, **workload_overrides(workload)}
    t0 = time.process_time()
    run = build_sim(C.config_for(policy, overrides))
    schedule = CTX["schedules"][workload].schedule if nano else NanoSchedule()
    if nano or asynchronous:
        run = dataclasses.replace(run, cost_model=OverlapCostModel.like(run.cost_model, schedule, async_scheduling=asynchronous))
    results = run_sim(run)
    m, rm = results.metrics, C.request_metrics(results.log)
    tokens = int(np.sum((rm.prompt_len + rm.num_output)[rm.finished]))
    tok_s_gpu = tokens / m["makespan_s"] / GPUS
    return {"workload": workload, "system": system, "schedule": schedule.describe(), "async": asynchronous,
            "num_requests": m["num_requests"], "num_finished": m["num_finished"], "num_rejected": m["num_rejected"],
            "num_steps": m["num_steps"], "tokens": tokens, "makespan_s": m["makespan_s"], "tok_s_gpu": tok_s_gpu,
            "of_optimal": tok_s_gpu / CTX["optimal"], "of_paper_optimal": tok_s_gpu / PAPER_OPTIMAL,
            "cli": C.cli_command(policy, overrides), "cpu_s": time.process_time() - t0}  # fmt: skip


def mean_lengths(workload: str) -> tuple[float, float]:
    if workload in CONSTANT:
        return CONSTANT[workload]
    dist = CTX["lengths"][workload].dist
    return float(np.mean(dist.prompt_lens)), float(np.mean(dist.output_lens))


def search(workload: str, setup) -> dict:
    """The schedule for ``workload``'s steady-state step and that step's times on each execution."""
    prompt, output = mean_lengths(workload)
    plan = steady_state_plan(prompt, output, DENSE)
    found = search_schedule(setup.cost_model, [plan])
    CTX["schedules"][workload] = found
    nano = OverlapCostModel.like(setup.cost_model, found.schedule)
    asynchronous = OverlapCostModel.like(setup.cost_model, found.schedule, async_scheduling=True)
    step = {"kernel by kernel": sequential_ops_s(setup.cost_model, plan), "fused roofline": found.unsplit_s,
            "nano-batched": nano.step(plan).duration_s, "nano-batched + async": asynchronous.step(plan).duration_s}
    p = setup.cost_model.parts(plan)
    return {"workload": workload, "mean_prompt": prompt, "mean_output": output, "decode_rows": int(np.sum(plan.num_new_tokens == 1)),
            "schedule": found.schedule.describe(), "candidates": found.candidates,
            **{f"step_ms_{k.replace(' ', '_').replace('+', 'plus')}": v * 1e3 for k, v in step.items()},
            **{f"{f}_ms": getattr(p, f) * 1e3 for f in ("gemm_compute_s", "attn_compute_s", "weights_s", "act_s", "kv_s",
                                                        "comm_s", "comm_fixed_s", "host_s")},
            "steady_tok_s_gpu_nano_async": DENSE / step["nano-batched + async"] / GPUS}  # fmt: skip


def plot(rows: list[dict], workloads: list[str], path) -> None:
    fig, ax = plt.subplots(figsize=(1.9 * len(workloads) + 2.5, 4.2))
    width = 0.8 / len(SYSTEMS)
    x = np.arange(len(workloads))
    for i, system in enumerate(SYSTEMS):
        values = [next(r["of_optimal"] for r in rows if r["workload"] == w and r["system"] == system) for w in workloads]
        ax.bar(x + (i - (len(SYSTEMS) - 1) / 2) * width, np.array(values) * 100, width, label=system, color=COLORS[system])
    paper = PAPER_FRACTION * PAPER_OPTIMAL / CTX["optimal"] * 100
    ax.axhline(paper, color="k", ls="--", lw=1, label=f"NanoFlow paper, best ({PAPER_FRACTION:.1%} of 1857 = {paper:.0f} %)")
    ax.axhline(CTX["mfu"] * 100, color="k", ls=":", lw=1, label=f"our GEMM ceiling (mfu {CTX['mfu']:g})")
    ax.set_xticks(x, workloads)
    ax.set_ylabel(f"% of optimal ({CTX['optimal']:.0f} tok/s/GPU)")
    ax.set_ylim(0, 100)
    ax.set_title("Llama-2-70B, 8xA100-80GB, offline: throughput vs the compute-bound optimum", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    C.save_figure(fig, path)


def summary(rows: list[dict], searches: list[dict], workloads: list[str], args, wall_s: float) -> str:
    def get(workload, system):
        return next(r for r in rows if r["workload"] == workload and r["system"] == system)

    def mean_ratio(system, baseline, names):
        return float(np.exp(np.mean([np.log(get(w, system)["tok_s_gpu"] / get(w, baseline)["tok_s_gpu"]) for w in names])))

    constant = [w for w in workloads if w in CONSTANT]
    traces = [w for w in workloads if w not in CONSTANT]
    best = max((r for r in rows if r["system"] == "NanoFlow + async"), key=lambda r: r["tok_s_gpu"])
    lines = [
        "# NanoFlow in the simulator: offline throughput vs the compute-bound optimum", "",
        f"{CTX['setup'].describe()}.", "",
        f"Offline: {args.num_requests} requests arriving at once per run; throughput = prompt + output tokens of "
        f"finished requests / makespan / {GPUS} GPUs. Optimal (NanoFlow Eq. 5) = 312 TFLOP/s / (2 x "
        f"{CTX['params'] / 1e9:.1f} B) = {CTX['optimal']:.0f} tok/s/GPU (the paper: {PAPER_OPTIMAL:.0f}, from "
        "CUTLASS's measured peak).", "",
        "## Throughput (tok/s/GPU, % of our optimum)", "",
        "| workload | " + " | ".join(SYSTEMS) + " |", "|---|" + "---|" * len(SYSTEMS),
    ]
    for w in workloads:
        lines.append(f"| {w} | " + " | ".join(f"{get(w, s)['tok_s_gpu']:.0f} ({get(w, s)['of_optimal']:.1%})" for s in SYSTEMS) + " |")
    lines += ["", "## Against the paper", "", "| | paper (NanoFlow, arXiv:2408.12757) | ours |", "|---|---|---|"]
    for names, kind, trt, vllm in ((constant, "constant lengths", 1.73, 2.62), (traces, "traces", 1.91, 4.18)):
        if names:
            lines.append(f"| NanoFlow over the baseline, {kind} (geo. mean) | {trt}x over TensorRT-LLM, {vllm}x over vLLM | "
                         f"{mean_ratio('NanoFlow + async', 'vLLM', names):.2f}x over vLLM-style, "
                         f"{mean_ratio('NanoFlow + async', 'Sarathi-Serve', names):.2f}x over Sarathi-style |")
    lines += [
        f"| best case, % of optimal | {PAPER_FRACTION:.1%} of {PAPER_OPTIMAL:.0f} = {PAPER_FRACTION * PAPER_OPTIMAL:.0f} tok/s/GPU "
        f"| {best['of_paper_optimal']:.1%} of {PAPER_OPTIMAL:.0f} = {best['tok_s_gpu']:.0f} tok/s/GPU ({best['workload']}); "
        f"{best['of_optimal']:.1%} of our {CTX['optimal']:.0f} |",
        f"| overlap alone (nano-batched vs the same batches unsplit) | +1.07x to +1.17x | "
        + ", ".join(f"{w} {get(w, 'NanoFlow')['tok_s_gpu'] / get(w, 'NanoFlow batch')['tok_s_gpu']:.2f}x" for w in workloads) + " |",
        "| async scheduling | hides the host's batch formation | "
        + ", ".join(f"{w} {get(w, 'NanoFlow + async')['tok_s_gpu'] / get(w, 'NanoFlow')['tok_s_gpu']:.3f}x" for w in workloads) + " |",
        "", "## The searched schedule and the steady-state step", "",
        f"Per workload, the offline search (every nano-batch count 1-8 x attention and collective shares in 0.1 steps, "
        f"{searches[0]['candidates']} schedules) on the steady-state step of {DENSE} dense tokens; that step's time "
        "run kernel by kernel (nothing overlapped), on the fused roofline the baselines use, nano-batched, and with async scheduling.", "",
        "| workload | decode rows | schedule | kernel by kernel | fused roofline | nano-batched | + async | steady tok/s/GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in searches:
        lines.append(f"| {s['workload']} | {s['decode_rows']} | {s['schedule']} | {s['step_ms_kernel_by_kernel']:.1f} ms | "
                     f"{s['step_ms_fused_roofline']:.1f} ms | {s['step_ms_nano-batched']:.1f} ms | "
                     f"{s['step_ms_nano-batched_plus_async']:.1f} ms | {s['steady_tok_s_gpu_nano_async']:.0f} |")
    s0 = searches[0]
    lines += [
        "", "## Why our numbers differ from the paper's", "",
        f"* **Our baselines are stronger than the paper's.** The roofline charges a step max(FLOPs, bytes) as if its GEMMs "
        f"and attention were one fused kernel, at {CTX['mfu']:g} of peak for every GEMM whatever its shape, plus {CTX['overhead_ms']:g} ms "
        "of host time; real engines run kernel after kernel (attention's HBM time is not hidden under the GEMMs), "
        "lose GEMM efficiency at small batches, and pay launch overheads. Run kernel by kernel, the steady-state "
        f"step of {s0['workload']} takes {s0['step_ms_kernel_by_kernel']:.0f} ms instead of {s0['step_ms_fused_roofline']:.0f} ms. "
        "So our vLLM-style steps run near the GEMM ceiling when their batch is large and the paper's 2.6-4.2x over vLLM "
        "(1.7-1.9x over TensorRT-LLM) shrinks here to what overlap and batch formation add on top of an already ideal step.",
        "* **What is left to gain** is the collectives (hidden under the GEMMs on a share of the SMs: NanoFlow's curve "
        "gives a collective 40 % of its speed on 10 % of the SMs), attention's SM time (25 % of its speed on 10 %), "
        "the host time (async), and the dense batch itself (vLLM's 256-row cap leaves decode steps below the GEMMs' "
        "compute-bound size). The search charges the split its costs: every nano-batch reads the weights again and "
        "pays each collective's latency.",
        f"* **The ceiling.** Our GEMMs run at mfu {CTX['mfu']:g}, so no system exceeds {CTX['mfu']:.0%} of our optimum; "
        f"the paper's 68.5 % of 1857 is {PAPER_FRACTION * PAPER_OPTIMAL / CTX['optimal']:.1%} of our (datasheet) optimum. "
        "The hardware table's mfu 0.6 is itself derived partly from NanoFlow's 68.5 % (jaxserve/sim/hardware.py), so the "
        "absolute level is calibrated, not predicted; the ratios between systems are the model's.",
        "* **Not modelled:** the GEMM efficiency lost by splitting (the paper's nano-batching-only ablation: -13.2 %), "
        "shares that change within a layer (NanoFlow's Stage II), KV offload, TensorRT-LLM itself (no engine model of "
        "it: vLLM-style and Sarathi-style steps stand in), LMSYS-Chat-1M (not in ../shared/traces). Async scheduling "
        "does not charge the first step's host time (one per busy period: a few ms in a run of minutes).",
        "", f"Every run is a config: e.g. `{get(workloads[0], 'NanoFlow + async')['cli']}` (then the cost model above). "
        f"Command: `{C.command_line()}`; {wall_s:.0f} s wall.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run: 300 requests, two workloads")
    parser.add_argument("--num-requests", type=int, default=4000, help="requests per run (all arriving at once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=min(2, C.default_jobs()))
    parser.add_argument("--out", default=None, help="output folder (default outputs/experiments/" + NAME + ")")
    args = parser.parse_args()
    workloads = list(CONSTANT) + list(TRACES)
    if args.quick:
        args.num_requests = min(args.num_requests, 300)
        workloads = ["512/512", "Splitwise"]
    t0 = time.perf_counter()
    out = C.output_dir(NAME, args.out)
    setup = C.setup_for(C.config_for("nanoflow", BASE))
    traces = [w for w in workloads if w in TRACES]
    lengths = {w: C.load_lengths(TRACES[w], setup.max_context) for w in traces}
    peak = setup.cost_model.hardware.peak_flops(setup.cost_model.dtype)
    params = setup.cost_model.model.num_params
    CTX.update(args=args, setup=setup, lengths=lengths, lengths_paths={w: C.lengths_file(lengths[w], out) for w in traces},
               optimal=peak / (2 * params), params=params, mfu=setup.cost_model.mfu,
               overhead_ms=setup.cost_model.step_overhead_s * 1e3, schedules={})  # fmt: skip
    C.console.print(f"[bold]{setup.describe()}[/bold]")
    for w in traces:
        C.console.print(f"{w}: {lengths[w].describe()}")
    searches = [search(w, setup) for w in workloads]  # before the workers fork: they read CTX["schedules"]
    rows = C.parallel_map(simulate, [(w, s) for w in workloads for s in SYSTEMS], jobs=args.jobs,
                          description="offline runs", label=lambda it: f"{it[0]} / {it[1]}")
    C.write_csv(out / "throughput.csv", rows)
    C.write_csv(out / "schedules.csv", searches)
    plot(rows, workloads, out / "throughput.png")
    path = C.write_summary(out, summary(rows, searches, workloads, args, time.perf_counter() - t0))
    C.print_summary(path, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
