"""How many real-time users one server holds: a ramp of concurrent streams, with and without
the throughput techniques, in the same run.

    python benchmarks/capacity.py                         # ramp 1 2 4 6 8 10 12 16, on and off
    python benchmarks/capacity.py --clients 4 8 --modes on

For each mode a server is started (``stt-server`` subprocess, per-address limits off); for each
N, N clients stream at real-time pace for about ``--seconds`` (whole readings of their clip,
at least the longest clip once), each looping its clip (clips cycled over the clients) with
1.5 s pauses between readings, as a person reading aloud would. The clients start at moments
spread over ``--spread`` seconds, so that those reading the same clip pause at unrelated
times, as independent speakers do (started within 2 s, as before 2026-12-04, every third
client ended its utterances within a second or two of the others': a burst of finals at each
of lucier.wav's pauses). Only what happens while all N stream is measured: finals whose
speech ended, and partial gaps that ended, between the last client's start and the first
client's end. A step passes when

- p95 final latency <= ``--latency`` (the client had sent the utterance's last audio ->
  its ``completed`` arrived; this includes the server's ``min_silence`` endpoint wait),
- partials arrive at least every ``--partial-gap`` seconds while an utterance is open (p95 of
  the gaps between partials of one utterance), and
- WER of the streamed finals is within ``--wer-slack`` of offline transcription of the same
  clips by the same model.

It prints a line per step, the largest passing N per mode, their ratio, and the server's CPU
seconds per second of audio served (from /proc, the server process alone). Under each step, a
profile of the time when all N streamed, from the server's ``/metrics`` read every second:
the cores the server and the benchmark's own clients used, how busy the workers were with
finals, guesses at finals and partials, and how much of that went on answers nobody read.

The default clips leave out jfk.wav, so that the figures compare with earlier rounds
(docs/benchmarks.md). Until right-sized finals were cut where they start over, its first
fragment ("And so my fellow Americans") was misheard and failed the WER bound at every N; it
streams right now, and ``--clips jfk.wav cats.wav lucier.wav ldc93s1.wav`` adds it.

Modes: ``on`` is the server's defaults; ``off`` turns the throughput techniques off (every
partial and final on Whisper's full 30 s window, finals decoded only after the endpoint, one
request per model call), as before them; ``no-short-partials``, ``no-tail-partials``,
``no-short-finals``, ``no-speculative`` and ``no-batching`` leave out one each.
CAPACITY_LOG_LEVEL=info shows the server's log.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import time

import attrs
import numpy as np
import trio
from prometheus_client.parser import text_string_to_metric_families

from stt_server.loadtest.client import StreamResult, read_wav, stream_audio
from stt_server.loadtest.clips import CLIPS_DIR, references
from stt_server.loadtest.local import free_port, server_command, wait_until_listening
from stt_server.loadtest.scrape import fetch_metrics
from stt_server.loadtest.wer import word_error_rate

MODES = {
    "on": [],
    "off": [
        "--short-partials", "false",
        "--tail-partials", "false",
        "--short-finals", "false",
        "--speculative-finals", "false",
        "--max-batch", "1",
    ],
    # One technique left out at a time, to see what each is worth.
    "no-short-partials": ["--short-partials", "false"],
    "no-tail-partials": ["--tail-partials", "false"],
    "no-short-finals": ["--short-finals", "false"],
    "no-speculative": ["--speculative-finals", "false"],
    "no-batching": ["--max-batch", "1"],
}  # fmt: skip
PAUSE = 1.5  # seconds of silence between two readings of a clip
GOLDEN = (5**0.5 - 1) / 2
RATE = 16000


def looped(clip: np.ndarray, seconds: float) -> tuple[np.ndarray, int]:
    """The clip, a pause, the clip again...: the whole number of readings (at least one) that
    comes nearest ``seconds``; and that number. Nearest, not at least: a client that streamed
    on well after the others would be measured on a quieter server."""
    pause = np.zeros(int(PAUSE * RATE), dtype=np.int16)
    readings = max(1, round(seconds * RATE / (clip.size + pause.size)))
    return np.concatenate([clip, pause] * readings), readings


def sustained_seconds(names: list[str], seconds: float) -> float:
    """``seconds``, or the longest clip's reading where that is longer: every client then
    streams about as long as the others, and all N are on the server for the whole step.
    (With 30 s and lucier.wav's 101 s reading, the other clients were done after a third of
    the step, and two thirds of its finals were measured with 5 users on the server, not N.)"""
    longest = max(read_wav(CLIPS_DIR / name).size for name in names) / RATE + PAUSE
    return max(seconds, longest)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: The server's own counters read during each step, for the profile line: what they are
#: summed over (devices) and keyed by (a label, or None).
PROFILED = {
    "stt_engine_busy_seconds_total": "kind",
    "stt_engine_unused_seconds_total": "kind",
    "stt_speculative_finals_total": "outcome",
    "stt_engine_batches_total": None,
    "stt_engine_batched_requests_total": None,
    "process_cpu_seconds_total": None,
}
SAMPLE_EVERY = 1.0  # seconds between two reads of /metrics during a step


@attrs.frozen
class Sample:
    at: float  # trio.current_time() of the step's trio.run, the clients' clock
    counters: dict[str, float]
    own_cpu: float  # this process's CPU seconds: the clients'


def counters_from_text(text: str) -> dict[str, float]:
    """The :data:`PROFILED` counters of a /metrics page, summed over devices, keyed ``name`` or
    ``name:label-value``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in PROFILED:
                label = PROFILED[sample.name]
                key = f"{sample.name}:{sample.labels[label]}" if label else sample.name
                out[key] = out.get(key, 0.0) + sample.value
    return out


async def sample_server(port: int, into: list[Sample]) -> None:
    """Read the server's counters every :data:`SAMPLE_EVERY` seconds until cancelled."""
    while True:
        with trio.fail_after(10):
            text = await fetch_metrics(f"http://127.0.0.1:{port}/metrics")
        into.append(Sample(trio.current_time(), counters_from_text(text), time.process_time()))
        await trio.sleep(SAMPLE_EVERY)


def within(samples: list[Sample], span: tuple[float, float]) -> tuple[Sample, Sample] | None:
    """The first and the last sample taken inside ``span``; None without two of them."""
    inside = [s for s in samples if span[0] <= s.at <= span[1]]
    return (inside[0], inside[-1]) if len(inside) >= 2 else None


def profile_line(first: Sample, last: Sample) -> str:
    """Between two samples: the cores the server and the clients used, the workers' seconds
    per second by what they ran (out of as many as there are workers) and the part of them
    nobody read, the mean requests per model call, and the guesses at finals used and thrown
    away."""
    seconds = last.at - first.at
    delta = {k: v - first.counters.get(k, 0.0) for k, v in last.counters.items()}

    def rate(key: str) -> float:
        return delta.get(key, 0.0) / seconds

    kinds = ("final", "guess", "partial")
    busy = {k: rate(f"stt_engine_busy_seconds_total:{k}") for k in kinds}
    unused = {k: rate(f"stt_engine_unused_seconds_total:{k}") for k in kinds}
    calls = delta.get("stt_engine_batches_total", 0.0)
    requests = delta.get("stt_engine_batched_requests_total", 0.0)
    return (
        f"all streaming, {seconds:.0f} s: cores: server {rate('process_cpu_seconds_total'):.2f},"
        f" clients {(last.own_cpu - first.own_cpu) / seconds:.2f};"
        f"  workers busy: {'  '.join(f'{k} {v:.2f}' for k, v in busy.items())}"
        f" (sum {sum(busy.values()):.2f}), of it unread: guess {unused['guess']:.2f}"
        f"  partial {unused['partial']:.2f};"
        f"  requests per model call {requests / max(calls, 1):.2f};"
        f"  guesses used {delta.get('stt_speculative_finals_total:used', 0.0):.0f},"
        f" thrown away {delta.get('stt_speculative_finals_total:discarded', 0.0):.0f}"
        f" (shown as partials {delta.get('stt_speculative_finals_total:shown', 0.0):.0f})"
    )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def start_offsets(n: int, spread: float) -> list[float]:
    """When each of ``n`` clients starts, within ``spread`` seconds: the fractional parts of
    multiples of the golden ratio, so that any number of clients, and every third of them (the
    clients reading one clip), lie far apart."""
    return [(i * GOLDEN) % 1.0 * spread for i in range(n)]


def full_load(results: list[StreamResult]) -> tuple[float, float]:
    """The span of time in which every client was streaming: from the last one's first chunk
    to the first one's last chunk."""
    spans = [r.streamed for r in results]
    if any(span is None for span in spans):
        raise SystemExit("a client sent no audio")
    start, end = max(s[0] for s in spans), min(s[1] for s in spans)
    if end <= start:
        raise SystemExit("no moment with every client streaming: --spread >= --seconds")
    return start, end


async def one_step(
    url: str, tracks: list[tuple[str, np.ndarray, str]], spread: float, port: int
) -> tuple[list[StreamResult], list[Sample]]:
    results: list[StreamResult | None] = [None] * len(tracks)
    offsets = start_offsets(len(tracks), spread)
    samples: list[Sample] = []

    async def client(i: int, audio: np.ndarray) -> None:
        await trio.sleep(offsets[i])  # people do not start in step
        results[i] = await stream_audio(url, audio)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_server, port, samples)
        async with trio.open_nursery() as clients:
            for i, (_, audio, _) in enumerate(tracks):
                clients.start_soon(client, i, audio)
        nursery.cancel_scope.cancel()
    return [r for r in results if r is not None], samples


def offline_wer(names: list[str], refs: dict[str, str]) -> dict[str, float]:
    from stt_server.config import Config
    from stt_server.whisper import WhisperModel

    model = WhisperModel.load(Config(), device="cpu")._model
    out = {}
    for name in names:
        audio = read_wav(CLIPS_DIR / name).astype(np.float32) / 32768
        segments, _ = model.transcribe(audio, language="en")
        out[name] = word_error_rate(refs[name], " ".join(s.text for s in segments))
    return out


def run_mode(mode: str, args: argparse.Namespace, offline: dict[str, float]) -> int:
    refs = references()
    port = free_port()
    cmd = server_command(
        port,
        "--max-connections", "200",
        "--max-sessions-per-ip", "0",
        "--connections-per-minute", "0",
        "--control-socket", "",
        "--log-level", os.environ.get("CAPACITY_LOG_LEVEL", "warning"),
        *MODES[mode],
    )  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    best = 0
    try:
        if not wait_until_listening(port, 120):
            raise SystemExit("server did not start")
        url = f"ws://127.0.0.1:{port}/"
        print(f"\n== mode {mode}: {' '.join(cmd[3:])}", flush=True)
        print("   N  final p50  p95   partial-gap p95  WER stream/offline  CPU-s/audio-s  pass")
        for n in args.clients:
            tracks = []
            for i in range(n):
                name = args.clips[i % len(args.clips)]
                samples, readings = looped(read_wav(CLIPS_DIR / name), args.seconds)
                tracks.append((name, samples, " ".join([refs[name]] * readings)))
            audio_seconds = sum(t[1].size for t in tracks) / RATE
            cpu_before, wall_before = cpu_seconds(proc.pid), time.monotonic()
            results, reads = trio.run(one_step, url, tracks, args.spread, port)
            cpu = cpu_seconds(proc.pid) - cpu_before
            loaded = full_load(results)
            bracket = within(reads, loaded)
            profile = profile_line(*bracket) if bracket else "too short to profile"
            finals = [lat for r in results for lat in r.final_latencies(within=loaded)]
            gaps = [g for r in results for g in r.partial_intervals(within=loaded)]
            stream_wer = statistics.mean(
                word_error_rate(ref, r.text) for (_, _, ref), r in zip(tracks, results, strict=True)
            )
            base = statistics.mean(offline[t[0]] for t in tracks)
            errors = sum(len(r.errors) for r in results)
            ok = (
                percentile(finals, 95) <= args.latency
                and percentile(gaps, 95) <= args.partial_gap
                and stream_wer <= base + args.wer_slack
                and errors == 0
                and all(r.close_code == 1000 for r in results)
            )
            print(
                f"  {n:2d}  {percentile(finals, 50):8.2f}  {percentile(finals, 95):4.2f}"
                f"   {percentile(gaps, 95):14.2f}   {stream_wer * 100:6.1f}% / {base * 100:4.1f}%"
                f"   {cpu / audio_seconds:12.3f}   {'yes' if ok else 'no'}"
                f"{f'  ({errors} errors)' if errors else ''}"
                f"  [{time.monotonic() - wall_before:.0f} s, {len(finals)} finals]",
                flush=True,
            )
            print(f"      {profile}", flush=True)
            if ok:
                best = n
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"   largest N that passes ({mode}): {best}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 6, 8, 10, 12, 16])
    parser.add_argument(
        "--seconds",
        type=float,
        default=100.0,
        help="audio per client per step (at least the longest clip's reading)",
    )
    parser.add_argument("--clips", nargs="+", default=["cats.wav", "lucier.wav", "ldc93s1.wav"])
    parser.add_argument("--modes", nargs="+", default=["on", "off"], choices=sorted(MODES))
    parser.add_argument("--latency", type=float, default=1.0, help="p95 final latency bound (s)")
    parser.add_argument("--partial-gap", type=float, default=1.5, help="p95 partial gap bound")
    parser.add_argument("--wer-slack", type=float, default=0.01, help="WER above offline allowed")
    parser.add_argument(
        "--spread",
        type=float,
        default=40.0,
        help="clients start within this many seconds (2: nearly in step, as before 2026-12-04)",
    )
    args = parser.parse_args()
    seconds = sustained_seconds(args.clips, args.seconds)
    if seconds > args.seconds:
        print(f"--seconds {args.seconds:g} is shorter than the longest clip: {seconds:.0f} s")
    args.seconds = seconds
    offline = offline_wer(sorted(set(args.clips)), references())
    best = {mode: run_mode(mode, args, offline) for mode in args.modes}
    if set(best) == {"on", "off"}:
        ratio = best["on"] / best["off"] if best["off"] else float("inf")
        print(f"\nlargest N: on {best['on']}, off {best['off']} (ratio {ratio:.1f})")


if __name__ == "__main__":
    main()
