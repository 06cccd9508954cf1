"""Render the Grafana dashboard's key panels from a live run, as a PNG for the README.

    .venv/bin/pip install matplotlib
    HF_HUB_OFFLINE=1 .venv/bin/python docs/render_metrics_preview.py docs/img/metrics-preview.png

Starts stt-server on two simulated GPUs, streams the shipped clips from 6 clients at real time
(staggered), scrapes /metrics every 0.5 s, and plots what the dashboard plots, with the same
PromQL arithmetic done by hand: active sessions, GPU memory and sessions per GPU, final and
partial latency p50/p95, engine queue depth, and refusals.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import trio
from prometheus_client.parser import text_string_to_metric_families

from stt_server.loadtest.client import read_wav, stream_audio
from stt_server.loadtest.clips import CLIPS_DIR
from stt_server.loadtest.local import free_port, server_command, wait_until_listening

DATA = CLIPS_DIR


async def scrape(port: int) -> dict:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    samples = {}
    for family in text_string_to_metric_families(data.partition(b"\r\n\r\n")[2].decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """histogram_quantile over (le, cumulative count) pairs, linear within a bucket."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    if total <= 0:
        return float("nan")
    rank, prev_le, prev_count = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_le, prev_count = le, count
    return prev_le


async def run(port: int, duration: float) -> list[tuple[float, dict]]:
    clips = [read_wav(DATA / n) for n in ("jfk.wav", "cats.wav", "ldc93s1.wav", "lucier.wav")]
    series: list[tuple[float, dict]] = []
    url = f"ws://127.0.0.1:{port}/"
    start = trio.current_time()

    async def client(i: int) -> None:
        await trio.sleep(3 * i)
        audio = clips[i % len(clips)]
        await stream_audio(url, audio[: int(min(audio.size, 16000 * (duration - 3 * i - 2)))])

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(client, i)
        while trio.current_time() - start < duration:
            series.append((trio.current_time() - start, await scrape(port)))
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    return series


def plot(series: list[tuple[float, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([x for x, _ in series])

    def value(sample: dict, name: str, **labels: str) -> float:
        return sample.get((name, tuple(sorted(labels.items()))), float("nan"))

    def hist_q(name: str, q: float) -> list[float]:
        out = []
        for _, s in series:
            buckets = [
                (float(dict(lbl)["le"]), v) for (n, lbl), v in s.items() if n == f"{name}_bucket"
            ]
            out.append(quantile(buckets, q))
        return out

    fig, axes = plt.subplots(3, 2, figsize=(13, 10), constrained_layout=True)
    fig.suptitle("stt-server: what the Grafana dashboard plots (live run, 2 simulated GPUs)")
    ax = axes[0][0]
    ax.plot(t, [value(s, "stt_sessions_active") for _, s in series], label="active sessions")
    ax.plot(t, [value(s, "stt_max_connections") for _, s in series], "--", label="limit")
    ax.set_title("Active sessions")
    ax.legend()
    ax = axes[0][1]
    for dev in ("sim:0", "sim:1"):
        ax.plot(
            t,
            [value(s, "stt_gpu_memory_used_bytes", device=dev) / 2**30 for _, s in series],
            label=f"{dev} used",
        )
        ax.plot(
            t,
            [value(s, "stt_device_sessions", device=dev) for _, s in series],
            ":",
            label=f"{dev} sessions",
        )
    ax.set_title("GPU memory (GiB) and sessions per GPU")
    ax.legend()
    ax = axes[1][0]
    for name, style in (("stt_final_latency_seconds", "-"), ("stt_partial_latency_seconds", "--")):
        for q in (0.5, 0.95):
            ax.plot(t, hist_q(name, q), style, label=f"{name.split('_')[1]} p{int(q * 100)}")
    ax.set_title("Transcription latency, s (cumulative histograms)")
    ax.legend()
    ax = axes[1][1]
    for kind in ("final", "partial"):
        ax.plot(
            t,
            [
                sum(
                    value(s, "stt_engine_queue_depth", device=d, kind=kind)
                    for d in ("sim:0", "sim:1")
                )
                for _, s in series
            ],
            label=kind,
        )
    ax.set_title("Engine queue depth")
    ax.legend()
    ax = axes[2][0]
    audio = [value(s, "stt_audio_received_seconds_total") for _, s in series]
    ax.plot(t[1:], np.diff(audio) / np.diff(t), label="audio s per s")
    ax.set_title("Audio received (seconds of audio per second)")
    ax.legend()
    ax = axes[2][1]
    ax.plot(
        t,
        [value(s, "stt_utterances_finalized_total") for _, s in series],
        label="utterances finalized",
    )
    ax.plot(
        t,
        [value(s, "stt_errors_total", code="server_busy") for _, s in series],
        label="server_busy errors",
    )
    ax.set_title("Counters")
    ax.legend()
    for row in axes:
        for ax in row:
            ax.set_xlabel("seconds")
            ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img/metrics-preview.png")
    port = free_port()
    proc = subprocess.Popen(
        server_command(
            port,
            "--simulate-gpus",
            "24576:3000,24576:9000",
            "--check-interval",
            "1",
            # Six clients from one address: more than the per-address default of 5.
            "--max-sessions-per-ip",
            "0",
            "--control-socket",
            "",
            "--log-level",
            "warning",
        )
    )
    try:
        if not wait_until_listening(port, 120):
            raise SystemExit("server did not start")
        series = trio.run(run, port, 45.0)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    plot(series, out)
    print(f"wrote {out} from {len(series)} scrapes")


if __name__ == "__main__":
    main()
