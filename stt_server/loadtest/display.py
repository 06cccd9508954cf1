"""What the operator sees: a live panel while the run goes (rich), a summary table at the end.

On a terminal the panel redraws in place twice a second; elsewhere (CI logs, a pipe) one plain
line is printed every ``progress_interval`` seconds instead, so logs stay readable.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .stats import percentile

if TYPE_CHECKING:
    from .users import LoadTest


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def _live_figures(test: LoadTest) -> dict[str, Any]:
    stats = test.stats
    users = stats.users
    recent = stats.recent_latencies(stats.started + test.now)
    refused: dict[str, int] = {}
    for u in users:
        for k, v in u.refused.items():
            refused[k] = refused.get(k, 0) + v
    n = len(test.settings.metrics_urls)
    latest = stats.samples[-n:] if n else []  # the newest scrape of each instance
    resident = [
        s.values["process_resident_memory_bytes"] / 2**20
        for s in latest
        if "process_resident_memory_bytes" in s.values
    ]
    active = [s.values["stt_sessions_active"] for s in latest if "stt_sessions_active" in s.values]
    return {
        "elapsed": test.now,
        "connected": stats.connected,
        "connecting": stats.connecting,
        "refused": refused,
        "errored": sum(1 for u in users if u.failures),
        "reconnects": sum(u.reconnects for u in users),
        "finals": sum(u.finals for u in users),
        "clips": sum(u.clips_started for u in users),
        "partials": sum(u.partials for u in users),
        "lost": sum(u.lost_utterances for u in users),
        "recent": recent,
        "p50": percentile(recent, 50),
        "p95": percentile(recent, 95),
        "p99": percentile(recent, 99),
        "gap": percentile(stats.partial_gaps[-2000:], 50),  # the recent ones
        "resident": resident,
        "server_sessions": active,
    }


class LiveDisplay:
    """The running picture; ``update`` is the load test's ``on_tick``."""

    def __init__(self, console: Console, *, progress_interval: float = 10.0) -> None:
        self.console = console
        self.progress_interval = progress_interval
        self._live: Live | None = None
        self._last_line = -math.inf

    def __enter__(self) -> LiveDisplay:
        if self.console.is_terminal:
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(self, test: LoadTest) -> None:
        f = _live_figures(test)
        if self._live is not None:
            self._live.update(self._panel(test, f), refresh=True)
        elif f["elapsed"] - self._last_line >= self.progress_interval:
            self._last_line = f["elapsed"]
            self.console.print(self._line(test, f), highlight=False, soft_wrap=True)

    def _line(self, test: LoadTest, f: dict[str, Any]) -> str:
        s = test.settings
        return (
            f"[{_clock(f['elapsed'])}/{_clock(s.runtime)}] users {len(test.stats.users)}: "
            f"connected {f['connected']}, connecting {f['connecting']}, "
            f"refused {sum(f['refused'].values())}, errored {f['errored']} | "
            f"finals {f['finals']}, lost {f['lost']} | final latency (60 s) "
            f"p50 {_seconds(f['p50'])} p95 {_seconds(f['p95'])} p99 {_seconds(f['p99'])}"
        )

    def _panel(self, test: LoadTest, f: dict[str, Any]) -> Group:
        s = test.settings
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold cyan", no_wrap=True)
        grid.add_column()
        refused = ", ".join(f"{k} {v}" for k, v in sorted(f["refused"].items())) or "0"
        grid.add_row(
            "users",
            f"{len(test.stats.users)} in all: [green]{f['connected']} connected[/], "
            f"{f['connecting']} connecting, [yellow]refused {refused}[/], "
            f"[red]{f['errored']} with errors[/], {f['reconnects']} reconnects",
        )
        grid.add_row(
            "speech",
            f"{f['clips']} clips spoken, {f['finals']} utterances finalized, "
            f"{f['partials']} partials, lost {f['lost']}",
        )
        grid.add_row(
            "final latency",
            f"p50 {_seconds(f['p50'])}  p95 {_seconds(f['p95'])}  p99 {_seconds(f['p99'])}"
            f"  (last 60 s, {len(f['recent'])} finals)   partial gap p50 {_seconds(f['gap'])}",
        )
        if f["server_sessions"] or f["resident"]:
            grid.add_row(
                "servers",
                "sessions "
                + " + ".join(f"{a:.0f}" for a in f["server_sessions"])
                + (
                    "   resident " + " + ".join(f"{m:.0f} MiB" for m in f["resident"])
                    if f["resident"]
                    else ""
                ),
            )
        title = Text.assemble(
            ("stt-loadtest ", "bold"),
            f"{s.url}   {_clock(f['elapsed'])} / {_clock(s.runtime)}   speed {s.speed:g}x",
        )
        return Group(title, grid)


def summary_table(report: dict[str, Any]) -> Table:
    """The figures of a finished run, one per row."""
    table = Table(title="stt-loadtest summary", show_header=True, header_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")

    def row(name: str, value: Any) -> None:
        table.add_row(name, "—" if value is None else str(value))

    refused = report["sessions_refused_by_reason"]
    row("users", report["users"])
    row("sessions accepted", report["sessions_accepted"])
    row(
        "sessions refused",
        f"{report['sessions_refused']}"
        + (f" ({', '.join(f'{k} {v}' for k, v in refused.items())})" if refused else ""),
    )
    row("reconnects", report["reconnects"])
    row("clips spoken / complete", f"{report['clips_started']} / {report['clips_complete']}")
    row("utterances finalized", report["utterances_finalized"])
    row("utterances lost", report["utterances_lost"])
    row("complete clips without text", report["clips_unfinalized"])
    if report["clips_dropped_at_close"]:
        row("clips spoken while a server was leaving", report["clips_dropped_at_close"])
    for q in (50, 95, 99):
        row(f"final latency p{q}", _seconds(report[f"final_latency_p{q}_s"]))
    row(
        "partial gap p50 / p95",
        f"{_seconds(report['partial_gap_p50_s'])} / {_seconds(report['partial_gap_p95_s'])}",
    )
    row(
        "real-time lag p95 / max",
        f"{_seconds(report['realtime_lag_p95_s'])} / {_seconds(report['realtime_lag_max_s'])}",
    )
    wer = report["wer"]
    row("WER", None if wer is None else f"{wer * 100:.1f}% of {report['wer_words']} words")
    errors = {**report["errors"], **report["client_errors"]}
    row(
        "errors",
        f"{report['errors_total']} (rate {report['error_rate']})"
        + (f": {', '.join(f'{k} {v}' for k, v in errors.items())}" if errors else ""),
    )
    for url, inst in report["server"]["instances"].items():
        row(
            f"server {url}",
            f"accepted {inst['sessions_accepted']}, finalized {inst['utterances_finalized']}",
        )
    for url, mem in report["memory"]["instances"].items():
        resident = mem.get("resident")
        if resident:
            row(
                f"resident memory {url}",
                f"{resident['start_mb']} → {resident['after_warmup_mb']} (warm) → "
                f"{resident['end_mb']} MiB ({resident['growth_after_warmup_pct']:+.1f}%)",
            )
        gpu = mem.get("gpu_used")
        if gpu:
            row(
                f"GPU memory {url}",
                f"{gpu['after_warmup_mb']} → {gpu['end_mb']} MiB "
                f"({gpu['growth_after_warmup_pct']:+.1f}%)",
            )
    row("elapsed", f"{report['elapsed_s']} s")
    return table
