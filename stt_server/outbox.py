"""A session's bounded outbox: finals are never dropped, a partial is replaced by the next.

Messages that must arrive (the ``session`` greeting, ``completed`` and ``error``) wait in a FIFO
of at most ``max_pending`` entries and ``max_bytes`` bytes (UTF-8); overflowing it means the
client has stopped reading for so long that it is treated as gone (:class:`OutboxOverflow`).
Partials sit in a single slot that the next partial overwrites, behind the FIFO, so a slow
reader sees fewer, fresher partials and never a partial of an utterance that has already been
completed. A partial may be given as a function that renders it: it is called only when the
partial is taken for sending (and may then find nothing to send), so what it says can depend on
what the client has actually been sent before (the OpenAI dialect's deltas).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import trio

#: A partial, or what renders it when it is taken (``None``: nothing to send after all).
Partial = str | Callable[[], str | None]


class OutboxOverflow(Exception):
    """More reliable messages are waiting than the client is allowed to leave unread."""


class Outbox:
    def __init__(self, max_pending: int, max_bytes: int) -> None:
        self._max = max_pending
        self._max_bytes = max_bytes
        self._bytes = 0
        self._reliable: collections.deque[tuple[str, int]] = collections.deque()
        self._partial: tuple[int, Partial] | None = None
        self._closed = False
        self._lot = trio.lowlevel.ParkingLot()

    def put(self, message: str) -> None:
        """Queue a message that must be delivered."""
        if self._closed:
            raise trio.ClosedResourceError("outbox is closed")
        if len(self._reliable) >= self._max:
            raise OutboxOverflow(f"{len(self._reliable)} messages are waiting unread")
        size = len(message.encode())
        if self._bytes + size > self._max_bytes:
            raise OutboxOverflow(f"{self._bytes + size} bytes are waiting unread")
        self._reliable.append((message, size))
        self._bytes += size
        self._lot.unpark_all()

    def put_final(self, message: str, utterance_id: int) -> None:
        """Queue a final; any partial of this or an earlier utterance is now stale."""
        if self._partial is not None and self._partial[0] <= utterance_id:
            self._partial = None
        self.put(message)

    def put_partial(self, message: Partial, utterance_id: int) -> None:
        if self._closed:
            return
        self._partial = (utterance_id, message)
        self._lot.unpark_all()

    def close(self) -> None:
        """No more messages; :meth:`get` drains what is queued, then returns ``None``."""
        self._closed = True
        self._partial = None
        self._lot.unpark_all()

    @property
    def pending(self) -> int:
        return len(self._reliable) + (self._partial is not None)

    async def get(self) -> str | None:
        while True:
            if self._reliable:
                message, size = self._reliable.popleft()
                self._bytes -= size
                return message
            if self._partial is not None:
                partial, self._partial = self._partial[1], None
                rendered = partial if isinstance(partial, str) else partial()
                if rendered is not None:
                    return rendered
                continue
            if self._closed:
                return None
            await self._lot.park()
