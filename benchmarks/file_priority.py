"""Does a file upload delay a live session? Partial cadence and final latency of one live client.

    HF_HUB_OFFLINE=1 python benchmarks/file_priority.py                   # all three modes
    HF_HUB_OFFLINE=1 python benchmarks/file_priority.py chunked "one job"  # some of them

One client streams cats.wav (30 s) in real time to an in-process server (the embedded model,
CPU defaults: two inference workers, one kept for finals). Beside it, in turn: nothing
(``alone``); the official openai client uploading lucier.wav (100 s) back to back to
``/v1/audio/transcriptions`` (``chunked``, as the server does it: one engine job per chunk of at
most 30 s); the same with the chunker's limit lifted, so each file is one engine job
(``one job``). Printed per mode: the live client's finals, final latency (its last audio of an
utterance to the ``completed``, ``min_silence`` included), the gaps between its partials, the
engine's mean queue wait and inference time for finals and partials, and the uploads done.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time

import openai
import trio

from stt_server import filedecode, openai_files
from stt_server.config import Config
from stt_server.loadtest.client import read_wav, stream_audio
from stt_server.loadtest.clips import CLIPS_DIR
from stt_server.metrics import Metrics
from stt_server.server import serve
from stt_server.whisper import WhisperModel

LIVE = CLIPS_DIR / "cats.wav"
UPLOAD = CLIPS_DIR / "lucier.wav"
MODES = ("alone", "chunked", "one job")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def mean_of(metrics: Metrics, family: str, kind: str) -> float:
    histogram = getattr(metrics, family).labels(kind)
    samples = {s.name: s.value for s in histogram.collect()[0].samples}
    count = samples.get(f"{histogram._name}_count", 0.0)
    return samples.get(f"{histogram._name}_sum", 0.0) / count if count else float("nan")


class _WholeFile(filedecode.Chunker):
    """The chunker with its limit lifted: a file is one engine job."""

    def __init__(self) -> None:
        super().__init__(max_chunk=10**12)


async def run(model: WhisperModel, mode: str) -> dict[str, object]:
    config = Config(host="127.0.0.1", port=0, control_socket="")
    openai_files.Chunker = _WholeFile if mode == "one job" else filedecode.Chunker
    uploads: list[float] = []
    try:
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            server = await nursery.start(
                functools.partial(serve, config, model=model, shutdown=shutdown)
            )
            api = openai.OpenAI(
                base_url=f"http://127.0.0.1:{server.port}/v1",
                api_key="unused",
                max_retries=0,
                timeout=600,
            )

            async def upload_back_to_back() -> None:
                while True:
                    started = time.monotonic()
                    await trio.to_thread.run_sync(
                        lambda: api.audio.transcriptions.create(file=UPLOAD, model="whisper-1"),
                        abandon_on_cancel=True,  # the server sees the hang-up and stops
                    )
                    uploads.append(time.monotonic() - started)

            async with trio.open_nursery() as beside:
                if mode != "alone":
                    beside.start_soon(upload_back_to_back)
                    await trio.sleep(1.0)
                result = await stream_audio(
                    f"ws://127.0.0.1:{server.port}/",
                    read_wav(LIVE),
                    speed=1.0,
                    trailing_silence=1.5,
                )
                beside.cancel_scope.cancel()
            finals, gaps = result.final_latencies(), result.partial_intervals()
            metrics = server.metrics
            shutdown.set()
    finally:
        openai_files.Chunker = filedecode.Chunker
    return {
        "mode": mode,
        "finals": len(finals),
        "final_p50": statistics.median(finals),
        "final_max": max(finals),
        "partial_gap_p50": statistics.median(gaps),
        "partial_gap_p95": quantile(gaps, 0.95),
        "final_queue_mean": mean_of(metrics, "queue_wait", "final"),
        "final_inference_mean": mean_of(metrics, "inference", "final"),
        "partial_queue_mean": mean_of(metrics, "queue_wait", "partial"),
        "uploads_done": len(uploads),
        "upload_seconds_first": uploads[0] if uploads else None,
    }


async def main(modes: list[str]) -> None:
    model = WhisperModel.load(Config(), device="cpu")
    for mode in modes:
        figures = await run(model, mode)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()})


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(MODES)
    unknown = set(chosen) - set(MODES)
    if unknown:
        sys.exit(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    trio.run(main, chosen)
