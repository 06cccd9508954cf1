"""Limits that count what costs, over real sockets: fragments and control frames, unfinished
handshakes, connection rate before the token check, refused clients that linger, and session
slots under parallel connects.

The misbehaving clients here write raw frames (``hostile.frame``) on a plain TCP socket and use
wsproto only to read what the server says, so they can do what no well-behaved library would.
"""

from __future__ import annotations

import functools
import json

import trio
import wsproto.events as ws_events
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection

from stt_server.config import Config
from stt_server.server import serve

from . import hostile
from .conftest import receive_until_closed, wait_until
from .test_security import make_token

DEADLINE = 30


async def start(nursery, speech_model, **settings):
    config = Config(**{"host": "127.0.0.1", "port": 0, "control_socket": "", **settings})
    server = await nursery.start(functools.partial(serve, config, model=speech_model))
    return server, f"ws://127.0.0.1:{server.port}/"


class RawSocket:
    """Handshake through wsproto (so it can decode the server's frames), then raw frames out."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.messages: list[dict] = []
        self.close_code: int | None = None

    @classmethod
    async def open(cls, port: int, path: str = "/") -> RawSocket:
        raw = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await raw.stream.send_all(
            raw.conn.send(ws_events.Request(host=f"127.0.0.1:{port}", target=path))
        )
        while not await raw._events_until(ws_events.AcceptConnection):
            pass
        return raw

    async def _events_until(self, kind: type) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError
        self.conn.receive_data(data)
        found = False
        for event in self.conn.events():
            if isinstance(event, ws_events.TextMessage):
                self.messages.append(json.loads(event.data))
            elif isinstance(event, ws_events.CloseConnection):
                self.close_code = event.code
            found = found or isinstance(event, kind)
        return found

    async def read_until_close(self) -> None:
        """Read until the server's close frame (not answering it) or EOF."""
        try:
            while self.close_code is None:
                await self._events_until(ws_events.CloseConnection)
        except (EOFError, trio.BrokenResourceError):
            pass

    async def send(self, data: bytes) -> bool:
        """Send raw bytes; False once the server has hung up."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True


async def test_fragments_of_an_unfinished_message_count_toward_max_message_size(
    nursery, speech_model
) -> None:
    server, _ = await start(nursery, speech_model, max_message_size=64 * 1024)
    with trio.fail_after(DEADLINE):
        raw = await RawSocket.open(server.port)
        fragment = b"\x00" * (16 * 1024)
        # A binary message that never ends: fragments of 16 KiB, never a FIN.
        await raw.send(hostile.frame(0x2, fragment, fin=False))
        for _ in range(20):
            if not await raw.send(hostile.frame(0x0, fragment, fin=False)):
                break
            await trio.sleep(0.01)
        await raw.read_until_close()
    assert raw.close_code == 1009
    errors = [m for m in raw.messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["message_too_big"]
    await wait_until(lambda: not server.sessions)


async def test_pings_and_pongs_count_toward_the_frame_rate(nursery, speech_model) -> None:
    server, _ = await start(nursery, speech_model, max_messages_per_second=10.0)
    with trio.fail_after(DEADLINE):
        raw = await RawSocket.open(server.port)
        for _ in range(15):  # within the burst of 20
            await raw.send(hostile.frame(0x9, b"ping"))
        await trio.sleep(1.2)  # refills 12
        assert server.sessions  # still served
        for _ in range(60):  # unsolicited pongs alone: they must be charged too
            if not await raw.send(hostile.frame(0xA, b"x")):
                break
        await raw.read_until_close()
    assert raw.close_code == 1008
    assert [m["code"] for m in raw.messages if m["type"] == "error"] == ["rate_limited"]


async def test_unfinished_handshakes_are_capped_per_address_and_in_total(
    nursery, speech_model
) -> None:
    async def is_dropped_at_once(port: int) -> bool:
        """A connection that says nothing: dropped at once, or left to its handshake_timeout?"""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with trio.move_on_after(1.0):
                return await stream.receive_some(1) == b""
        return False

    def handshaking(server, count: int) -> bool:
        return server.statistics().handshaking == count

    for settings in ({"max_handshakes_per_ip": 3}, {"max_handshakes": 3}):
        server, url = await start(nursery, speech_model, handshake_timeout=10.0, **settings)
        with trio.fail_after(DEADLINE):
            silent = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(3)]
            await wait_until(functools.partial(handshaking, server, 3))
            assert await is_dropped_at_once(server.port), settings
            assert server.statistics().refused == {"handshake_limit": 1}
            for stream in silent:
                await stream.aclose()
            await wait_until(functools.partial(handshaking, server, 0))
            async with open_websocket_url(url) as ws:  # room again
                assert json.loads(await ws.get_message())["type"] == "session"


async def test_connection_rate_is_charged_before_the_token_is_checked(
    nursery, speech_model, tmp_path
) -> None:
    token, tokens_file = make_token(tmp_path)
    server, url = await start(
        nursery, speech_model, tokens_file=tokens_file, connections_per_minute=3
    )
    with trio.fail_after(DEADLINE):
        for _ in range(3):  # guesses: each costs a connection
            reply = await hostile.exchange(server.port, hostile.upgrade_request("/?token=guess"))
            assert reply.startswith(b"HTTP/1.1 401 ")
        async with open_websocket_url(f"{url}?token={token}") as ws:
            messages, code = await receive_until_closed(ws)
    assert code == 1008 and messages[0]["code"] == "rate_limited" and messages[0]["retry_after"]
    assert server.statistics().refused == {"unauthorized": 3, "rate_limited": 1}


async def test_a_refused_client_that_ignores_the_close_is_dropped_at_once(
    nursery, speech_model
) -> None:
    server, url = await start(nursery, speech_model, max_connections=1)
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(url) as first:
            await first.get_message()
            raw = await RawSocket.open(server.port)
            began = trio.current_time()
            await raw.read_until_close()  # the error and the close frame, never answered
            try:
                while await raw.stream.receive_some(1024):
                    pass
            except trio.BrokenResourceError:
                pass
            held = trio.current_time() - began
    assert raw.messages[0]["code"] == "server_busy" and raw.close_code == 1013
    assert held < 2.5, f"a refused client held its socket for {held:.1f} s"


async def test_parallel_connects_cannot_overshoot_the_per_address_limit(
    nursery, speech_model
) -> None:
    # Simulated GPUs make admission await fresh readings: the window a race would need.
    _, url = await start(nursery, speech_model, max_sessions_per_ip=2, simulate_gpus="24576:1000")
    greeted: list[str] = []
    refused: list[str] = []
    everyone_answered = trio.Event()

    async def connect() -> None:
        try:
            async with open_websocket_url(url) as ws:
                first = json.loads(await ws.get_message())
                (greeted if first["type"] == "session" else refused).append(first["type"])
                if len(greeted) + len(refused) == 8:
                    everyone_answered.set()
                if first["type"] == "session":
                    await everyone_answered.wait()  # hold the slot while the others try
        except ConnectionClosed:
            pass

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as clients:
            for _ in range(8):
                clients.start_soon(connect)
    assert len(greeted) == 2 and len(refused) == 6, (greeted, refused)


async def test_listening_beyond_loopback_without_tokens_warns(nursery, speech_model, caplog):
    caplog.set_level("WARNING")
    await start(nursery, speech_model, host="0.0.0.0")
    assert "listening beyond loopback without tokens" in caplog.text
    caplog.clear()
    await start(nursery, speech_model, host="127.0.0.1")
    assert "without tokens" not in caplog.text
