"""``--plot FILE.png``: final latency over time, active users, and the servers' memory.

Three panels sharing the time axis (seconds since the start): every final's latency as a dot
with the p95 of each 30 s window as a line; users connected and connecting; resident (and GPU)
memory per instance, when ``/metrics`` exports it. A flat p95 line and a flat memory line are
what a healthy long run looks like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .scrape import memory_series
from .stats import RunStats, percentile

#: Width of the windows over which the p95 line is taken, in seconds.
P95_WINDOW = 30.0


def plot_run(stats: RunStats, report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    memory = memory_series(stats.samples)
    has_memory = any(series["resident"] or series["gpu_used"] for series in memory.values())
    rows = 3 if has_memory else 2
    fig, axes = plt.subplots(rows, 1, figsize=(10, 3.2 * rows), sharex=True)
    ax = axes[0]
    times, latencies = list(stats.final_times), list(stats.final_latencies)
    ax.scatter(times, latencies, s=6, alpha=0.35, label="final latency")
    if times:
        end = max(times)
        centres, p95s = [], []
        start = 0.0
        while start <= end:
            window = [
                lat
                for t, lat in zip(times, latencies, strict=True)
                if start <= t < start + P95_WINDOW
            ]
            if window:
                centres.append(start + P95_WINDOW / 2)
                p95s.append(percentile(window, 95))
            start += P95_WINDOW
        ax.plot(centres, p95s, color="tab:red", label=f"p95 per {P95_WINDOW:g} s")
    ax.set_ylabel("seconds")
    p95 = report.get("final_latency_p95_s")
    ax.set_title(
        f"final latency (end of speech to completed); overall p95 "
        f"{'—' if p95 is None else f'{p95:.2f} s'}"
    )
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)

    ax = axes[1]
    if stats.activity:
        t, connected, connecting = zip(*stats.activity, strict=True)
        ax.step(t, connected, where="post", label="connected")
        ax.step(t, connecting, where="post", label="connecting", alpha=0.6)
    ax.set_ylabel("users")
    ax.set_title(
        f"active users (of {report.get('users')}); refused {report.get('sessions_refused')}, "
        f"reconnects {report.get('reconnects')}"
    )
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)

    if has_memory:
        ax = axes[2]
        for url, series in memory.items():
            for kind, points in series.items():
                if points:
                    t, mib = zip(*points, strict=True)
                    ax.plot(t, mib, marker=".", label=f"{kind} {url}")
        ax.set_ylabel("MiB")
        ax.set_title("server memory (from /metrics)")
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
