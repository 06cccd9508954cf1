"""Streamed vs. offline WER per clip, for a given server configuration.

    python benchmarks/stream_wer.py                       # defaults
    python benchmarks/stream_wer.py context_seconds=0     # any Config setting as KEY=VALUE

Each clip of ``stt_server/loadtest/clips`` is streamed once, as fast as the server takes it
(endpointing depends on the audio only, so finals are the same as at real-time pace), through
an in-process server; the same model then transcribes the whole file offline.
"""

from __future__ import annotations

import functools
import logging
import sys

import attrs
import numpy as np
import trio

from stt_server.config import Config
from stt_server.loadtest.client import read_wav, stream_audio
from stt_server.loadtest.clips import CLIPS_DIR, references
from stt_server.loadtest.wer import word_error_rate
from stt_server.server import serve
from stt_server.whisper import WhisperModel

DATA = CLIPS_DIR


def parse_overrides(args: list[str]) -> dict[str, object]:
    fields = {f.name: f for f in attrs.fields(Config)}
    out: dict[str, object] = {}
    for arg in args:
        key, _, value = arg.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown setting {key!r}")
        out[key] = type(fields[key].default)(value)
    return out


async def main(config: Config, model: WhisperModel, clips: list[dict[str, str]]) -> None:
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        server = await nursery.start(functools.partial(serve, config, model=model, shutdown=stop))
        for row in clips:
            samples = read_wav(DATA / row["file"])
            result = await stream_audio(f"ws://127.0.0.1:{server.port}/", samples, speed=0)
            segments, _ = model._model.transcribe(samples.astype(np.float32) / 32768, language="en")
            offline = " ".join(s.text for s in segments)
            ref = row["reference_transcript"]
            print(
                f"{row['file']:12} streamed {word_error_rate(ref, result.text) * 100:5.1f}%  "
                f"offline {word_error_rate(ref, offline) * 100:5.1f}%  "
                f"utterances {len(result.finals)}",
                flush=True,
            )
        stop.set()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    # Clips go in as fast as the server takes them, so the audio-rate limit is off here.
    base = Config(
        host="127.0.0.1",
        port=0,
        control_socket="",
        max_realtime_factor=0.0,
        max_messages_per_second=0.0,
    )
    config = attrs.evolve(base, **parse_overrides(sys.argv[1:]))
    clips = [{"file": f, "reference_transcript": r} for f, r in references().items()]
    trio.run(main, config, WhisperModel.load(config, device="cpu"), clips)
