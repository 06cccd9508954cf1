"""``stt-loadtest``: simulated users streaming real speech at a server, with figures to gate on.

    stt-loadtest --url ws://HOST:8012/ --clients 50 --concurrent 5 --runtime 300

Exit status: 0, or 1 when a ``--fail-if`` condition holds, 2 for bad arguments or audio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from .client import Endpoint
from .conditions import ConditionError, check_names, failed, parse_conditions
from .corpus import CorpusError, load_corpus
from .stats import RunStats, summarize
from .users import LoadSettings, LoadTest, expand_addresses

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _pause(text: str) -> tuple[float, float]:
    try:
        low, _, high = text.partition(":")
        pause = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX seconds, got {text!r}") from None
    if not 0 <= pause[0] <= pause[1]:
        raise argparse.ArgumentTypeError(f"need 0 <= MIN <= MAX, got {text!r}")
    return pause


def _positive(kind: type) -> object:
    def parse(text: str) -> float | int:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stt-loadtest",
        description="Simulated users stream real speech at an stt-server (or several behind a "
        "balancer) and report sessions, latency, WER, errors and server memory.",
        epilog="Exit status: 0; 1 when a --fail-if condition holds; 2 for bad arguments.",
    )
    g = p.add_argument_group("load")
    g.add_argument(
        "--url", default="ws://127.0.0.1:8012/", help="server or balancer (ws:// or wss://)"
    )
    g.add_argument("--clients", type=_positive(int), default=50, help="simulated users in all")
    g.add_argument(
        "--concurrent", type=_positive(int), default=5, help="users connecting at the same moment"
    )
    g.add_argument("--runtime", type=_positive(float), default=300.0, help="seconds of speaking")
    g.add_argument(
        "--audio",
        metavar="DIR|MANIFEST",
        help="WAV/FLAC files (a directory, or a TSV manifest with 'file' and optional "
        "'reference_transcript' columns); default: the clips shipped with the package",
    )
    g.add_argument("--token", help="sent as 'Authorization: Bearer TOKEN'")
    g.add_argument("--binary", action="store_true", help="send audio as binary frames, not JSON")
    g.add_argument("--seed", type=int, default=0, help="seed of every user's choices (repeatable)")
    g.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="audio pace: 1 = real time, 2 = twice as fast, 0 = as fast as possible "
        "(the server allows max_realtime_factor, 4 by default)",
    )
    g.add_argument(
        "--pause",
        type=_pause,
        default=(1.0, 4.0),
        metavar="MIN:MAX",
        help="seconds between a user's utterances, sent as silence (default 1:4)",
    )
    g.add_argument(
        "--silent-users",
        type=int,
        default=0,
        metavar="N",
        help="N of the users go quiet after each utterance, sending nothing (a muted client)",
    )
    g.add_argument(
        "--silent-pause",
        type=_positive(float),
        default=120.0,
        metavar="SECONDS",
        help="how long the silent users stay quiet each time (default 120; not scaled by --speed)",
    )
    g.add_argument(
        "--source-addresses",
        metavar="ADDRS",
        help="local addresses the users connect from, round-robin: '127.0.1.1,127.1.0.1' or "
        "'127.0.0.2-127.0.0.9' (to look like several clients to per-address limits and ip_hash)",
    )
    g.add_argument("--connect-timeout", type=_positive(float), default=10.0)
    g.add_argument(
        "--finish-timeout",
        type=_positive(float),
        default=30.0,
        help="seconds a user waits for its last completed and the close after the runtime",
    )
    g.add_argument("--cafile", help="CA bundle for wss:// and https:// (e.g. a private CA)")
    g.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")

    g = p.add_argument_group("server metrics")
    g.add_argument(
        "--metrics-url",
        action="append",
        default=[],
        metavar="URL",
        help="an instance's /metrics to sample (repeat for each instance behind a balancer); "
        "default: /metrics on --url's host and port",
    )
    g.add_argument("--no-metrics", action="store_true", help="do not read /metrics")
    g.add_argument("--sample-interval", type=_positive(float), default=5.0, metavar="SECONDS")
    g.add_argument(
        "--warmup",
        type=float,
        metavar="SECONDS",
        help="memory growth is measured from this long after the start (default: a fifth of "
        "the runtime, at most 60 s)",
    )

    g = p.add_argument_group("output")
    g.add_argument("--json", type=Path, metavar="FILE", help="write the full report as JSON")
    g.add_argument("--plot", type=Path, metavar="FILE.png", help="latency, users, memory")
    g.add_argument(
        "--fail-if",
        action="append",
        default=[],
        metavar="COND",
        help="exit 1 when it holds, e.g. 'p95_final_latency>1.5' 'error_rate>0.01' "
        "'wer>0.1' 'memory_growth>10' (repeatable, or comma-separated)",
    )
    g.add_argument("--quiet", action="store_true", help="no live display, no summary")
    g.add_argument(
        "--progress-interval",
        type=_positive(float),
        default=10.0,
        metavar="SECONDS",
        help="when not on a terminal: a progress line this often",
    )
    return p


def settings_from(args: argparse.Namespace) -> LoadSettings:
    endpoint = Endpoint.from_url(args.url)
    metrics = tuple(args.metrics_url) or (endpoint.http_url("/metrics"),)
    warmup = args.warmup if args.warmup is not None else min(60.0, args.runtime / 5)
    return LoadSettings(
        url=args.url,
        clients=args.clients,
        concurrent=args.concurrent,
        runtime=args.runtime,
        speed=args.speed,
        binary=args.binary,
        token=args.token,
        seed=args.seed,
        pause=args.pause,
        silent_users=min(args.silent_users, args.clients),
        silent_pause=args.silent_pause,
        source_addresses=expand_addresses(args.source_addresses or ""),
        connect_timeout=args.connect_timeout,
        finish_timeout=args.finish_timeout,
        metrics_urls=() if args.no_metrics else metrics,
        sample_interval=args.sample_interval,
        warmup=warmup,
        cafile=args.cafile,
        insecure=args.insecure,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
        conditions = parse_conditions(args.fail_if)
        check_names(conditions, summarize(RunStats([]), {}, 0.0))
        corpus = load_corpus(args.audio)
    except (ValueError, CorpusError, ConditionError) as exc:
        parser.error(str(exc))  # exits 2
    if args.speed < 0:
        parser.error("--speed must be >= 0")
    try:
        from rich.console import Console

        from .display import LiveDisplay, summary_table

        if args.plot:
            import matplotlib  # noqa: F401
    except ImportError as exc:
        parser.error(f"{exc.name} is missing: pip install 'stt-server[loadtest]'")

    console = Console(stderr=True)
    test = LoadTest(settings, corpus)
    display = LiveDisplay(console, progress_interval=args.progress_interval)
    if args.quiet:
        stats = trio.run(test.run)
    else:
        with display:
            stats = trio.run(lambda: test.run(on_tick=display.update))
    report = summarize(stats, settings.describe(), test.elapsed)
    report["audio"] = {c.name: round(c.seconds, 2) for c in corpus}
    if not args.quiet:
        Console().print(summary_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        from .plot import plot_run

        plot_run(stats, report, args.plot)
    held = failed(conditions, report)
    for condition, value in held:
        print(f"stt-loadtest: FAIL {condition.text} (measured {value})", file=sys.stderr)
    return EXIT_FAILED if held else EXIT_OK
