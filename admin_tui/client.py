"""The console's side of the control socket (asyncio, because Textual runs on asyncio).

The app depends only on the small :class:`Control` protocol, so tests can hand it canned
snapshots; :class:`ControlClient` is the real one. Every failure becomes a
:class:`ControlUnavailable` whose message is fit to show an operator as it is.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

#: A request that gets no reply in this time means the server is stuck or gone.
REQUEST_TIMEOUT = 5.0

#: Longest reply line accepted (a snapshot with thousands of sessions fits easily).
MAX_LINE = 32 * 1024 * 1024


class ControlUnavailable(Exception):
    """The server cannot be reached or refused us; the message says which, for a person."""


class Control(Protocol):
    path: Path

    async def request(self, **request: Any) -> dict[str, Any]: ...

    def watch(self, interval: float) -> AsyncIterator[dict[str, Any]]: ...


class ControlClient:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path), limit=MAX_LINE), REQUEST_TIMEOUT
            )
        except FileNotFoundError:
            raise ControlUnavailable(f"no server: {self.path} does not exist") from None
        except ConnectionRefusedError:
            raise ControlUnavailable(
                f"server not running (nobody listens on {self.path})"
            ) from None
        except PermissionError:
            raise ControlUnavailable(
                f"permission denied on {self.path}: run as the server's user or join its "
                "control_group"
            ) from None
        except (OSError, TimeoutError) as exc:
            raise ControlUnavailable(f"cannot connect to {self.path}: {exc}") from None

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            line = await reader.readline()
        except (OSError, ValueError) as exc:
            raise ControlUnavailable(f"connection lost: {exc}") from None
        if not line:
            raise ControlUnavailable("the server closed the connection")
        try:
            reply = json.loads(line)
        except ValueError:
            raise ControlUnavailable("the server sent something that is not JSON") from None
        if not isinstance(reply, dict):
            raise ControlUnavailable("the server sent an unexpected reply")
        if reply.get("error") == "permission denied":
            raise ControlUnavailable("permission denied by the server: join its control_group")
        return reply

    async def _read_within(self, reader: asyncio.StreamReader, seconds: float) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self._read(reader), seconds)
        except TimeoutError:
            raise ControlUnavailable("the server did not answer in time") from None

    async def request(self, **request: Any) -> dict[str, Any]:
        """One request, one reply (``{"ok": ...}``); a new connection each time, so a server
        restart between actions is invisible."""
        reader, writer = await self._connect()
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            return await self._read_within(reader, REQUEST_TIMEOUT)
        except OSError as exc:
            raise ControlUnavailable(f"connection lost: {exc}") from None
        finally:
            writer.close()

    async def watch(self, interval: float) -> AsyncIterator[dict[str, Any]]:
        """Snapshots until the connection ends (then :class:`ControlUnavailable`)."""
        reader, writer = await self._connect()
        try:
            writer.write(json.dumps({"cmd": "watch", "interval": interval}).encode() + b"\n")
            await writer.drain()
            while True:
                # A missed beat or two is fine; silence for much longer means a hung server.
                reply = await self._read_within(reader, interval * 3 + REQUEST_TIMEOUT)
                if not reply.get("ok"):
                    raise ControlUnavailable(reply.get("error", "watch refused"))
                yield reply["snapshot"]
        except OSError as exc:
            raise ControlUnavailable(f"connection lost: {exc}") from None
        finally:
            writer.close()
