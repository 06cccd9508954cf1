"""A long run against one local stt-server: does memory stay flat, does every utterance get
its final, does latency stay flat over time?

    python benchmarks/soak.py --runtime 1800 --out soak/          # the 30-minute soak
    python benchmarks/soak.py --runtime 480 --clients 6 --silent-users 2 --silent-pause 120

Starts ``stt-server`` on a free port (defaults, per-address limits as shipped), then runs the
real ``stt-loadtest`` against it: ``--clients`` users from as many loopback addresses, the last
``--silent-users`` of them going quiet for ``--silent-pause`` seconds after every sentence
(sending nothing: only pings keep them), the rest pausing 1-4 s like a person. Meanwhile it
reads the server's resident memory from /proc every ``--sample-interval`` seconds, because
the server's /metrics may not export it (stt-loadtest's own memory figures come from /metrics
and are null then).

Writes into ``--out``: ``report.json`` and ``latency.png`` (stt-loadtest's), ``memory.csv``
and ``memory.png``; prints resident memory after warm-up and at the end, the growth between
them, utterances lost / complete clips without text, and final latency p95 per tenth of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import trio

from stt_server.loadtest.local import free_port, server_command, wait_until_listening
from stt_server.loadtest.scrape import MEMORY_WINDOW

ROOT = Path(__file__).resolve().parents[1]


def resident_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample_memory(pid: int, interval: float, out: list[tuple[float, float]]) -> None:
    start = trio.current_time()
    while True:
        rss = resident_mib(pid)
        if rss is not None:
            out.append((trio.current_time() - start, rss))
        await trio.sleep(interval)


async def soak(args: argparse.Namespace, pid: int, url: str) -> list[tuple[float, float]]:
    memory: list[tuple[float, float]] = []
    last = 1 + args.clients
    cmd = [
        sys.executable,
        "-m",
        "stt_server.loadtest",
        *("--url", url, "--clients", str(args.clients), "--concurrent", str(args.concurrent)),
        *("--runtime", str(args.runtime), "--seed", str(args.seed)),
        *("--silent-users", str(args.silent_users), "--silent-pause", str(args.silent_pause)),
        *("--source-addresses", f"127.0.0.2-127.0.0.{last}"),
        *("--sample-interval", str(args.sample_interval), "--warmup", str(args.warmup)),
        *("--json", str(args.out / "report.json"), "--plot", str(args.out / "latency.png")),
        *("--progress-interval", "60"),
    ]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_memory, pid, args.sample_interval, memory)
        await trio.run_process(cmd, check=False, cwd=ROOT)
        nursery.cancel_scope.cancel()
    return memory


def plot_memory(memory: list[tuple[float, float]], warmup: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.2))
    if memory:
        t, mib = zip(*memory, strict=True)
        ax.plot(t, mib, marker=".")
    ax.axvline(warmup, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("MiB")
    ax.set_title("stt-server resident memory (/proc/PID/status VmRSS)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", type=float, default=1800.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--concurrent", type=int, default=3)
    parser.add_argument("--silent-users", type=int, default=2)
    parser.add_argument("--silent-pause", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-interval", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("soak"))
    parser.add_argument(
        "server_args", nargs=argparse.REMAINDER, help="after --, flags for the stt-server"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    port = free_port()
    extra = [a for a in args.server_args if a != "--"]
    log = (args.out / "server.log").open("wb")
    server = subprocess.Popen(
        server_command(port, "--control-socket", "", "--log-level", "warning", *extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        if not wait_until_listening(port, 120):
            raise SystemExit("server did not start")
        memory = trio.run(soak, args, server.pid, f"ws://127.0.0.1:{port}/")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)

    (args.out / "memory.csv").write_text(
        "seconds,resident_mib\n" + "".join(f"{t:.1f},{m:.1f}\n" for t, m in memory)
    )
    plot_memory(memory, args.warmup, args.out / "memory.png")
    report = json.loads((args.out / "report.json").read_text())
    # Medians over a minute, as stt-loadtest's memory figures: single readings swing by 100 MiB
    # with what is being decoded at that moment.
    window = [m for t, m in memory if args.warmup <= t < args.warmup + MEMORY_WINDOW]
    after = statistics.median(window) if window else None
    last = memory[-1][0] if memory else 0.0
    tail = [m for t, m in memory if t >= last - MEMORY_WINDOW]
    end = statistics.median(tail) if tail else None
    print(
        f"\nsoak: {args.runtime:g} s, {args.clients} users ({args.silent_users} silent for "
        f"{args.silent_pause:g} s between sentences), {os.cpu_count()} CPUs"
    )
    if after and end:
        print(
            f"resident memory (medians over {MEMORY_WINDOW:g} s): start {memory[0][1]:.0f} MiB, "
            f"after warm-up ({args.warmup:g} s) {after:.0f} MiB, end {end:.0f} MiB, max "
            f"{max(m for _, m in memory):.0f} MiB, growth after warm-up "
            f"{(end - after) / after * 100:+.1f}%"
        )
    print(
        f"sessions accepted {report['sessions_accepted']}, refused {report['sessions_refused']}, "
        f"errors {report['errors_total']} {report['client_errors']}; clips complete "
        f"{report['clips_complete']}, without text {report['clips_unfinalized']}; utterances "
        f"finalized {report['utterances_finalized']}, lost {report['utterances_lost']}; "
        f"WER {report['wer']}"
    )
    print(
        f"final latency p50 {report['final_latency_p50_s']} s, p95 "
        f"{report['final_latency_p95_s']} s, p99 {report['final_latency_p99_s']} s"
    )
    print("final latency p95 per tenth of the run:")
    for row in report["latency_over_time"]:
        span = f"{row['from_s']:7.0f}-{row['to_s']:<7.0f} s"
        print(f"  {span}  finals {row['finals']:4d}  p95 {row['p95_s']}")


if __name__ == "__main__":
    main()
