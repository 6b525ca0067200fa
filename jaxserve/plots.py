"""Standard run plots (matplotlib, PNG): latency CDFs, latency over time, queue and KV over time."""

from __future__ import annotations

import os

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxserve.metrics import RequestMetrics
from jaxserve.runtime.events import FrozenLog


CDF_POINTS = 2000  # a CDF is drawn through this many evenly spaced ranks (all of them when fewer)
ROLLING_POINTS = 1000  # a rolling quantile line is drawn through this many evenly spaced windows (all when fewer)
# Titles sit just above their axes (none of ours has tick labels on top): a fixed y spares
# matplotlib a layout of every tick label per axes at each draw, ~40 % of drawing these figures.
_RC = {"axes.titley": 1.0}
# zlib level 1 instead of Pillow's 6: the same pixels in ~5 % more bytes, ~50 ms less per figure.
_PNG = {"compress_level": 1}


def _subplots(rows: int, cols: int, figsize: tuple[float, float], **kw):
    """A figure drawn by Agg straight into files (no pyplot: its import and its figure registry
    cost time and nothing here shows a window) and its axes, made under ``_RC``."""
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        return fig, fig.subplots(rows, cols, **kw)


def _fixed_layout(fig) -> None:
    """Fixed margins in inches (room for tick labels, axis labels, titles and the suptitle) instead
    of ``tight_layout``, which lays every text out once more before saving: a third of the cost."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, bottom=0.55 / height, top=1 - 0.75 / height,
                        wspace=0.25, hspace=0.35)  # fmt: skip


def _cdf(ax, values, label, ascending: bool = False):
    """The empirical CDF of ``values`` (NaN dropped); ``ascending``: they are sorted, without NaN."""
    if not ascending:
        values = np.sort(np.asarray(values, np.float64)[~np.isnan(values)])
    n = len(values)
    if n:
        ranks = np.arange(n) if n <= CDF_POINTS else np.unique(np.linspace(0, n - 1, CDF_POINTS).round().astype(np.int64))
        ax.plot(values[ranks], (ranks + 1) / n, label=label)


def _rolling_quantiles(x, y, window: int, points: int = ROLLING_POINTS):
    """(x, p50, p99) over a sliding window of ``window`` points ordered by x (empty when too few),
    at ``points`` evenly spaced window positions (every one when fewer)."""
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if len(y) < window or window < 2:
        return x[:0], y[:0], y[:0]
    windows = np.lib.stride_tricks.sliding_window_view(y, window)
    starts = np.arange(len(windows))
    if len(windows) > points:
        starts = np.unique(np.linspace(0, len(windows) - 1, points).round().astype(np.int64))
        windows = windows[starts]
    return x[window // 2 + starts], np.median(windows, axis=1), np.quantile(windows, 0.99, axis=1)


def _log_y(ax) -> None:
    """A log y axis labelled with plain numbers (0.01, 1, 100) and without minor ticks: mathtext
    labels (10^k) and the minor ticks' artists were a third of drawing the figure."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(ticker.NullLocator())


def latency_over_time_figure(rm: RequestMetrics):
    """TTFT and E2E latency of finished requests against arrival time, each on its own panel (TTFT
    is often 100x smaller than E2E and vanishes on a shared axis), with rolling P50/P99 lines; a
    panel whose values span more than two decades uses a log axis."""
    fig, axes = _subplots(2, 1, (10, 6), sharex=True)
    done = rm.finished
    window = max(2, min(200, int(done.sum()) // 20))
    for ax, values, name, color in ((axes[0], rm.ttft_s, "TTFT", "tab:orange"), (axes[1], rm.e2e_s, "E2E latency", "tab:blue")):
        x, y = rm.arrival_s[done], values[done]
        ax.scatter(x, y, s=3, alpha=0.3, color=color, label=name)
        cx, p50, p99 = _rolling_quantiles(x, y, window)
        if len(cx):
            ax.plot(cx, p50, color="black", lw=1, label=f"P50 (rolling, {window} requests)")
            ax.plot(cx, p99, color="black", lw=1, ls="--", label="P99 (rolling)")
        positive = y[y > 0]
        if len(positive) and positive.max() > 100 * positive.min():
            _log_y(ax)
        ax.set(ylabel=f"{name} (s)", title=f"{name} over time")
        ax.legend(markerscale=4, fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    axes[1].set(xlabel="arrival time (s)")
    return fig


def plot_run(log: FrozenLog, rm: RequestMetrics, output_dir: str, title: str = "") -> list[str]:
    """Writes the run's PNGs into ``output_dir``; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = []

    def save(fig, name):
        fig.suptitle(title)
        _fixed_layout(fig)
        path = os.path.join(output_dir, name)
        fig.savefig(path, dpi=110, pil_kwargs=_PNG)
        paths.append(path)

    fig, axes = _subplots(1, 2, (10, 4))
    _cdf(axes[0], rm.ttft_s, "TTFT")
    axes[0].set(xlabel="TTFT (s)", ylabel="fraction of requests", title="Time to first token")
    _cdf(axes[1], rm.sorted_tbt(), "TBT", ascending=True)
    axes[1].set(xlabel="time between tokens (s)", ylabel="fraction of tokens", title="Time between tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
    save(fig, "latency_cdf.png")

    fig = latency_over_time_figure(rm)
    save(fig, "latency_over_time.png")

    fig, axes = _subplots(2, 1, (10, 6), sharex=True)
    axes[0].plot(log.step_end_s, log.step_waiting, label="waiting", lw=0.8)
    axes[0].plot(log.step_end_s, log.step_running, label="running", lw=0.8)
    axes[0].set(ylabel="requests", title="Queue length")
    # Above the axes, beside the title: never over the curves, and no "best" search over every
    # step's point (~40 ms on an hour of steps).
    axes[0].legend(loc="lower left", bbox_to_anchor=(0, 1), ncols=2, fontsize=8, frameon=False, borderaxespad=0.2)
    axes[1].plot(log.step_end_s, 100 * log.step_kv_usage, lw=0.8, color="tab:green")
    axes[1].set(xlabel="time (s)", ylabel="KV blocks used (%)", title="KV cache usage", ylim=(0, 105))
    for ax in axes:
        ax.grid(alpha=0.3)
    save(fig, "queue_and_kv.png")
    return paths
