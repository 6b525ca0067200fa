"""Splitwise (ISCA'24) on simulated DGX-A100 and DGX-H100 machines: the paper's cluster designs compared
by throughput, cost and power at iso-cost and iso-power (issue 17, items 4 and 6).

    python experiments/splitwise_designs.py [--quick] [--machines 6] [--mixed 1] [--duration-s 60] [--cap-fraction 0.7]

Llama-2-70B, one TP-8 instance per 8-GPU machine (``configs/splitwise.py``). Designs (Splitwise §5):
Baseline-A100 / Baseline-H100 (every machine runs both phases), Splitwise-AA / -HH / -HA (prompt machines
``cluster.pools.prefill`` hand the KV layer by layer over InfiniBand to token machines
``cluster.pools.decode``; HA: H100 prompt, A100 token machines) and Splitwise-HHcap (H100 token machines
power-capped). Every split design also has ``--mixed`` machines of the token type that take arrivals
under join-the-shortest-queue routing and the handoffs no token machine has room for: our stand-in for
Splitwise's mixed pool, whose machines its cluster scheduler repurposes between phases at run time.

Workload: a window of the Azure 2023 conversation trace (Splitwise's; the code trace is not in
../shared/traces), requests longer than Llama-2's 4096-token context dropped, rescaled in rate
(``workload.qps``; a run at rate r serves r x ``--duration-s`` requests); without ../shared the shipped
first 10 minutes. SLOs as Splitwise sets them: the P50 / P90 / P99 of each request's TTFT, TBT and E2E
slowdown against its own latency unloaded on one Baseline-A100 machine (one run of the window at
``--unloaded-rate``) within Splitwise's factors. A design's throughput is the highest rate meeting all
nine (``metrics.search_max_rate``). Provisioning: the $/hour (iso-cost) and the rated power
(iso-power) of ``--machines`` Baseline-A100 machines; per design every maximal (prompt, token) machine
count within the budget is searched and the best kept.

Writes ``outputs/experiments/splitwise_designs/``: designs.csv (per design and budget), runs.csv (every
simulation), trace_window.csv, designs.png, summary.md. ``--quick``: 3 machines, 15 s of arrivals per run,
coarse bisection. ``--router``: arrivals' router (default Splitwise's JSQ, ``shortest_queue``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import resource
import time
from typing import NamedTuple, Optional

import _common as C
import numpy as np

from jaxserve.cluster.config import build_cluster_sim, run_cluster_sim
from jaxserve.metrics import distribution, request_metrics, search_max_rate
from jaxserve.sim.hardware import get_hardware
from jaxserve.workload import read_trace, resolve_trace_path

NAME = "splitwise_designs"
POLICY = "splitwise"  # configs/splitwise.py
CONV_TRACE = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
SAMPLE_TRACE = "sample:azure_conv_2023_first_10min.csv"
CONTEXT = 4096  # Llama-2-70B's max_position_embeddings
GPUS = 8  # per machine: DGX-A100 and DGX-H100 both hold 8 GPUs

# Splitwise's SLOs: slowdown against the request unloaded on a DGX-A100, per percentile (P50, P90, P99).
# SplitwiseSim (github.com/Mutinifni/splitwise-sim, the paper's simulator) notebooks/plots.ipynb, get_slo:
# TTFT 2 / 3 / 6, TBT and E2E 1.25 / 1.5 / 5. Splitwise's TBT of a request is its mean gap between tokens,
# (E2E - TTFT) / tokens (SplitwiseSim metrics), i.e. our tpot_s.
PERCENTILES = ("p50", "p90", "p99")
SLO_FACTORS = {"ttft": (2.0, 3.0, 6.0), "tbt": (1.25, 1.5, 5.0), "e2e": (1.25, 1.5, 5.0)}
METRIC_KEYS = {"ttft": "ttft_s", "tbt": "tpot_s", "e2e": "e2e_s"}

# Rated machine power: NVIDIA DGX A100 datasheet "6.5 kW max", DGX H100 datasheet "~10.2 kW max"; the
# same figures are SplitwiseSim's configs/hardware_repo/skus/dgx-a100.yaml (tdp 6500) and dgx-h100.yaml
# (tdp 10200).
DGX_A100_W, DGX_H100_W = 6500.0, 10200.0
# Splitwise-HHcap caps each token machine at 70 % of its rated power: SplitwiseSim dgx-h100-pcap.yaml
# (tdp 7140 = 0.7 x 10200) and notebooks/utils.py splitwise_hhcap_config(power_cap_scaler=0.7).
CAP_FRACTION = 0.7
# KV links (jaxserve/cluster/kv_transfer.py): a DGX A100 has one 200 Gb/s HDR ConnectX-6 per GPU (DGX
# A100 datasheet), a DGX H100 one 400 Gb/s NDR ConnectX-7 (DGX H100 datasheet); the slower end bounds it.
LINK_A100, LINK_H100 = "infiniband-hdr", "infiniband-ndr"
BRACKET = (0.5, 16.0)  # the rate search's bracket, req/s per machine (an H100 prompt machine passes ~12)
CTX: dict = {}  # set in main() before workers are forked


# -- machines, designs, candidates -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Machine:
    """An 8-GPU machine running one TP-8 instance: its GPU (``hardware.name``), rated power (W) and the
    fraction of it a cap holds it to (1: uncapped)."""

    label: str
    hardware: str
    rated_w: float
    cap_fraction: float = 1.0

    @property
    def gpu_cap_w(self) -> Optional[float]:
        """The per-GPU cap (``hardware.power_cap_w``) that takes the machine to its capped power, the
        rest of the machine drawing as before: TDP - (1 - f) * rated / 8. None when uncapped."""
        if self.cap_fraction >= 1.0:
            return None
        return get_hardware(self.hardware).power_max_w - (1.0 - self.cap_fraction) * self.rated_w / GPUS

    @property
    def power_w(self) -> float:
        return self.rated_w * self.cap_fraction

    @property
    def usd_per_hour(self) -> float:
        return get_hardware(self.hardware).price_per_hour_usd * GPUS


@dataclasses.dataclass(frozen=True)
class Design:
    """One of Splitwise's cluster designs: prompt and token machine types, whether the phases are split
    (baselines run both on every machine) and the KV link."""

    name: str
    prompt: Machine
    token: Machine
    split: bool
    link: str = ""


class Candidate(NamedTuple):
    """A design with machine counts: ``prompt`` prefill, ``token`` decode and ``mixed`` machines (a
    baseline's machines are all mixed)."""

    design: Design
    prompt: int
    token: int
    mixed: int

    @property
    def machines(self) -> int:
        return self.prompt + self.token + self.mixed

    @property
    def usd_per_hour(self) -> float:
        d = self.design
        return self.prompt * d.prompt.usd_per_hour + (self.token + self.mixed) * d.token.usd_per_hour

    @property
    def power_w(self) -> float:
        d = self.design
        return self.prompt * d.prompt.power_w + (self.token + self.mixed) * d.token.power_w

    def describe(self) -> str:
        if not self.design.split:
            return f"{self.mixed} x {self.design.token.label}"
        return f"{self.prompt}P {self.design.prompt.label} + {self.token}T {self.design.token.label} + {self.mixed}M"


def designs(cap_fraction: float) -> tuple[Design, ...]:
    a100 = Machine("A100", "a100-80gb", DGX_A100_W)
    h100 = Machine("H100", "h100-sxm", DGX_H100_W)
    cap = Machine(f"H100cap{cap_fraction:g}", "h100-sxm", DGX_H100_W, cap_fraction)
    return (Design("Baseline-A100", a100, a100, False), Design("Baseline-H100", h100, h100, False),
            Design("Splitwise-AA", a100, a100, True, LINK_A100), Design("Splitwise-HH", h100, h100, True, LINK_H100),
            Design("Splitwise-HA", h100, a100, True, LINK_A100), Design("Splitwise-HHcap", h100, cap, True, LINK_H100))  # fmt: skip


def candidates(design: Design, budget: float, measure: str, mixed: int) -> list[Candidate]:
    """Every maximal machine count of ``design`` whose ``measure`` ("usd_per_hour" | "power_w") fits
    ``budget``: a baseline's largest count; a split design's (prompt >= 1, token >= 0) pairs, with
    ``mixed`` machines of the token type and at least one decode-capable machine, to which neither one
    more prompt nor one more token machine can be added."""

    def fits(c: Candidate) -> bool:
        return getattr(c, measure) <= budget * (1 + 1e-9)

    if not design.split:
        n = int(budget * (1 + 1e-9) // getattr(Candidate(design, 0, 0, 1), measure))
        return [Candidate(design, 0, 0, n)] if n else []
    out = []
    for prompt in range(1, 1000):
        if not fits(Candidate(design, prompt, 0, mixed)):
            break
        token = 0
        while fits(Candidate(design, prompt, token + 1, mixed)):
            token += 1
        if token + mixed and not fits(Candidate(design, prompt + 1, token, mixed)):
            out.append(Candidate(design, prompt, token, mixed))
    return out


def overrides(c: Candidate, router: str = "shortest_queue") -> dict:
    """``configs/splitwise.py`` overrides deploying ``c`` (prompt machines first, then token, then mixed)
    with arrivals routed by ``router``."""
    d = c.design
    out = {"cluster.num_replicas": c.machines, "cluster.pools.prefill": c.prompt, "cluster.pools.decode": c.token,
           "hardware.name": d.token.hardware, "hardware.power_cap_w": d.token.gpu_cap_w,
           "cluster.pools.prefill_overrides": "", "cluster.router": router}  # fmt: skip
    if d.split:
        out["cluster.pools.prefill_overrides"] = f"hardware.name={d.prompt.hardware},hardware.power_cap_w=none"
        out["cluster.pools.link"] = d.link
    return out


# -- workload ------------------------------------------------------------------------------------------
def trace_window(path: str, start_s: float, num_requests: int, out) -> tuple[str, int, str]:
    """The first ``num_requests`` requests of ``path`` arriving from ``start_s`` on whose prompt + output
    fit Llama-2's context, written to ``out`` as a Vidur-format trace: (its path, its size, a description)."""
    trace = read_trace(resolve_trace_path(path))
    arrival, prompt, output = trace.arrival_s, trace.prompt_len, trace.output_len
    after = arrival >= start_s
    fit = after & (prompt + output <= CONTEXT)
    keep = np.flatnonzero(fit)[:num_requests]
    if len(keep) < 2:
        raise SystemExit(f"--start-s {start_s}: fewer than 2 requests of {path} arrive after it and fit {CONTEXT} tokens")
    dropped = int((after[: keep[-1] + 1] & ~fit[: keep[-1] + 1]).sum())
    file = out / "trace_window.csv"
    C.write_csv(file, ({"arrived_at": float(arrival[i] - arrival[keep[0]]), "num_prefill_tokens": int(prompt[i]),
                        "num_decode_tokens": int(output[i])} for i in keep))  # fmt: skip
    span = arrival[keep[-1]] - arrival[keep[0]]
    p, o = prompt[keep], output[keep]
    text = (f"`{path}` from {start_s:g} s: {len(keep):,} requests fitting {CONTEXT:,} tokens ({dropped} longer ones dropped), "
            f"{span:.0f} s of the trace at {len(keep) / span:.2f} req/s; prompt mean {p.mean():.0f} / median "
            f"{np.median(p):.0f}, output mean {o.mean():.0f} / median {np.median(o):.0f} tokens")
    return str(file), len(keep), text


def requests_at(rate: float) -> int:
    """Requests of a run at ``rate``: ``--duration-s`` seconds of arrivals, at most the window."""
    return int(min(CTX["window_size"], max(2, math.ceil(rate * CTX["args"].duration_s))))


# -- simulation ----------------------------------------------------------------------------------------
def simulate(c: Candidate, rate: float, num_requests: int):
    """Runs ``c`` on the window's first ``num_requests`` requests rescaled to ``rate`` req/s: (metrics,
    per-request metrics, each request's window row, the GPUs' energy in J, idle time between steps included)."""
    workload = {"workload.trace_path": CTX["window"], "workload.trace_format": "vidur",
                "workload.max_requests": num_requests, "workload.qps": float(rate)}  # fmt: skip
    sim = build_cluster_sim(C.config_for(POLICY, {**overrides(c, CTX["args"].router), **workload}))
    res = run_cluster_sim(sim)
    m, rm = res.metrics, request_metrics(res.log)
    rows = np.array([int(rid.rsplit("-", 1)[1]) for rid in rm.request_id])  # ids are '<client>-<window row>'
    return m, rm, rows, m["energy_total_j"] if m["energy_total_j"] is not None else math.nan


def unloaded_latencies(c: Candidate, rate: float) -> dict[str, np.ndarray]:
    """Each window request's TTFT, TBT (mean gap between its tokens) and E2E, by window row, from one run
    of ``c`` over the whole window at ``rate`` (so low that requests hardly overlap)."""
    m, rm, rows, _ = simulate(c, rate, CTX["window_size"])
    if m["num_finished"] != m["num_requests"]:
        raise SystemExit(f"the unloaded run finished {m['num_finished']} of {m['num_requests']} requests: {m['rejections']}")
    out = {name: np.full(CTX["window_size"], np.nan) for name in METRIC_KEYS}
    for name, key in METRIC_KEYS.items():
        out[name][rows] = getattr(rm, key)
    return out


def run_point(c: Candidate, rate: float) -> dict:
    """One simulation of ``c`` at ``rate`` req/s: per-request slowdowns against the unloaded run, their
    P50/P90/P99, whether all nine SLOs hold (and every request finished), energy at this load."""
    m, rm, rows, energy = simulate(c, rate, requests_at(rate))
    tokens = int(rm.num_output[rm.finished].sum())
    row = {"design": c.design.name, "deployment": c.describe(), "prompt": c.prompt, "token": c.token, "mixed": c.mixed,
           "rate": rate, "num_requests": m["num_requests"], "num_finished": m["num_finished"],
           "num_rejected": m["num_rejected"], "num_failed": m["num_failed"]}  # fmt: skip
    passed = m["num_finished"] == m["num_requests"]
    for name, key in METRIC_KEYS.items():
        slowdown = distribution(getattr(rm, key)[rm.finished] / CTX["unloaded"][name][rows[rm.finished]])
        for p, factor in zip(PERCENTILES, SLO_FACTORS[name]):
            row[f"{name}_{p}_s"] = m[key][p] if m[key][p] is not None else math.nan
            row[f"{name}_{p}_slowdown"] = slowdown[p]
            passed = passed and slowdown[p] <= factor
    row.update({"passed": passed, "kv_transfer_p50_s": (m.get("kv_transfer_s") or {}).get("p50", math.nan),
                "energy_j": energy, "energy_per_request_j": energy / max(m["num_finished"], 1),
                "energy_per_token_j": energy / tokens if tokens else math.nan,
                "avg_power_w": energy / m["makespan_s"] if m["makespan_s"] else math.nan})  # fmt: skip
    return row


def search(c: Candidate) -> dict:
    """``c``'s throughput: the highest rate meeting every SLO (bisection), and every run it took."""
    runs: dict[float, dict] = {}

    def passes(rate: float) -> bool:
        runs[rate] = run_point(c, rate)
        return runs[rate]["passed"]

    low, high = BRACKET
    found = search_max_rate(passes, low * c.machines, high * c.machines, rel_tol=CTX["args"].rel_tol)
    best = runs[found.rate]
    failed = [runs[r] for r, ok in sorted(found.tried) if not ok]
    return {"candidate": c, "throughput": found.rate if best["passed"] else 0.0, "best": best,
            "limit": binding_slo(failed[0]) if failed else "none (bracket top)",
            "runs": [runs[r] for r, _ in found.tried]}  # fmt: skip


def binding_slo(run: dict) -> str:
    """The SLO ``run`` (a failing one) misses by the largest factor, e.g. "TBT P50"."""
    if run["num_finished"] < run["num_requests"]:
        return "unfinished requests"
    excess = {(n, p): run[f"{n}_{p}_slowdown"] / f for n, fs in SLO_FACTORS.items() for p, f in zip(PERCENTILES, fs)}
    name, p = max(excess, key=excess.get)
    return f"{name.upper()} {p.upper()}"


# -- results -------------------------------------------------------------------------------------------
def design_rows(budgets: dict, found: dict, mixed: int, all_designs) -> list[dict]:
    """Per budget and design, the best candidate: throughput, $/h, kW, per-$ and per-kW, energy at the
    throughput point, and ratios against both baselines of the same budget."""
    rows = []
    for budget, (measure, amount) in budgets.items():
        best = {}
        for d in all_designs:
            results = [found[c] for c in candidates(d, amount, measure, mixed)]
            if results:
                best[d.name] = max(results, key=lambda r: (r["throughput"], -r["candidate"].usd_per_hour))
        for name, r in best.items():
            c, b = r["candidate"], r["best"]
            row = {"budget": budget, "design": name, "deployment": c.describe(), "machines": c.machines,
                   "throughput_req_s": r["throughput"], "usd_per_hour": c.usd_per_hour, "kw": c.power_w / 1e3,
                   "req_s_per_usd_hour": r["throughput"] / c.usd_per_hour, "req_s_per_kw": r["throughput"] / (c.power_w / 1e3),
                   "energy_per_request_j": b["energy_per_request_j"] if b["passed"] else math.nan,
                   "energy_per_token_j": b["energy_per_token_j"] if b["passed"] else math.nan,
                   "avg_power_kw": b["avg_power_w"] / 1e3 if b["passed"] else math.nan, "limited_by": r["limit"],
                   "candidates": len(candidates(c.design, amount, measure, mixed))}  # fmt: skip
            for base in ("Baseline-A100", "Baseline-H100"):
                ref = best.get(base)
                tag = base[-4:]
                row[f"throughput_vs_{tag}"] = ratio(r["throughput"], ref["throughput"]) if ref else math.nan
                row[f"cost_vs_{tag}"] = ratio(c.usd_per_hour, ref["candidate"].usd_per_hour) if ref else math.nan
                row[f"power_vs_{tag}"] = ratio(c.power_w, ref["candidate"].power_w) if ref else math.nan
            rows.append(row)
    return rows


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def headlines(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(paper's claim, the rule we apply, our figure) rows: the best Splitwise gain at no more cost and
    power than Baseline-A100, and the best gain at lower cost than each baseline."""
    split = [r for r in rows if r["design"].startswith("Splitwise")]

    def best(rule, base):
        ok = [r for r in split if rule(r, base) and not math.isnan(r[f"throughput_vs_{base}"])]
        if not ok:
            return "no Splitwise design qualifies"
        r = max(ok, key=lambda r: r[f"throughput_vs_{base}"])
        return (f"{r['design']} ({r['deployment']}, {r['budget']}): {r[f'throughput_vs_{base}']:.2f}x throughput at "
                f"{r[f'cost_vs_{base}']:.2f}x cost, {r[f'power_vs_{base}']:.2f}x power")

    same = lambda r, b: r[f"cost_vs_{b}"] <= 1 + 1e-9 and r[f"power_vs_{b}"] <= 1 + 1e-9  # noqa: E731
    cheaper = lambda r, b: r[f"cost_vs_{b}"] < 1 - 1e-9  # noqa: E731
    return [("2.35x throughput at the same cost and power", "best vs Baseline-A100, cost and power <= its", best(same, "A100")),
            ("", "best vs Baseline-H100, cost and power <= its", best(same, "H100")),
            ("1.4x throughput at 20 % lower cost", "best vs Baseline-A100 at lower cost", best(cheaper, "A100")),
            ("", "best vs Baseline-H100 at lower cost", best(cheaper, "H100"))]  # fmt: skip


def plot(rows: list[dict], budgets, path):
    names = list(dict.fromkeys(r["design"] for r in rows))
    fig, axes = C.plt.subplots(1, 3, figsize=(17, 4.2))
    width = 0.8 / len(budgets)
    x = np.arange(len(names))
    for k, budget in enumerate(budgets):
        mine = {r["design"]: r for r in rows if r["budget"] == budget}
        get = lambda key: [mine[n][key] if n in mine else 0.0 for n in names]  # noqa: E731
        pos = x + (k - (len(budgets) - 1) / 2) * width
        bars = axes[0].bar(pos, get("throughput_req_s"), width, label=budget)
        for bar, n in zip(bars, names):
            if n in mine:
                axes[0].annotate(f" ${mine[n]['usd_per_hour']:.0f}/h, {mine[n]['kw']:.1f} kW", (bar.get_x() + width / 2, bar.get_height()),
                                 ha="center", va="bottom", rotation=90, fontsize=6)  # fmt: skip
        axes[1].bar(pos, get("req_s_per_usd_hour"), width, label=budget)
        axes[2].bar(pos, get("req_s_per_kw"), width, label=budget)
    for ax, ylabel in zip(axes, ("throughput within SLOs (req/s)", "req/s per $/hour", "req/s per kW (rated)")):
        ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].margins(y=0.3)  # room for the labels above the bars
    axes[0].set_title("throughput (labels: $/hour, rated kW)")
    axes[1].set_title("throughput per cost")
    axes[2].set_title("throughput per power")
    C.save_figure(fig, path)


def table(rows: list[dict], budget: str) -> str:
    lines = ["| design | machines | req/s | $/h | kW | req/s per $/h | req/s per kW | J/request | J/token | vs A100 | vs H100 | limited by |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["budget"] == budget:
            lines.append(f"| {r['design']} | {r['deployment']} | {r['throughput_req_s']:.2f} | {r['usd_per_hour']:.0f} | {r['kw']:.1f} | "
                         f"{r['req_s_per_usd_hour']:.4f} | {r['req_s_per_kw']:.3f} | {r['energy_per_request_j'] / 1e3:.1f} k | "
                         f"{r['energy_per_token_j']:.1f} | {r['throughput_vs_A100']:.2f}x | {r['throughput_vs_H100']:.2f}x | {r['limited_by']} |")  # fmt: skip
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 machines, 15 s of arrivals per run, coarse bisection")
    parser.add_argument("--machines", type=int, default=6, help="Baseline-A100 machines whose $/hour and rated power are the budgets")
    parser.add_argument("--mixed", type=int, default=1, help="mixed machines (of the token type) in every split design")
    parser.add_argument("--duration-s", type=float, default=60.0, help="seconds of arrivals per run (rate x this many requests)")
    parser.add_argument("--start-s", type=float, default=0.0, help="the trace window starts at this second of the trace")
    parser.add_argument("--cap-fraction", type=float, default=CAP_FRACTION,
                        help="Splitwise-HHcap: token machines' power as a fraction of rated (Splitwise: 0.7)")
    parser.add_argument("--unloaded-rate", type=float, default=0.001, help="req/s of the unloaded Baseline-A100 run the SLOs scale")
    parser.add_argument("--rel-tol", type=float, default=0.04, help="bisection stops when the bracket is this close")
    parser.add_argument("--router", default="shortest_queue", help="cluster.router: Splitwise's JSQ (shortest_queue) or another")
    parser.add_argument("--jobs", type=int, default=C.default_jobs())
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.machines, args.duration_s, args.rel_tol = 3, 15.0, 0.25
    if args.machines < 1 or args.mixed < 0 or not args.duration_s > 0 or not args.unloaded_rate > 0:
        parser.error("--machines >= 1, --mixed >= 0, --duration-s > 0 and --unloaded-rate > 0 are required")
    if not 0 < args.cap_fraction <= 1:
        parser.error(f"--cap-fraction must be in (0, 1], got {args.cap_fraction}")
    all_designs = designs(args.cap_fraction)
    capped = all_designs[-1].token
    floor = get_hardware(capped.hardware).dvfs.min_power_limit_w
    if capped.gpu_cap_w is not None and capped.gpu_cap_w < floor:
        parser.error(f"--cap-fraction {args.cap_fraction}: {capped.gpu_cap_w:.0f} W per GPU is below the H100's lowest "
                     f"power limit ({floor:.0f} W)")
    t0 = time.perf_counter()
    out = C.output_dir(NAME, args.out)
    CTX["args"] = args

    # 1. budgets and every candidate deployment (one throughput search each, shared across budgets)
    a100 = all_designs[0].token
    budgets = {"iso-cost": ("usd_per_hour", args.machines * a100.usd_per_hour),
               "iso-power": ("power_w", args.machines * a100.power_w)}  # fmt: skip
    unique = list(dict.fromkeys(c for measure, amount in budgets.values() for d in all_designs
                                for c in candidates(d, amount, measure, args.mixed)))  # fmt: skip

    # 2. the trace window: as many requests as the fastest run can take
    source = CONV_TRACE if resolve_trace_path(CONV_TRACE).exists() else SAMPLE_TRACE
    if source == SAMPLE_TRACE:
        C.console.print(f"[yellow]{CONV_TRACE} not found (../shared/traces or $JAXSERVE_TRACES): the shipped {SAMPLE_TRACE}")
    most = math.ceil(BRACKET[1] * max(c.machines for c in unique) * args.duration_s)
    CTX["window"], CTX["window_size"], window_text = trace_window(source, args.start_s, most, out)

    # 3. every request's unloaded latencies (one Baseline-A100 machine, requests one at a time or nearly)
    t1 = time.perf_counter()
    CTX["unloaded"] = unloaded_latencies(Candidate(all_designs[0], 0, 0, 1), args.unloaded_rate)
    C.console.print(f"unloaded Baseline-A100 run: {CTX['window_size']} requests in {time.perf_counter() - t1:.1f} s")

    # 4. throughput searches
    results = C.parallel_map(search, unique, jobs=args.jobs, description=f"throughput of {len(unique)} deployments",
                             label=lambda c: f"{c.design.name} {c.describe()}")  # fmt: skip
    found = {r["candidate"]: r for r in results}
    rows = design_rows(budgets, found, args.mixed, all_designs)

    C.write_csv(out / "designs.csv", rows)
    C.write_csv(out / "runs.csv", [run for r in results for run in r["runs"]])
    plot(rows, list(budgets), out / "designs.png")
    wall = time.perf_counter() - t0
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))  # fmt: skip
    stats = {"candidates": len(unique), "runs": 1 + sum(len(r["runs"]) for r in results), "cpu_s": cpu}
    write(out, args, rows, budgets, window_text, source, capped, stats, wall)


def write(out, args, rows, budgets, window_text, source, capped, stats, wall):
    u = {name: distribution(v) for name, v in CTX["unloaded"].items()}
    slo_lines = "\n".join(f"| {name.upper()} | " + " | ".join(f"{f:g}x (unloaded {u[name][p] * 1e3:.0f} ms)"
                                                         for p, f in zip(PERCENTILES, SLO_FACTORS[name])) + " |"
                          for name in METRIC_KEYS)  # fmt: skip
    head = "\n".join(f"| {paper} | {rule} | {ours} |" for paper, rule, ours in headlines(rows))
    budget_text = ", ".join(f"{k} {v[1]:,.0f} {'$/h' if v[0] == 'usd_per_hour' else 'W'}" for k, v in budgets.items())
    a100, h100 = Machine("", "a100-80gb", DGX_A100_W), Machine("", "h100-sxm", DGX_H100_W)
    text = f"""# Splitwise: phase-split cluster designs at iso-cost and iso-power (simulated)

Command: `{C.command_line()}` ({wall:.0f} s wall, {stats['cpu_s']:.0f} s CPU, {args.jobs} process(es); {stats['candidates']}
deployments searched, {stats['runs']} simulations).

* Model and machines: Llama-2-70B (bf16), one TP-8 instance per machine: DGX-A100 (8 x A100-80GB, ${a100.usd_per_hour:.2f}/h,
  {DGX_A100_W / 1e3:.1f} kW rated) or DGX-H100 (8 x H100-SXM, ${h100.usd_per_hour:.2f}/h, {DGX_H100_W / 1e3:.1f} kW);
  prices are jaxserve's AWS on-demand figures (p4de, p5), powers NVIDIA's DGX datasheets. vLLM's scheduler on every
  instance (prefill-first, whole prompts), roofline step times.
* HHcap: token machines capped at {args.cap_fraction:g} of rated power (Splitwise's 0.7, SplitwiseSim dgx-h100-pcap), i.e.
  {capped.gpu_cap_w or 700:.0f} W per GPU (`hardware.power_cap_w`) with the rest of the machine unchanged; they count at
  {capped.power_w / 1e3:.2f} kW.
* Split designs: {args.mixed} mixed machine(s) of the token type; arrivals routed by `cluster.router={args.router}` over
  prompt and mixed machines; a handoff goes to the token machine with the shortest queue, or to a mixed machine when
  no token machine has room: our stand-in for Splitwise's mixed pool, which repurposes prompt or token machines at
  run time (ours is fixed). KV sent layer by layer (`cluster.pools.overlap=layer`) over InfiniBand HDR (A100 end)
  or NDR (H100 to H100).
* Workload: {window_text}.{'' if source == CONV_TRACE else ' (../shared/traces absent: the shipped sample.)'} A run at rate r
  serves the window's first r x {args.duration_s:g} requests, rescaled to r (`workload.qps`). The Azure 2023 code trace
  Splitwise also uses is not in ../shared/traces, so only the conversation trace is run.
* Budgets: {args.machines} Baseline-A100 machines: {budget_text}. Per design every maximal (prompt, token) count within
  the budget was searched (bisection to {args.rel_tol:.0%}) and the best kept.

SLOs in Splitwise's form (its simulator's `get_slo` and slowdowns): every request's TTFT, TBT (its mean gap between
tokens) and E2E divided by its own latency unloaded on one Baseline-A100 machine (one run of the whole window at
{args.unloaded_rate:g} req/s); the P50 / P90 / P99 of those slowdowns must stay within:

| metric | P50 | P90 | P99 |
|---|---|---|---|
{slo_lines}

## Iso-cost

{table(rows, 'iso-cost')}

## Iso-power

{table(rows, 'iso-power')}

Energy is the GPUs' at the throughput point, idle time between steps included. "Limited by": the SLO missed by
the most at the lowest failing rate.

## Headline

| paper (Splitwise abstract) | rule | ours |
|---|---|---|
{head}

Why ours differs:
* Prices: SplitwiseSim's notebooks price a GPU-hour at $2.21 (A100) and $4.76 (H100), 2.15x; jaxserve's AWS prices
  differ by {h100.usd_per_hour / a100.usd_per_hour:.2f}x, so here H100 machines are cheap and at iso-cost the H100 designs win;
  cheaper A100 token machines (HA) buy less. Power: rated DGX power, 1.57x (SplitwiseSim's notebooks: 24.8 vs 44, 1.77x).
* Step times are a roofline (60 % MFU, 80 % of HBM bandwidth, 4 ms per step), not Splitwise's profiles, and each
  instance runs vLLM's prefill-first scheduler, whose prompt steps stall every decode on a mixed machine: the
  baselines are bound by the TBT P50 SLO (1.25x), which splitting removes; the split designs then meet TTFT tails.
* Scale: {args.machines} machines' budgets against Splitwise's ~40; whole machines round the budgets (some designs
  leave part unused: see $/h and kW), one mixed machine is a large share of a small cluster, and Splitwise's mixed
  pool grows and shrinks with the load while ours is fixed.

![designs](designs.png)
"""
    C.print_summary(C.write_summary(out, text), wall)


if __name__ == "__main__":
    main()
