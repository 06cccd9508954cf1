"""The server side of a WebSocket, with limits that count every frame as it arrives.

trio-websocket hands a session whole messages and answers pings by itself, so what a peer sends
below the message level costs the server without being counted: fragments of a message still
arriving, pings and pongs. :class:`MeteredConnection` charges each of them to the session's
frame budget, checks the size of a message while its fragments arrive (discarding the rest of an
oversized one instead of buffering it), and reports a violation *in band*: the error arrives
from :meth:`~trio_websocket.WebSocketConnection.get_message` in place of a message, so the
session ends the way it ends for every other client error (its finals first, then the error,
then the close).
"""

from __future__ import annotations

import contextlib

import attrs
import trio
import wsproto.events
from trio_websocket import WebSocketConnection
from wsproto import ConnectionType, WSConnection

from .errors import MessageTooBig, RateLimited, SttError
from .ratelimit import TokenBucket

#: Messages the reader may hold before the session takes them (backpressure beyond that).
_MESSAGE_QUEUE = 1


@attrs.frozen
class FrameLimits:
    #: Largest message in bytes (text: characters), counted while its fragments arrive.
    max_message_size: int
    #: Frames (data fragments, pings, pongs) per second, sustained; bursts of twice that.
    #: 0 means no limit.
    max_frames_per_second: float


class MeteredConnection(WebSocketConnection):
    """A server-side WebSocket whose every frame is charged and whose messages are bounded."""

    def __init__(self, stream: trio.abc.Stream, limits: FrameLimits) -> None:
        super().__init__(
            stream,
            WSConnection(ConnectionType.SERVER),
            message_queue_size=_MESSAGE_QUEUE,
            max_message_size=limits.max_message_size,
        )
        self._limits = limits
        rate = limits.max_frames_per_second
        self._frames = TokenBucket.full(rate, 2 * rate, trio.current_time()) if rate else None
        self._discarding = False  # inside an oversized message: drop fragments until its end
        self._violated = False  # a fatal violation was reported: ignore the peer from now on

    async def _report(self, error: SttError) -> None:
        """Hand ``error`` to the session in place of a message; only the first one counts."""
        if self._violated:
            return
        self._violated = True
        self._message_parts = []
        self._message_size = 0
        # The channel is closed when the session is already closing: then nobody needs telling.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self._send_channel.send(error)  # type: ignore[arg-type]

    async def _charge_frame(self) -> bool:
        """Take one frame from the budget; False (after reporting) once it is spent."""
        if self._violated:
            return False
        if self._frames is not None and self._frames.take(1, trio.current_time()):
            await self._report(
                RateLimited(
                    f"more than {self._limits.max_frames_per_second:g} messages (frames) per second"
                )
            )
            return False
        return True

    async def _handle_message_event(
        self, event: wsproto.events.BytesMessage | wsproto.events.TextMessage
    ) -> None:
        if event.frame_finished and not await self._charge_frame():
            return
        if self._violated:
            return
        if self._discarding:
            self._discarding = not event.message_finished
            return
        size = self._message_size + len(event.data)
        if size > self._limits.max_message_size:
            self._discarding = not event.message_finished
            await self._report(
                MessageTooBig(
                    f"message of more than {self._limits.max_message_size} bytes exceeds the limit"
                )
            )
            return
        await super()._handle_message_event(event)

    async def _handle_ping_event(self, event: wsproto.events.Ping) -> None:
        if await self._charge_frame():
            await super()._handle_ping_event(event)

    async def _handle_pong_event(self, event: wsproto.events.Pong) -> None:
        # After a violation the session is closing, gracefully: pongs still count as signs of
        # life (uncharged), so a slow close is not taken for a dead peer.
        if self._violated or await self._charge_frame():
            await super()._handle_pong_event(event)


async def accept(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    limits: FrameLimits,
    *,
    subprotocol: str | None,
) -> MeteredConnection:
    """Run the server side of the opening handshake on ``stream`` (whose request head has been
    validated already) and return the open connection; its reader task lives in ``nursery``.

    This is trio-websocket's ``wrap_server_stream`` plus ``accept``, with our connection class.
    """
    connection = MeteredConnection(stream, limits)
    nursery.start_soon(connection._reader_task)
    request = await connection._get_request()
    await request.accept(subprotocol=subprotocol)
    return connection
