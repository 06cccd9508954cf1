"""Plain HTTP on the WebSocket port: ``/health``, ``/metrics``, the browser page (``/`` and
``/static/``, see :mod:`.static`), and a 404 for everything else.

Every connection's request head is read here first (h11 parses it). An upgrade to WebSocket is
handed on to trio-websocket through :class:`ReplayStream`, which gives back the bytes already
read; any other request gets one response and the connection is closed. So a load balancer can
health-check and Prometheus can scrape the very port the clients use.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
import h11
import trio

from . import static
from .errors import excerpt

#: A request head larger than this is refused (431): real ones are a few hundred bytes.
MAX_HEAD_BYTES = 16 * 1024

_REASONS = {
    200: "OK",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class RequestHead:
    method: str
    target: str
    headers: dict[str, str]
    #: Parsed once, at the boundary: code that reads these can never meet a malformed URL.
    path: str = "/"
    query: str = ""

    @property
    def is_websocket(self) -> bool:
        return "websocket" in self.headers.get("upgrade", "").lower()


def _split_target(target: str) -> tuple[str, str]:
    """Path and query of a request target, or 400: urllib raises on targets such as ``//[``."""
    if not target.startswith("/"):
        # Absolute-form (a proxy request) or ``*``: nothing this server serves.
        raise BadRequest(400, "request target must be a path")
    try:
        parts = urlsplit(target)
    except ValueError:
        raise BadRequest(400, "malformed request target") from None
    return parts.path or "/", parts.query


def _check_websocket_upgrade(headers: dict[str, str]) -> None:
    """The handshake fields wsproto insists on, checked here so that a bad upgrade gets a clear
    400 at once instead of a half-finished handshake that holds the connection until timeout."""
    if "upgrade" not in {t.strip().lower() for t in headers.get("connection", "").split(",")}:
        raise BadRequest(400, "WebSocket upgrade needs 'Connection: Upgrade'")
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise BadRequest(400, "only WebSocket version 13 is supported")
    key = headers.get("sec-websocket-key", "").strip()
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        raise BadRequest(400, "Sec-WebSocket-Key must be 16 bytes in base64")


def parse_request_head(raw: bytes) -> RequestHead:
    """Parse bytes that contain a complete head (up to the blank line).

    Everything past this function sees only ASCII: h11 lets bytes 0x80-0xFF through in header
    values (obs-text), which wsproto and urllib would later choke on with exceptions of their
    own, so they are refused here with a 400.
    """
    connection = h11.Connection(h11.SERVER)
    try:
        connection.receive_data(raw)
        event = connection.next_event()
    except h11.RemoteProtocolError as exc:
        raise BadRequest(400, f"malformed request: {excerpt(str(exc), 80)}") from None
    if not isinstance(event, h11.Request):
        raise BadRequest(400, "malformed request")
    if not event.target.isascii():
        raise BadRequest(400, "request target must be ASCII")
    headers: dict[str, str] = {}
    for name, value in event.headers:
        if not value.isascii():
            raise BadRequest(400, "header values must be ASCII")
        key = name.decode("ascii").lower()
        text = value.decode("ascii")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = event.target.decode("ascii")
    path, query = _split_target(target)
    head = RequestHead(event.method.decode("ascii"), target, headers, path, query)
    if head.is_websocket:
        _check_websocket_upgrade(headers)
    return head


class RequestBody:
    """The body of a request whose head was read by :func:`read_request_head`, sans-IO.

    h11 takes the framing apart (``Content-Length`` or ``Transfer-Encoding: chunked``; the
    chunked parser is the one fixed against request smuggling in h11 0.16), and this class
    counts: a declared length over ``limit`` is refused before a byte of the body is read, a
    chunked body as soon as it passes ``limit``. Call :meth:`advance` for the bytes read with
    the head, then feed it what the socket gives with :meth:`receive` (``b""`` at end of
    stream) until one returns True; :attr:`data` is the body. Errors are :class:`BadRequest`
    with the status to answer (400, 411, 413).
    """

    def __init__(self, already_read: bytes, *, limit: int) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._h11.receive_data(already_read)
        try:
            request = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(400, f"malformed request: {excerpt(str(exc), 80)}") from None
        if not isinstance(request, h11.Request):
            raise BadRequest(400, "malformed request")
        self._limit = limit
        self.data = bytearray()
        self.complete = False
        self._pieces = 0
        framing = {name: value for name, value in request.headers if name in _FRAMING}
        self._chunked = b"transfer-encoding" in framing
        if not self._chunked:
            if b"content-length" not in framing:
                # h11 would read "no length" as an empty body; say what is missing instead.
                raise BadRequest(411, "the request needs a Content-Length (or a chunked body)")
            declared = int(framing[b"content-length"])  # h11 checked that it is digits
            if declared > limit:
                raise BadRequest(413, f"the request body is over the limit of {limit} bytes")

    @property
    def expects_continue(self) -> bool:
        """The client sent ``Expect: 100-continue`` and waits for our go-ahead (curl does for
        large files): answer it once the request is known to be acceptable."""
        return self._h11.they_are_waiting_for_100_continue

    def receive(self, data: bytes) -> bool:
        """Take bytes from the socket (``b""``: it closed); True once the body is complete."""
        if not self.complete:
            self._h11.receive_data(data)
        return self.advance()

    def advance(self) -> bool:
        """Take in what is already buffered (the bytes read with the head, at first); True
        once the body is complete."""
        while not self.complete:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                # Also a client that hangs up before the end of the body it declared.
                raise BadRequest(400, f"malformed request body: {excerpt(str(exc), 100)}") from None
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.Data):
                if len(self.data) + len(event.data) > self._limit:
                    raise BadRequest(
                        413, f"the request body is over the limit of {self._limit} bytes"
                    )
                self.data += event.data
                self._pieces += 1
                if self._chunked and self._pieces > MIN_PIECES + len(self.data) // MIN_PIECE_SIZE:
                    # Each chunk costs the event loop a few microseconds of parsing: a body of
                    # one-byte chunks would keep it busy for minutes within the size limit.
                    raise BadRequest(
                        400, f"chunks of the request body average under {MIN_PIECE_SIZE} bytes"
                    )
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
            else:  # ConnectionClosed: the stream ended before the body did
                raise BadRequest(400, "connection closed before the request body was complete")
        return True


_FRAMING = (b"content-length", b"transfer-encoding")

#: A chunked body must average at least this many bytes a chunk, after the first MIN_PIECES.
MIN_PIECE_SIZE = 512
MIN_PIECES = 64

#: What a server sends to a client waiting on ``Expect: 100-continue`` before its body.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def read_request_head(stream: trio.abc.ReceiveStream) -> tuple[RequestHead, bytes]:
    """Read until the end of the head; returns it and every byte read (for the replay)."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD_BYTES:
            raise BadRequest(431, "request head too large")
        data = await stream.receive_some(4096)
        if not data:
            raise BadRequest(400, "connection closed before the request was complete")
        buffer += data
    return parse_request_head(bytes(buffer)), bytes(buffer)


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    #: Answers about live state (health, metrics, errors) are never stored; the page's files
    #: choose their own policy (see :mod:`stt_server.static`).
    cache_control: str = "no-store"

    def encode(self, *, with_body: bool = True) -> bytes:
        # A 304 has no body and must not describe one: no Content-Type or Content-Length.
        entity = (
            ""
            if self.status == 304
            else f"Content-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n"
        )
        head = (
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}\r\n"
            + entity
            + "".join(f"{name}: {value}\r\n" for name, value in self.headers)
            + f"Cache-Control: {self.cache_control}\r\n"
            "Connection: close\r\n\r\n"
        )
        body = self.body if with_body and self.status != 304 else b""
        return head.encode("ascii") + body


def json_response(status: int, obj: Any) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode())


@attrs.frozen
class Routes:
    """What the HTTP side can ask of the server; plain callables keep this module sans-server."""

    health: Callable[[], tuple[bool, dict[str, Any]]]
    metrics: Callable[[], tuple[bytes, str]]


def respond(head: RequestHead, routes: Routes) -> Response:
    if head.method not in ("GET", "HEAD"):
        return json_response(405, {"error": "only GET is served here"})
    if head.path == "/health":
        healthy, body = routes.health()
        return json_response(200 if healthy else 503, body)
    if head.path == "/metrics":
        payload, content_type = routes.metrics()
        return Response(200, payload, content_type)
    page = static.answer(head.path, head.headers)
    if page is not None:
        return Response(
            page.status,
            page.body,
            page.content_type,
            page.headers,
            cache_control=page.cache_control,
        )
    return json_response(404, {"error": f"no such page: {head.path}"})


class ReplayStream(trio.abc.Stream):
    """A stream that first gives back bytes already read from ``inner``."""

    def __init__(self, inner: trio.abc.Stream, already_read: bytes) -> None:
        self._inner = inner
        self._pending = already_read

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._pending:
            size = len(self._pending) if max_bytes is None else max_bytes
            chunk, self._pending = self._pending[:size], self._pending[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()
