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
and are null then), and the CPU used by the server, by stt-loadtest and by everything else on
the machine: a latency episode that coincides with other processes' CPU is the machine's, not
the server's.

Writes into ``--out``: ``report.json`` and ``latency.png`` (stt-loadtest's), ``samples.csv``
and ``memory.png`` (memory and CPU over time); prints resident memory after warm-up and at the
end, the growth between them, utterances lost / complete clips without text, and final latency
p95 per tenth of the run beside the CPU other processes took in that tenth.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path

import attrs
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


TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idle and iowait since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / TICKS


@attrs.define
class Sample:
    seconds: float
    resident_mib: float
    server_cores: float
    loadtest_cores: float
    other_cores: float


async def sample_machine(pid: int, loadtest: int, interval: float, out: list[Sample]) -> None:
    start = trio.current_time()
    last = (start, process_cpu_seconds(pid), process_cpu_seconds(loadtest), machine_busy_seconds())
    while True:
        await trio.sleep(interval)
        rss = resident_mib(pid)
        now = trio.current_time()
        cpu = (
            now,
            process_cpu_seconds(pid),
            process_cpu_seconds(loadtest),
            machine_busy_seconds(),
        )
        span = cpu[0] - last[0]
        server, tester = (cpu[1] - last[1]) / span, max(cpu[2] - last[2], 0.0) / span
        other = max((cpu[3] - last[3]) / span - server - tester, 0.0)
        last = cpu
        if rss is not None:
            out.append(Sample(now - start, rss, server, tester, other))


async def soak(args: argparse.Namespace, pid: int, url: str) -> list[Sample]:
    samples: list[Sample] = []
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
        process = await nursery.start(partial(trio.run_process, cmd, check=False, cwd=ROOT))
        nursery.start_soon(sample_machine, pid, process.pid, args.sample_interval, samples)
        await process.wait()
        nursery.cancel_scope.cancel()
    return samples


def plot_samples(samples: list[Sample], warmup: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cpu) = plt.subplots(2, 1, figsize=(10, 5.4), sharex=True)
    t = [s.seconds for s in samples]
    ax.plot(t, [s.resident_mib for s in samples], marker=".")
    ax.axvline(warmup, color="grey", linestyle="--", label="end of warm-up")
    ax.set_ylabel("MiB")
    ax.set_title("stt-server resident memory (/proc/PID/status VmRSS)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    for name in ("server_cores", "loadtest_cores", "other_cores"):
        cpu.plot(t, [getattr(s, name) for s in samples], label=name.split("_")[0])
    cpu.set_xlabel("seconds since start")
    cpu.set_ylabel("cores busy")
    cpu.set_title("CPU: the server, stt-loadtest, every other process")
    cpu.legend(loc="upper right")
    cpu.grid(alpha=0.3)
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
    # Measured: resident memory climbs for about 200 s (the allocator's pools filling as every
    # utterance length and every session count is met), then stays flat.
    parser.add_argument("--warmup", type=float, default=300.0)
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
        samples = trio.run(soak, args, server.pid, f"ws://127.0.0.1:{port}/")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)

    columns = [f.name for f in attrs.fields(Sample)]
    (args.out / "samples.csv").write_text(
        ",".join(columns)
        + "\n"
        + "".join(",".join(f"{getattr(s, c):.2f}" for c in columns) + "\n" for s in samples)
    )
    plot_samples(samples, args.warmup, args.out / "memory.png")
    memory = [(s.seconds, s.resident_mib) for s in samples]
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
    print("final latency p95 per tenth of the run, and the cores other processes took then:")
    for row in report["latency_over_time"]:
        span = f"{row['from_s']:7.0f}-{row['to_s']:<7.0f} s"
        others = [s.other_cores for s in samples if row["from_s"] <= s.seconds < row["to_s"]]
        busiest = max(others, default=0.0)
        print(
            f"  {span}  finals {row['finals']:4d}  p95 {row['p95_s']}  "
            f"other processes: mean {statistics.fmean(others or [0.0]):.2f}, max {busiest:.2f}"
        )


if __name__ == "__main__":
    main()
