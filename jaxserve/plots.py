"""Standard run plots (matplotlib, PNG): latency CDFs, latency over time, queue and KV over time."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve.runtime.events import FrozenLog  # noqa: E402
from jaxserve.metrics import RequestMetrics  # noqa: E402


def _cdf(ax, values, label):
    values = np.sort(np.asarray(values, np.float64)[~np.isnan(values)])
    if len(values):
        ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=label)


def plot_run(log: FrozenLog, rm: RequestMetrics, output_dir: str, title: str = "") -> list[str]:
    """Writes the run's PNGs into ``output_dir``; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = []

    def save(fig, name):
        fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(output_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _cdf(axes[0], rm.ttft_s, "TTFT")
    axes[0].set(xlabel="TTFT (s)", ylabel="fraction of requests", title="Time to first token")
    _cdf(axes[1], rm.tbt_s, "TBT")
    axes[1].set(xlabel="time between tokens (s)", ylabel="fraction of tokens", title="Time between tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
    save(fig, "latency_cdf.png")

    fig, ax = plt.subplots(figsize=(10, 4))
    done = rm.finished
    ax.scatter(rm.arrival_s[done], rm.e2e_s[done], s=3, alpha=0.4, label="E2E latency")
    ax.scatter(rm.arrival_s[done], rm.ttft_s[done], s=3, alpha=0.4, label="TTFT")
    ax.set(xlabel="arrival time (s)", ylabel="latency (s)", title="Latency over time")
    ax.legend(markerscale=4)
    ax.grid(alpha=0.3)
    save(fig, "latency_over_time.png")

    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    axes[0].plot(log.step_end_s, log.step_waiting, label="waiting", lw=0.8)
    axes[0].plot(log.step_end_s, log.step_running, label="running", lw=0.8)
    axes[0].set(ylabel="requests", title="Queue length")
    axes[0].legend()
    axes[1].plot(log.step_end_s, 100 * log.step_kv_usage, lw=0.8, color="tab:green")
    axes[1].set(xlabel="time (s)", ylabel="KV blocks used (%)", title="KV cache usage", ylim=(0, 105))
    for ax in axes:
        ax.grid(alpha=0.3)
    save(fig, "queue_and_kv.png")
    return paths
