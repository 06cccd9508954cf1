"""A streaming WebSocket client that records what it sent and received, and when.

Used by the tests, the benchmarks and the load tester: it paces PCM16 audio at real time (or
faster), collects every server message with its arrival time, and can tell for each
``completed`` how long after the client had sent the utterance's last audio it arrived.
"""

from __future__ import annotations

import base64
import bisect
import json
import wave
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

SAMPLE_RATE = 16000


def read_wav(path: str | Path) -> np.ndarray:
    """A 16-bit mono WAV as int16 samples (the shared clips and espeak-ng output are such)."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
            raise ValueError(f"{path}: need 16-bit mono PCM")
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").copy()


def wav_rate(path: str | Path) -> int:
    with wave.open(str(path), "rb") as wav:
        return wav.getframerate()


@attrs.define
class StreamResult:
    messages: list[tuple[float, dict[str, Any]]] = attrs.Factory(list)
    #: (monotonic time, seconds of audio sent so far) after each chunk.
    sent: list[tuple[float, float]] = attrs.Factory(list)
    close_code: int | None = None
    close_reason: str | None = None

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m.get("type") == kind]

    @property
    def finals(self) -> list[dict[str, Any]]:
        return self.of_type("completed")

    @property
    def partials(self) -> list[dict[str, Any]]:
        return self.of_type("realtime")

    @property
    def errors(self) -> list[dict[str, Any]]:
        return self.of_type("error")

    @property
    def text(self) -> str:
        return " ".join(m["text"] for m in self.finals if m["text"])

    def sent_time(self, audio_seconds: float) -> float | None:
        """When the client had sent audio up to ``audio_seconds`` (None: never)."""
        positions = [s for _, s in self.sent]
        i = bisect.bisect_left(positions, audio_seconds - 1e-6)
        return self.sent[i][0] if i < len(self.sent) else None

    def final_latencies(self) -> list[float]:
        """For each final: arrival minus the moment its last audio had been sent."""
        out = []
        for t, m in self.messages:
            if m.get("type") == "completed":
                sent = self.sent_time(m["end"])
                if sent is not None:
                    out.append(t - sent)
        return out

    def partial_intervals(self) -> list[float]:
        """Gaps between consecutive partials of the same utterance."""
        gaps, last = [], {}
        for t, m in self.messages:
            if m.get("type") == "realtime":
                uid = m["utterance_id"]
                if uid in last:
                    gaps.append(t - last[uid])
                last[uid] = t
        return gaps


async def stream_audio(
    url: str,
    samples: np.ndarray,
    *,
    sample_rate: int = SAMPLE_RATE,
    chunk_seconds: float = 0.1,
    speed: float = 1.0,
    binary: bool = False,
    declare_rate: bool = True,
    trailing_silence: float = 0.0,
    finish: str = "end",
    result: StreamResult | None = None,
) -> StreamResult:
    """Stream int16 ``samples`` to ``url`` and collect the replies until the server closes.

    ``speed`` 1.0 is real time, ``0`` as fast as possible. ``finish`` is ``"end"`` (send
    ``end``, then wait for the server's close), ``"close"`` (just close) or ``"none"``.
    """
    result = result if result is not None else StreamResult()
    if trailing_silence:
        samples = np.concatenate([samples, np.zeros(int(trailing_silence * sample_rate), "<i2")])
    step = max(1, int(chunk_seconds * sample_rate))
    async with open_websocket_url(url) as ws:

        async def receive() -> None:
            try:
                while True:
                    raw = await ws.get_message()
                    result.messages.append((trio.current_time(), json.loads(raw)))
            except ConnectionClosed as exc:
                result.close_code = exc.reason.code
                result.close_reason = exc.reason.reason

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            if declare_rate and sample_rate != SAMPLE_RATE:
                await ws.send_message(json.dumps({"type": "config", "sample_rate": sample_rate}))
            start = trio.current_time()
            try:
                for offset in range(0, samples.size, step):
                    chunk = samples[offset : offset + step].astype("<i2").tobytes()
                    if binary:
                        await ws.send_message(chunk)
                    else:
                        await ws.send_message(
                            json.dumps(
                                {
                                    "type": "audio",
                                    "data": base64.b64encode(chunk).decode(),
                                    "sample_rate": sample_rate,
                                }
                            )
                        )
                    sent = min(offset + step, samples.size) / sample_rate
                    result.sent.append((trio.current_time(), sent))
                    if speed:
                        await trio.sleep_until(start + sent / speed)
                if finish == "end":
                    await ws.send_message(json.dumps({"type": "end"}))
                elif finish == "close":
                    nursery.cancel_scope.cancel()
            except ConnectionClosed:
                # The server ended the session (kick, drain, limits): the receiver records the
                # close code and whatever arrived before it.
                pass
    return result
