"""Peers that stop taking part: a client that stops reading, and one that never answers a ping.

Both are dropped by the server, within bounded time, while a well-behaved client beside them is
served as if nothing happened. trio-websocket's client reads in the background and answers pings
by itself, so the misbehaving clients here are written directly over wsproto and a TCP socket:
they do exactly, and only, what each test makes them do.

The model here answers at once (these tests are about the wire, not about words) with a long
final, so that a few finals fill the TCP buffers of a client that does not read.
"""

from __future__ import annotations

import functools
import json
import socket
import time

import attrs
import numpy as np
import pytest
import trio
import wsproto.events as ws_events
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection

from stt_server.config import Config
from stt_server.engine import TranscribeOptions
from stt_server.server import serve

from .conftest import receive_until_closed, wait_until

DEADLINE = 20
FLUSH = '{"type":"flush"}'
END = '{"type":"end"}'

#: Sent as fast as the test likes: no real-time or message-rate limit gets in the way.
UNLIMITED = {"max_realtime_factor": 0.0, "max_messages_per_second": 0.0, "context_seconds": 0.0}


@attrs.define
class LongWinded:
    """Every final is 5,000 characters; partials are empty (nothing is sent for them)."""

    name: str = "long-winded"
    finals: int = 0

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> str:
        if not options.final:
            return ""
        self.finals += 1
        return "word " * 1000


@pytest.fixture
def speech_model() -> LongWinded:
    """Replaces conftest's real model for every server these tests start."""
    return LongWinded()


class RawClient:
    """A WebSocket client over wsproto on a plain TCP socket, with no background tasks: it
    reads only inside :meth:`read_until_closed`, and answers pings only when told to."""

    def __init__(self, stream: trio.SocketStream, conn: WSConnection) -> None:
        self.stream = stream
        self.conn = conn
        self.pings = 0
        self.close_code: int | None = None
        self._sending = trio.Lock()  # pongs from the reading task, messages from the test

    @classmethod
    async def connect(cls, port: int, *, receive_buffer: int | None = None) -> tuple:
        """Connect, upgrade, and read the ``session`` greeting; returns (client, greeting)."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Before connect(), so that the window offered in the handshake is small too.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        client = cls(trio.SocketStream(sock), WSConnection(ConnectionType.CLIENT))
        await client.stream.send_all(
            client.conn.send(ws_events.Request(host=f"127.0.0.1:{port}", target="/"))
        )
        text = ""
        while True:
            events = await client._receive()
            assert events is not None, "server hung up during the handshake"
            for event in events:
                if isinstance(event, ws_events.RejectConnection):
                    raise AssertionError(f"refused with HTTP {event.status_code}")
                if isinstance(event, ws_events.TextMessage):
                    text += event.data
                    if event.message_finished:
                        return client, json.loads(text)

    async def _receive(self) -> list[ws_events.Event] | None:
        data = await self.stream.receive_some(65536)
        if not data:
            return None
        self.conn.receive_data(data)
        return list(self.conn.events())

    async def send(self, event: ws_events.Event) -> None:
        async with self._sending:
            await self.stream.send_all(self.conn.send(event))

    async def read_until_closed(self, *, answer_pings: bool) -> None:
        """Read and drop messages until the server closes; count pings, answer them or not."""
        while (events := await self._receive()) is not None:
            for event in events:
                if isinstance(event, ws_events.Ping):
                    self.pings += 1
                    if answer_pings:
                        await self.send(event.response())
                elif isinstance(event, ws_events.CloseConnection):
                    self.close_code = event.code
                    await self.send(event.response())  # complete the closing handshake
                    return

    async def aclose(self) -> None:
        await self.stream.aclose()


def session_ended_with(caplog, session_id: str, reason: str) -> bool:
    return any(
        f"session {session_id} end" in r.getMessage() and f"reason={reason}" in r.getMessage()
        for r in caplog.records
    )


@attrs.define
class GoodClient:
    """Speaks, flushes and reads each answer, round after round, until told to stop."""

    url: str
    speech: bytes
    stop: trio.Event = attrs.Factory(trio.Event)
    latencies: list[float] = attrs.Factory(list)
    messages: list[dict] = attrs.Factory(list)
    close_code: int | None = None

    async def run(self) -> None:
        async with open_websocket_url(self.url) as ws:
            assert json.loads(await ws.get_message())["type"] == "session"
            while not self.stop.is_set() or len(self.latencies) < 3:
                await ws.send_message(self.speech)
                await ws.send_message(FLUSH)
                flushed = trio.current_time()
                while True:
                    message = json.loads(await ws.get_message())
                    self.messages.append(message)
                    if message["type"] in ("completed", "error"):
                        break
                self.latencies.append(trio.current_time() - flushed)
                await trio.sleep(0.05)
            await ws.send_message(END)
            rest, self.close_code = await receive_until_closed(ws)
            self.messages.extend(rest)


async def flood(client: RawClient, speech: bytes, rounds: int) -> None:
    """Speech and a flush, ``rounds`` times, never reading what comes back; stops when the
    server hangs up (it closes a client that stopped reading)."""
    try:
        for _ in range(rounds):
            await client.send(ws_events.BytesMessage(data=speech))
            await client.send(ws_events.TextMessage(data=FLUSH))
            await trio.sleep(0.02)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def check_unaffected(good: GoodClient) -> None:
    kinds = [m["type"] for m in good.messages]
    assert "error" not in kinds, good.messages
    assert kinds.count("completed") == len(good.latencies) >= 3
    assert max(good.latencies) < 2.0, good.latencies
    assert good.close_code == 1000


@pytest.mark.parametrize(
    "server_config", [{**UNLIMITED, "send_timeout": 1.0, "max_pending_finals": 1000}], indirect=True
)
async def test_a_client_that_stops_reading_is_dropped_after_send_timeout(
    running_server, clip, caplog
) -> None:
    """The outbox is far from full (1000 allowed); only ``send_timeout`` can drop this client."""
    caplog.set_level("INFO")
    server = running_server.server
    speech = clip("ldc93s1.wav").tobytes()
    good = GoodClient(running_server.url, speech)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(good.run)
            # A 4 KiB receive buffer: the server's sends block after a few finals.
            stuck, greeting = await RawClient.connect(server.port, receive_buffer=4096)
            session_id = greeting["session_id"]
            session = server.sessions[session_id]
            started = trio.current_time()
            # 20 finals of 5 kB: many more than the TCP buffers hold, far fewer than the outbox.
            await flood(stuck, speech, rounds=20)
            await wait_until(lambda: session_id not in server.sessions)
            dropped_after = trio.current_time() - started
            good.stop.set()
        await stuck.aclose()
    assert session.end_reason == "client stopped reading"
    assert session_ended_with(caplog, session_id, "client stopped reading")
    # Finals really were waiting: more than the TCP buffers hold (about 5 of these).
    assert session.statistics().utterances >= 10
    # Not before a send had waited send_timeout, and not much after.
    assert 1.0 <= dropped_after < 4.0, dropped_after
    check_unaffected(good)


@pytest.mark.parametrize(
    "server_config", [{**UNLIMITED, "send_timeout": 60.0, "max_pending_finals": 2}], indirect=True
)
async def test_a_client_that_stops_reading_is_dropped_once_max_pending_finals_wait(
    running_server, clip, caplog
) -> None:
    """``send_timeout`` is 60 s, longer than the test may take: only the bound on finals
    waiting unread (2 here) can drop this client."""
    caplog.set_level("INFO")
    server = running_server.server
    speech = clip("ldc93s1.wav").tobytes()
    good = GoodClient(running_server.url, speech)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(good.run)
            stuck, greeting = await RawClient.connect(server.port, receive_buffer=4096)
            session_id = greeting["session_id"]
            session = server.sessions[session_id]
            # 30 finals of 5 kB: more than the TCP buffers and the outbox hold together, and
            # too few bytes (150 kB) for any bound on the outbox's bytes to be what drops it.
            nursery.start_soon(flood, stuck, speech, 30)
            await wait_until(lambda: session_id not in server.sessions)
            good.stop.set()
            await wait_until(lambda: good.close_code is not None)
            nursery.cancel_scope.cancel()
        await stuck.aclose()
    assert session.end_reason == "client stopped reading"
    assert session_ended_with(caplog, session_id, "client stopped reading")
    # About 5 finals fit in the TCP buffers, 1 in the emitter's hands, 2 in the outbox.
    assert session.statistics().utterances < 15
    check_unaffected(good)


@pytest.mark.parametrize(
    "server_config", [{"ping_interval": 0.25, "ping_timeout": 1.0}], indirect=True
)
async def test_a_client_that_never_answers_pings_is_dropped_and_one_that_does_stays(
    running_server, caplog
) -> None:
    caplog.set_level("INFO")
    server = running_server.server
    with trio.fail_after(DEADLINE):
        deaf, greeting = await RawClient.connect(server.port)
        deaf_id = greeting["session_id"]
        deaf_session = server.sessions[deaf_id]
        polite, greeting = await RawClient.connect(server.port)
        polite_id = greeting["session_id"]
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            # Both read everything; they differ only in answering pings. Neither sends audio:
            # silence is never a reason to close.
            nursery.start_soon(functools.partial(deaf.read_until_closed, answer_pings=False))
            nursery.start_soon(functools.partial(polite.read_until_closed, answer_pings=True))
            await wait_until(lambda: deaf_id not in server.sessions)
            dropped_after = trio.current_time() - started
            # The same stretch again, and more: the polite client stays through all of it.
            await trio.sleep(max(0.0, 3.0 - dropped_after))
            assert polite_id in server.sessions
            await polite.send(ws_events.TextMessage(data=END))
            await wait_until(lambda: polite.close_code is not None)
            nursery.cancel_scope.cancel()
        await deaf.aclose()
        await polite.aclose()
    assert deaf.pings >= 1  # it was asked, and said nothing
    assert deaf_session.end_reason == "ping timeout"
    assert session_ended_with(caplog, deaf_id, "ping timeout")
    # First ping after 0.25 s, then 1 s without a pong.
    assert 1.0 <= dropped_after < 3.0, dropped_after
    assert polite.pings >= 8  # it answered every one for 3 s
    assert polite.close_code == 1000


@attrs.define
class SlowFinals:
    """Finals take two seconds: longer than the ping timeout below."""

    name: str = "slow-finals"

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> str:
        if not options.final:
            return ""
        time.sleep(2.0)
        return "slow words"


async def test_a_graceful_close_outlasts_the_ping_timeout_while_the_client_streams_on(
    nursery, clip
) -> None:
    """The session is closed for its length while a slow final is owed and the client keeps
    sending: the final must still arrive, then the reason, then 1008. Liveness stops counting
    once the close has begun (it is bounded by finish_timeout instead)."""
    config = Config(
        host="127.0.0.1",
        port=0,
        control_socket="",
        ping_interval=0.25,
        ping_timeout=0.5,
        max_session_length=2.5,
        speculative_finals=False,
        context_seconds=0.0,
        max_realtime_factor=0.0,
    )
    server = await nursery.start(functools.partial(serve, config, model=SlowFinals()))
    speech = clip("ldc93s1.wav")
    messages: list[dict] = []
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
            await ws.get_message()

            async def keep_streaming() -> None:
                try:
                    for _ in range(100):  # real time, for longer than the session may last
                        for i in range(0, speech.size, 1600):
                            await ws.send_message(speech[i : i + 1600].tobytes())
                            await trio.sleep(0.1)
                except ConnectionClosed:
                    pass

            async with trio.open_nursery() as sending:
                sending.start_soon(keep_streaming)
                received, code = await receive_until_closed(ws)
                sending.cancel_scope.cancel()
            messages += received
    kinds = [(m["type"], m.get("code")) for m in messages]
    assert ("completed", None) in kinds, kinds
    assert kinds[-1] == ("error", "session_too_long") and code == 1008, (kinds, code)
