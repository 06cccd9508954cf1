"""A streaming WebSocket client for the server's protocol: the tests', the benchmarks' and the
load tester's.

:func:`connect` opens a session (optionally from a chosen local address, with a token, over
TLS) and gives a :class:`Stream`: it sends audio paced at real time (or faster) and hands the
server's messages back as :mod:`events` as they arrive, each stamped with its arrival time. It
remembers when each piece of audio went out, so for every ``completed`` it can tell how long
after the utterance's last audio had been sent the text arrived.

:func:`stream_audio` is the one-call form the tests use: stream a clip, collect everything in a
:class:`StreamResult`, return when the server has closed.
"""

from __future__ import annotations

import base64
import bisect
import collections
import contextlib
import json
import ssl
import urllib.parse
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import attrs
import numpy as np
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from .events import Closed, Event, Final, Unknown, decode_message

__all__ = [
    "SAMPLE_RATE",
    "ConnectFailed",
    "ConnectionClosed",
    "Endpoint",
    "Progress",
    "Stream",
    "StreamResult",
    "connect",
    "read_wav",
    "stream_audio",
    "wav_rate",
]

SAMPLE_RATE = 16000

#: Chunks whose send time a :class:`Stream` remembers, to time finals (at 100 ms a chunk, five
#: minutes: far more than an utterance plus its latency, and bounded for week-long sessions).
SEND_HISTORY = 3000

#: Seconds our own close handshake may take before the socket is just closed.
CLOSE_WAIT = 2.0

#: Largest server message accepted (the server's are small JSON texts).
MAX_MESSAGE_SIZE = 1 << 20


def read_wav(path: str | Path) -> np.ndarray:
    """A 16-bit mono WAV as int16 samples (the shared clips and espeak-ng output are such)."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
            raise ValueError(f"{path}: need 16-bit mono PCM")
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").copy()


def wav_rate(path: str | Path) -> int:
    with wave.open(str(path), "rb") as wav:
        return wav.getframerate()


class ConnectFailed(Exception):
    """No WebSocket session could be opened: the address was unreachable, or the server (or a
    proxy) answered the upgrade with plain HTTP (``status``, e.g. 401, 502, 503)."""

    def __init__(self, reason: str, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.body = body


@attrs.frozen
class Endpoint:
    host: str
    port: int
    resource: str  # path and query
    secure: bool

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        secure = parts.scheme == "wss"
        resource = parts.path or "/"
        if parts.query:
            resource += "?" + parts.query
        return cls(parts.hostname, parts.port or (443 if secure else 80), resource, secure)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.secure else 80) else f"{host}:{self.port}"

    def http_url(self, path: str) -> str:
        """The plain-HTTP URL of ``path`` on the same host and port (``/health``, ``/metrics``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.secure else 'http'}://{host}:{self.port}{path}"


@attrs.define
class StreamResult:
    """Everything one :func:`stream_audio` session sent and received, and when."""

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

    @property
    def streamed(self) -> tuple[float, float] | None:
        """When the first and the last chunk of audio had been sent (None: none was)."""
        return (self.sent[0][0], self.sent[-1][0]) if self.sent else None

    def final_latencies(self, within: tuple[float, float] | None = None) -> list[float]:
        """For each final: arrival minus the moment its last audio had been sent. ``within``:
        only finals whose last audio was sent in that span of time."""
        out = []
        for t, m in self.messages:
            if m.get("type") == "completed":
                sent = self.sent_time(m["end"])
                if sent is not None and _inside(sent, within):
                    out.append(t - sent)
        return out

    def partial_intervals(self, within: tuple[float, float] | None = None) -> list[float]:
        """Gaps between consecutive partials of the same utterance. ``within``: only gaps
        that end in that span of time."""
        gaps, last = [], {}
        for t, m in self.messages:
            if m.get("type") == "realtime":
                uid = m["utterance_id"]
                if uid in last and _inside(t, within):
                    gaps.append(t - last[uid])
                last[uid] = t
        return gaps


def _inside(moment: float, span: tuple[float, float] | None) -> bool:
    return span is None or span[0] <= moment <= span[1]


@attrs.frozen
class Progress:
    """How a paced :meth:`Stream.stream` call went."""

    seconds: float  # audio sent by this call
    complete: bool  # False: stopped early at ``until``
    lag_max: float  # worst delay of a chunk behind its real-time schedule (send back-pressure)


@attrs.define(eq=False)
class Stream:
    """One open session: send audio and control messages, receive events.

    One task may receive (:meth:`receive` or ``async for event in stream``) while another
    sends. Sending on a closed connection raises ``ConnectionClosed``.
    """

    ws: WebSocketConnection
    sample_rate: int = SAMPLE_RATE
    binary: bool = False
    #: When set, every message and chunk is also recorded there (what :func:`stream_audio` returns).
    record: StreamResult | None = None
    #: Seconds of audio sent on this connection, at its sample rate.
    sent_seconds: float = 0.0
    closed: Closed | None = None
    _history: collections.deque[tuple[float, float]] = attrs.field(
        factory=lambda: collections.deque(maxlen=SEND_HISTORY)
    )

    # -- sending ---------------------------------------------------------------------------
    async def send_json(self, message: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(message))

    async def configure(self, **fields: Any) -> None:
        """``{"type":"config", ...}``; a new ``sample_rate`` also applies to what we send next."""
        await self.send_json({"type": "config", **fields})
        if "sample_rate" in fields:
            self.sample_rate = int(fields["sample_rate"])

    async def flush(self) -> None:
        await self.send_json({"type": "flush"})

    async def end(self) -> None:
        """Ask for the open utterance's ``completed`` and a normal close."""
        await self.send_json({"type": "end"})

    async def send_audio(self, samples: np.ndarray) -> None:
        """One chunk of int16 samples, as a binary frame or a JSON ``audio`` message."""
        chunk = samples.astype("<i2", copy=False).tobytes()
        if self.binary:
            await self.ws.send_message(chunk)
        else:
            await self.send_json(
                {
                    "type": "audio",
                    "data": base64.b64encode(chunk).decode(),
                    "sample_rate": self.sample_rate,
                }
            )
        self.sent_seconds += samples.size / self.sample_rate
        now = trio.current_time()
        self._history.append((now, self.sent_seconds))
        if self.record is not None:
            self.record.sent.append((now, self.sent_seconds))

    async def stream(
        self,
        samples: np.ndarray,
        *,
        speed: float = 1.0,
        chunk_seconds: float = 0.1,
        until: float | None = None,
    ) -> Progress:
        """Send ``samples`` in chunks, paced at ``speed`` x real time (0: as fast as the socket
        takes them). Stops between chunks once the trio clock passes ``until``: a send is never
        cancelled halfway, which would leave a torn frame on the socket."""
        step = max(1, int(chunk_seconds * self.sample_rate))
        start = trio.current_time()
        lag_max = 0.0
        for offset in range(0, samples.size, step):
            if until is not None and trio.current_time() >= until:
                return Progress(offset / self.sample_rate, False, lag_max)
            await self.send_audio(samples[offset : offset + step])
            if speed:
                now = trio.current_time()
                lag_max = max(lag_max, now - (start + offset / self.sample_rate / speed))
                await trio.sleep_until(start + (offset + step) / self.sample_rate / speed)
        return Progress(samples.size / self.sample_rate, True, lag_max)

    async def silence(
        self, seconds: float, *, speed: float = 1.0, until: float | None = None
    ) -> Progress:
        """Paced digital silence, as an open microphone sends between sentences."""
        return await self.stream(
            np.zeros(int(seconds * self.sample_rate), "<i2"), speed=speed, until=until
        )

    # -- receiving -------------------------------------------------------------------------
    async def receive(self) -> Event:
        """The next event; after the connection ends, :class:`Closed` (again on each call)."""
        if self.closed is not None:
            return self.closed
        try:
            raw = await self.ws.get_message()
        except ConnectionClosed as exc:
            reason = exc.reason
            self.closed = Closed(
                trio.current_time(),
                int(reason.code) if reason is not None else None,
                reason.reason if reason is not None else None,
            )
            if self.record is not None:
                self.record.close_code = self.closed.code
                self.record.close_reason = self.closed.reason
            return self.closed
        at = trio.current_time()
        try:
            message = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            message = {"raw": raw[:200]}
        if not isinstance(message, dict):
            return Unknown(at, {"raw": message})
        if self.record is not None:
            self.record.messages.append((at, message))
        return decode_message(message, at)

    async def __aiter__(self) -> AsyncIterator[Event]:
        """Events as they arrive, ending with (and including) :class:`Closed`."""
        while True:
            event = await self.receive()
            yield event
            if isinstance(event, Closed):
                return

    # -- timing ----------------------------------------------------------------------------
    def sent_at(self, audio_seconds: float) -> float | None:
        """When audio up to ``audio_seconds`` had been sent (None: not yet, or forgotten)."""
        history = self._history
        i = bisect.bisect_left(history, audio_seconds - 1e-6, key=lambda entry: entry[1])
        if i == len(history) or (i == 0 and len(history) == history.maxlen):
            return None  # not sent yet, or sent before the oldest chunk still remembered
        return history[i][0]

    def latency(self, final: Final) -> float | None:
        """Final latency: its arrival minus when its last audio (``end``) had been sent."""
        sent = self.sent_at(final.end)
        return None if sent is None else final.at - sent


def _raise_single(group: BaseExceptionGroup) -> NoReturn:
    """Re-raise the one real exception of a nursery's group, so that callers of :func:`connect`
    see ``ConnectionClosed`` or their own exception, never a group around it."""
    real = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    if len(real) == 1:
        raise real[0] from None
    raise group


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | None = None,
    source_address: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    binary: bool = False,
    sample_rate: int = SAMPLE_RATE,
    record: StreamResult | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> AsyncIterator[Stream]:
    """Open a session at ``url`` (``ws://`` or ``wss://``) and close it on exit.

    ``token`` goes in ``Authorization: Bearer``; ``source_address`` binds the local end (for
    example 127.0.0.2, to appear as another client behind an ``ip_hash`` balancer). Raises
    :class:`ConnectFailed` when no session could be opened; the server's own refusals
    (``server_busy`` ...) arrive as events, since the server accepts the upgrade to say why.
    Callers bound the connect with ``trio.fail_after``.
    """
    endpoint = Endpoint.from_url(url)
    extra = [(k.encode(), v.encode()) for k, v in headers]
    if token:
        extra.append((b"Authorization", f"Bearer {token}".encode()))
    try:
        async with trio.open_nursery() as nursery:
            try:
                tcp = await trio.open_tcp_stream(
                    endpoint.host, endpoint.port, local_address=source_address
                )
            except OSError as exc:
                raise ConnectFailed(f"cannot connect: {exc.strerror or exc}") from None
            transport: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
            if endpoint.secure:
                context = ssl_context or ssl.create_default_context()
                transport = trio.SSLStream(
                    tcp, context, server_hostname=endpoint.host, https_compatible=True
                )
                try:
                    await transport.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError) as exc:
                    await tcp.aclose()
                    raise ConnectFailed(f"TLS handshake failed: {exc}") from None
            # A refused upgrade (HTTP 401, 502, 503 ...) is raised by the reader task in the
            # nursery; it arrives below as a group.
            ws = await wrap_client_stream(
                nursery,
                transport,
                endpoint.host_header,
                endpoint.resource,
                extra_headers=extra,
                max_message_size=MAX_MESSAGE_SIZE,
            )
            stream = Stream(ws, sample_rate=sample_rate, binary=binary, record=record)
            try:
                yield stream
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_WAIT):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        rejected = [e for e in group.exceptions if isinstance(e, ConnectionRejected)]
        if rejected:
            exc = rejected[0]
            raise ConnectFailed(
                f"HTTP {exc.status_code}", exc.status_code, exc.body or b""
            ) from None
        _raise_single(group)


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
    token: str | None = None,
    source_address: str | None = None,
    config: dict[str, Any] | None = None,
) -> StreamResult:
    """Stream int16 ``samples`` to ``url`` and collect the replies until the server closes.

    ``speed`` 1.0 is real time, ``0`` as fast as possible. ``finish`` is ``"end"`` (send
    ``end``, then wait for the server's close), ``"close"`` (just close) or ``"none"``.
    ``config``: fields of a ``config`` message sent before the audio (language, task, prompt).
    """
    result = result if result is not None else StreamResult()
    if trailing_silence:
        samples = np.concatenate([samples, np.zeros(int(trailing_silence * sample_rate), "<i2")])
    async with connect(
        url,
        token=token,
        source_address=source_address,
        binary=binary,
        sample_rate=sample_rate,
        record=result,
    ) as stream:

        async def receive() -> None:
            async for _ in stream:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            try:
                fields = dict(config or {})
                if declare_rate and sample_rate != SAMPLE_RATE:
                    fields["sample_rate"] = sample_rate
                if fields:
                    await stream.configure(**fields)
                await stream.stream(samples, speed=speed, chunk_seconds=chunk_seconds)
                if finish == "end":
                    await stream.end()
                elif finish == "close":
                    nursery.cancel_scope.cancel()
            except ConnectionClosed:
                # The server ended the session (kick, drain, limits): the receiver records the
                # close code and whatever arrived before it.
                pass
    return result
