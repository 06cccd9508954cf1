"""Locust users that speak to stt-server over its WebSocket protocol.

For operators who already run Locust, and for load from many machines (Locust's distributed
mode). stt-loadtest (``stt_server.loadtest``) is the tool with the richer report; this file
drives the same protocol with the same behaviour: each user opens a session, speaks a clip at
real-time pace, sends a second of silence so the server hears the end of the sentence, pauses
(``wait_time``), and speaks again on the same session until Locust stops it.

    pip install locust websocket-client
    locust -f deploy/locust/locustfile.py --host ws://stt.example.com:8012/ \\
        --users 50 --spawn-rate 5 --run-time 5m --headless
    # distributed: one master, any number of workers (each needs this file and the audio)
    locust -f deploy/locust/locustfile.py --master --host ws://stt.example.com:8012/
    locust -f deploy/locust/locustfile.py --worker --master-host MASTER

Options (after Locust's own): ``--stt-audio DIR`` (16 kHz mono 16-bit WAV files; default:
the clips shipped in the stt-server package when it is installed), ``--stt-token TOKEN``,
``--stt-speed 1.0``, ``--stt-binary``.

What Locust reports (request type ``STT``):

- ``session``: time from the connect to the server's ``session`` message; a refusal
  (``server_busy``, ``rate_limited``, ``unauthorized``) or a failed connect is a failure;
- ``final latency``: for every ``completed``, the time from when the client had sent the
  audio up to the utterance's end to the arrival of the text (the figure stt-loadtest calls
  final latency; it includes the server's endpointing wait);
- ``error <code>``: each error message inside a session, as a failure;
- ``closed``: a session the server closed before the user was done (drain, kick), as a failure.
"""

from __future__ import annotations

import base64
import bisect
import json
import random
import time
import wave
from pathlib import Path

import gevent
import websocket  # websocket-client
from locust import User, between, events, task

CHUNK_SECONDS = 0.1
RATE = 16000
TRAILING_SILENCE = 1.0
REFUSALS = {"server_busy", "rate_limited", "unauthorized"}


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--stt-audio", default="", help="directory of 16 kHz mono PCM16 WAVs")
    parser.add_argument("--stt-token", default="", help="Bearer token for the server")
    parser.add_argument("--stt-speed", type=float, default=1.0, help="1 = real time")
    parser.add_argument("--stt-binary", action="store_true", help="binary audio frames")


def _audio_dir(option: str) -> Path:
    if option:
        return Path(option)
    try:
        from stt_server.loadtest.clips import CLIPS_DIR
    except ImportError:
        raise SystemExit("--stt-audio DIR is required (stt-server is not installed here)") from None
    return CLIPS_DIR


_CLIPS: list[tuple[str, bytes]] = []


def clips(option: str) -> list[tuple[str, bytes]]:
    """Every WAV in the directory as raw PCM16 bytes, loaded once per process."""
    if not _CLIPS:
        for path in sorted(_audio_dir(option).glob("*.wav")):
            with wave.open(str(path), "rb") as wav:
                if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) != (RATE, 1, 2):
                    raise SystemExit(
                        f"{path}: need 16 kHz mono 16-bit (sox in.wav -r 16000 -c 1 -b 16 out.wav)"
                    )
                _CLIPS.append((path.name, wav.readframes(wav.getnframes())))
        if not _CLIPS:
            raise SystemExit(f"no .wav files in {_audio_dir(option)}")
    return _CLIPS


class SttUser(User):
    """One person with an open session: speak, pause, speak."""

    wait_time = between(1, 4)  # the pause between sentences (nothing is sent meanwhile)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.speed = max(0.01, options.stt_speed)
        self.binary = options.stt_binary
        self.token = options.stt_token
        self.clips = clips(options.stt_audio)
        self.ws: websocket.WebSocket | None = None
        self.reader: gevent.Greenlet | None = None
        self.sent: list[tuple[float, float]] = []  # (audio seconds sent, time), growing
        self.audio = 0.0

    def on_stop(self) -> None:
        self._close()

    # -- reporting -------------------------------------------------------------------------
    def _report(self, name: str, seconds: float, length: int = 0, exc: Exception | None = None):
        events.request.fire(
            request_type="STT",
            name=name,
            response_time=seconds * 1000.0,
            response_length=length,
            exception=exc,
            context={},
        )

    # -- the session -----------------------------------------------------------------------
    def _connect(self) -> bool:
        headers = [f"Authorization: Bearer {self.token}"] if self.token else []
        start = time.perf_counter()
        try:
            ws = websocket.create_connection(self.host, header=headers, timeout=30)
            first = json.loads(ws.recv())
        except Exception as exc:  # any failure to open a session is one failed request
            self._report("session", time.perf_counter() - start, exc=exc)
            return False
        if first.get("type") != "session":
            code = first.get("code", first.get("type"))
            self._report("session", time.perf_counter() - start, exc=RuntimeError(code))
            ws.close()
            retry = first.get("retry_after") if code in REFUSALS else None
            gevent.sleep(float(retry or 1.0))
            return False
        self._report("session", time.perf_counter() - start, len(first.get("session_id", "")))
        self.ws, self.sent, self.audio = ws, [], 0.0
        self.reader = gevent.spawn(self._read, ws)
        return True

    def _read(self, ws: websocket.WebSocket) -> None:
        """Runs beside the speaking task: every message as it arrives."""
        while True:
            try:
                raw = ws.recv()
            except Exception:  # closed, reset, timed out: the session is over
                break
            if not raw:
                break
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            kind = message.get("type")
            if kind == "completed":
                sent_at = self._sent_at(float(message.get("end", 0.0)))
                if sent_at is not None:
                    latency = time.perf_counter() - sent_at
                    self._report("final latency", latency, len(message.get("text", "")))
            elif kind == "error":
                code = message.get("code", "?")
                self._report(f"error {code}", 0.0, exc=RuntimeError(message.get("message", code)))
        if self.ws is ws:
            self.ws = None
            self._report("closed", 0.0, exc=RuntimeError("server closed the session"))

    def _sent_at(self, audio_seconds: float) -> float | None:
        i = bisect.bisect_left(self.sent, (audio_seconds - 1e-6, 0.0))
        return self.sent[i][1] if i < len(self.sent) else None

    def _send(self, pcm: bytes) -> None:
        assert self.ws is not None
        if self.binary:
            self.ws.send_binary(pcm)
        else:
            data = base64.b64encode(pcm).decode()
            self.ws.send(json.dumps({"type": "audio", "data": data, "sample_rate": RATE}))
        self.audio += len(pcm) / 2 / RATE
        self.sent.append((self.audio, time.perf_counter()))
        if len(self.sent) > 3000:  # five minutes of chunks is plenty to time any final
            del self.sent[:1000]

    def _speak(self, pcm: bytes) -> None:
        step = int(CHUNK_SECONDS * RATE) * 2
        start = time.perf_counter()
        for offset in range(0, len(pcm), step):
            self._send(pcm[offset : offset + step])
            due = start + (offset + step) / 2 / RATE / self.speed
            gevent.sleep(max(0.0, due - time.perf_counter()))

    def _close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            try:
                ws.send(json.dumps({"type": "end"}))
                if self.reader is not None:
                    self.reader.join(timeout=10)
            except Exception:  # already gone: nothing left to finish
                pass
            ws.close()

    @task
    def speak_a_sentence(self) -> None:
        if self.ws is None and not self._connect():
            return
        _, pcm = random.choice(self.clips)
        try:
            self._speak(pcm)
            self._speak(bytes(int(TRAILING_SILENCE * RATE) * 2))
        except Exception:  # the server closed meanwhile; the reader reported it
            self.ws = None
