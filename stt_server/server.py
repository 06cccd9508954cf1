"""Accepting connections: handshake, admission, and the lifetime of every session.

Nurseries are layered by lifetime (as in hypercorn): :func:`serve` owns the devices (engines
and the GPU monitor), which must outlive every session because draining sessions still need
their finals transcribed; the :class:`Server` owns the listeners and one handler task per
connection; each handler owns the WebSocket's reader task and the
:class:`~stt_server.session.Session` nursery.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import secrets
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .admission import Decision, RefusalReason
from .auth import (
    TokenStore,
    address_key,
    client_ip,
    credentials,
    is_loopback,
    is_trusted,
    parse_networks,
)
from .config import Config
from .control import ControlServer, resolve_socket_path
from .devices import Device, DevicePool, open_pool
from .dialect import Dialect, NativeDialect
from .engine import SpeechModel
from .errors import CloseCode, ErrorCode, excerpt
from .http import (
    BadRequest,
    ReplayStream,
    RequestHead,
    Response,
    Routes,
    json_response,
    read_request_head,
    respond,
)
from .metrics import Metrics
from .openai_files import FileApi, is_file_route
from .openai_schema import ApiError
from .ratelimit import KeyedLimiter
from .realtime_protocol import dialect_for
from .session import (
    CLOSE_TIMEOUT,
    INTERNAL_ERROR_MESSAGE,
    CloseRequest,
    LanguageCheck,
    Session,
    finish_timeout,
)
from .stats import KickedClient, ServerStatistics
from .systemd import Notifier
from .vad import SileroModel
from .websocket import FrameLimits
from .websocket import accept as accept_websocket

log = logging.getLogger(__name__)

_DRAINING_MESSAGE = "server is draining; try another instance"

#: What a refused client is told to wait before trying again, in seconds.
RETRY_AFTER_BUSY = 5.0

#: How long a refused client has to answer our close before the socket is just closed.
REFUSAL_CLOSE_WAIT = 1.0

#: The refusal counter's key for connections dropped because too many handshakes were open.
HANDSHAKE_LIMIT = "handshake_limit"


@attrs.frozen
class Refusal:
    """Why a client gets no session, as it is counted, told and closed."""

    reason: RefusalReason
    message: str
    code: ErrorCode = ErrorCode.SERVER_BUSY
    close: CloseCode = CloseCode.TRY_AGAIN_LATER
    retry_after: float | None = RETRY_AFTER_BUSY


@attrs.define(eq=False)
class _Connection:
    """What the firewall around a connection knows when something fails inside it."""

    peer: str
    peer_ip: str
    ws: WebSocketConnection | None = None
    #: What the WebSocket speaks, chosen by the request's path (see realtime_protocol).
    dialect: Dialect = attrs.Factory(NativeDialect)
    session_id: str | None = None
    answered: bool = False  # an HTTP response has been sent
    #: A file API request's head and the bytes read with it, served after the handshake.
    file_request: tuple[RequestHead, bytes] | None = None

    def describe(self) -> str:
        return f"session {self.session_id} ({self.peer})" if self.session_id else self.peer


def _peer_name(stream: trio.abc.Stream) -> tuple[str, str]:
    """``("host:port", "host")`` of the socket peer, through a TLS layer if there is one."""
    transport = getattr(stream, "transport_stream", stream)
    try:
        host, port, *_ = transport.socket.getpeername()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return "unknown", "unknown"
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), host


def _decrement(counts: collections.Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]  # keep the table as small as the set of live clients


@attrs.frozen
class Client:
    """Who is connecting: the socket peer, the address limits count, the token's label."""

    peer: str
    ip: str
    label: str | None = None

    def describe(self) -> str:
        who = (
            self.peer
            if self.peer.startswith(self.ip) or self.peer.startswith(f"[{self.ip}]")
            else f"{self.ip} via {self.peer}"
        )
        return f"{who} ({self.label})" if self.label else who


def _file_api_error(early: Response | Refusal) -> ApiError:
    """A refusal decided for sessions, in the file API's terms (status, Retry-After)."""
    token_needed = "a valid token is required: send it as 'Authorization: Bearer <token>'"
    if isinstance(early, Response):  # 401 for a client without Origin, 403 for a foreign origin
        if early.status == 401:
            return ApiError(401, token_needed, code="invalid_api_key")
        return ApiError(early.status, "this origin is not allowed", code="origin_not_allowed")
    if early.reason is RefusalReason.UNAUTHORIZED:
        return ApiError(401, token_needed, code="invalid_api_key")
    if early.code is ErrorCode.RATE_LIMITED:
        return ApiError(
            429, early.message, code="rate_limit_exceeded", retry_after=early.retry_after
        )
    return ApiError(503, early.message, code=early.code.value, retry_after=early.retry_after)


#: Kicked clients remembered for the operator's console; older ones are forgotten.
_KICKED_HISTORY = 100


class Server:
    def __init__(
        self,
        config: Config,
        pool: DevicePool,
        vad_model: SileroModel,
        *,
        model_name: str,
        multilingual: bool,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.pool = pool
        pool.on_device_lost = self._device_lost
        self.metrics = metrics
        metrics.attach(self.statistics)
        self._routes = Routes(health=self.health, metrics=metrics.render)
        self._files = FileApi(config, pool, metrics, multilingual=multilingual)
        self._vad_model = vad_model
        self._model_name = model_name
        self._language_check = LanguageCheck(multilingual)
        self.max_connections = config.max_connections
        self._tokens = TokenStore.load(Path(config.tokens_file)) if config.tokens_file else None
        self._allowed_origins = {o.strip() for o in config.allowed_origins.split(",") if o.strip()}
        self._trusted_proxies = parse_networks(config.trusted_proxies)
        self._connection_rate = KeyedLimiter(
            rate=config.connections_per_minute / 60.0,
            capacity=max(1, config.connections_per_minute),
            clock=time.monotonic,
        )
        self._frame_limits = FrameLimits(
            max_message_size=config.max_message_size,
            max_frames_per_second=config.max_messages_per_second,
        )
        self._handshaking: collections.Counter[str] = collections.Counter()
        self._handshaking_total = 0
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._per_token: collections.Counter[str] = collections.Counter()
        self.sessions: dict[str, Session] = {}
        self._placement: dict[str, Device] = {}
        # Handshakes past the max_connections check but still awaiting GPU admission: they hold
        # a slot, so concurrent arrivals cannot overshoot the limit while readings are taken.
        self._admitting = 0
        self._draining = False
        self._accepted = 0
        self._refused: collections.Counter[str] = collections.Counter()
        self._kicked: collections.deque[KickedClient] = collections.deque(maxlen=_KICKED_HISTORY)
        self._kicked_total = 0
        self._listen_scope = trio.CancelScope()
        self._session_ended = trio.lowlevel.ParkingLot()
        self._listening: tuple[tuple[str, int], ...] = ()
        self._started = time.monotonic()

    @property
    def port(self) -> int:
        return self._listening[0][1]

    @property
    def draining(self) -> bool:
        return self._draining

    async def serve(
        self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections until :meth:`stop_listening`; return once every handler is done."""
        listeners: list = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        self._listening = tuple(listener.socket.getsockname()[:2] for listener in listeners)
        if self.config.certfile:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.config.certfile, self.config.keyfile or None)
            # The TLS handshake runs on the first read, so handshake_timeout bounds it too.
            listeners = [trio.SSLListener(listener, context) for listener in listeners]
        log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in self._listening))
        if self._tokens is None and not all(is_loopback(h) for h, _ in self._listening):
            log.warning(
                "listening beyond loopback without tokens: anyone who can reach %s can use "
                "this server; set tokens_file (see `stt-server token new`)",
                ", ".join(f"{h}:{p}" for h, p in self._listening),
            )
        # Handlers live in the outer nursery so that they outlast the accept loop: closing the
        # listeners at the end of a shutdown leaves the last sessions running to completion.
        async with trio.open_nursery() as handlers, trio.open_nursery() as accepting:
            self._listen_scope = accepting.cancel_scope
            await accepting.start(
                functools.partial(
                    trio.serve_listeners,
                    self._handle_stream,
                    listeners,
                    handler_nursery=handlers,
                )
            )
            task_status.started(self)

    def stop_listening(self) -> None:
        self._listen_scope.cancel()

    # -- draining --------------------------------------------------------------------------
    def start_draining(self) -> None:
        """Refuse new sessions (``/health`` says 503); open ones finish their utterance and go."""
        if self._draining:
            return
        self._draining = True
        log.info("draining: %d session(s) finish their current utterance", len(self.sessions))
        request = CloseRequest(CloseCode.GOING_AWAY, ErrorCode.GOING_AWAY, "server draining")
        for session in list(self.sessions.values()):
            session.finish_current_utterance(request)

    def stop_draining(self) -> None:
        """Accept new sessions again (sessions already asked to leave still leave)."""
        if self._draining:
            log.info("drain cancelled: accepting sessions again")
        self._draining = False

    async def drain(self) -> None:
        """Drain and wait: sessions get ``shutdown_grace`` seconds to reach the end of their
        utterance, then the rest are finalized at once; returns when all have closed."""
        self.start_draining()
        with trio.move_on_after(self.config.shutdown_grace):
            while self.sessions:
                await self._session_ended.park()
            await self._files.wait_idle()  # files being transcribed get the same grace
        request = CloseRequest(CloseCode.GOING_AWAY, ErrorCode.GOING_AWAY, "server shutting down")
        for session in list(self.sessions.values()):
            session.close(request)
        # Forced closes still transcribe what is owed; this bounds that and the close handshake.
        with trio.move_on_after(finish_timeout(self.config) + CLOSE_TIMEOUT):
            while self.sessions:
                await self._session_ended.park()

    # -- operator actions ------------------------------------------------------------------
    def kick(self, session_id: str, reason: str) -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        self._kicked.append(KickedClient(session_id, session.peer, reason, time.time()))
        self._kicked_total += 1
        log.warning("kicking session %s (%s): %s", session_id, session.peer, reason)
        session.close(CloseRequest(CloseCode.KICKED, ErrorCode.KICKED, reason))
        return True

    def reset_breaker(self, gpu: int) -> bool:
        """Close GPU ``gpu``'s breaker by hand; False if there is no such GPU breaker."""
        return self.pool.reset_breaker(gpu)

    def set_max_connections(self, value: int) -> None:
        if value <= 0:
            raise ValueError("max_connections must be > 0")
        log.info("max_connections %d -> %d", self.max_connections, value)
        self.max_connections = value

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether a load balancer should send new users here, and why not."""
        status = "ok"
        if self._draining:
            status = "draining"
        elif len(self.sessions) + self._admitting >= self.max_connections:
            status = "at_capacity"
        elif self.pool.gpu_mode and not self.pool.any_device_available():
            status = "no_device_available"
        body = {
            "status": status,
            "sessions": len(self.sessions),
            "max_connections": self.max_connections,
            "devices": {
                d.label: (d.breaker.state.value if d.breaker else "closed")
                for d in self.pool.statistics()
            },
        }
        return status == "ok", body

    # -- connections -----------------------------------------------------------------------
    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        """The firewall around one connection: whatever is raised while serving it ends this
        connection only (HTTP 500 or a 1011 close with a generic message), is logged once with
        its traceback and counted. trio's serve_listeners would otherwise let it end the server
        and every other session with it."""
        peer, peer_ip = _peer_name(stream)
        connection = _Connection(peer, peer_ip)
        try:
            await self._serve_connection(stream, connection)
        except* Exception as group:
            # Raised by the WebSocket's reader task (its nursery is gone) or before an upgrade.
            self._log_internal_error(connection, group)
            await self._tell_internal_error(stream, connection, close_wait=REFUSAL_CLOSE_WAIT)
        await trio.aclose_forcefully(stream)

    def _log_internal_error(self, connection: _Connection, exc: BaseException) -> None:
        self.metrics.errors.labels(ErrorCode.INTERNAL_ERROR.value).inc()
        log.error(
            "internal error serving %s; connection closed",
            connection.describe(),
            exc_info=exc,
            extra={
                "event": "internal_error",
                "session_id": connection.session_id,
                "peer": connection.peer,
                "error_code": ErrorCode.INTERNAL_ERROR.value,
            },
        )

    async def _tell_internal_error(
        self, stream: trio.abc.Stream, connection: _Connection, *, close_wait: float
    ) -> None:
        """A generic HTTP 500, or ``internal_error`` and a 1011 close, within ``close_wait``
        for the close handshake (short when the WebSocket's reader, which would see the
        answer to our close, is what failed)."""
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True  # also when the server is stopping: tell the client, briefly
            # The connection may be what broke: telling the client is worth a try, no more.
            with contextlib.suppress(Exception):
                if connection.ws is not None:
                    await connection.ws.send_message(
                        connection.dialect.error(ErrorCode.INTERNAL_ERROR, INTERNAL_ERROR_MESSAGE)
                    )
                    with trio.move_on_after(close_wait):
                        await connection.ws.aclose(int(CloseCode.INTERNAL_ERROR), "internal error")
                elif not connection.answered:
                    await stream.send_all(
                        json_response(
                            500, {"error": "internal_error", "message": INTERNAL_ERROR_MESSAGE}
                        ).encode()
                    )

    async def _serve_connection(self, stream: trio.abc.Stream, connection: _Connection) -> None:
        async with trio.open_nursery() as nursery:
            try:
                accepted = await self._handshake(nursery, stream, connection)
                if connection.file_request is not None:
                    await self._serve_file_request(stream, connection, *connection.file_request)
                elif accepted is not None:
                    ws, client, refusal = accepted
                    if refusal is not None:
                        await self._refuse(ws, client, refusal, connection.dialect)
                    else:
                        await self._serve_client(ws, client, connection)
            except Exception as exc:
                if connection.ws is None:
                    raise
                # Our side failed after the upgrade: the reader still runs, so the client can
                # be told and the close handshake completed properly.
                self._log_internal_error(connection, exc)
                await self._tell_internal_error(stream, connection, close_wait=CLOSE_TIMEOUT)
            finally:
                # A cancelled nursery means its reader task failed: the firewall closes (1011).
                if connection.ws is not None and not nursery.cancel_scope.cancel_called:
                    with trio.move_on_after(CLOSE_TIMEOUT) as cleanup:
                        cleanup.shield = True
                        await connection.ws.aclose()
                # Last, and with no await after it: a Cancelled raised here would replace the
                # exception on its way out, and the nursery would swallow both.
                nursery.cancel_scope.cancel()

    @contextlib.contextmanager
    def _handshake_slot(self, connection: _Connection) -> Iterator[bool]:
        """Hold one of the places for connections still in their handshake; False if none is
        free. Trusted proxies carry many clients, so only the total counts for them."""
        key = (
            None
            if is_trusted(connection.peer_ip, self._trusted_proxies)
            else address_key(connection.peer_ip)
        )
        if self._handshaking_total >= self.config.max_handshakes or (
            key is not None and self._handshaking[key] >= self.config.max_handshakes_per_ip
        ):
            self._refused[HANDSHAKE_LIMIT] += 1
            log.debug("refused %s: too many unfinished handshakes", connection.peer)
            yield False
            return
        self._handshaking_total += 1
        if key is not None:
            self._handshaking[key] += 1
        try:
            yield True
        finally:
            self._handshaking_total -= 1
            if key is not None:
                _decrement(self._handshaking, key)

    async def _handshake(
        self, nursery: trio.Nursery, stream: trio.abc.Stream, connection: _Connection
    ) -> tuple[WebSocketConnection, Client, Refusal | None] | None:
        """Read the request and answer it: plain HTTP (then None), an early refusal (None), or
        an upgraded WebSocket with the refusal, if any, that it is to be told."""
        with self._handshake_slot(connection) as admitted:
            if not admitted:
                return None
            with trio.move_on_after(self.config.handshake_timeout):
                try:
                    head, raw = await read_request_head(stream)
                    if is_file_route(head) and not head.is_websocket:
                        # Served once this slot and deadline are given back: they bound the
                        # head, and a file's body may take minutes (upload_timeout).
                        connection.file_request = (head, raw)
                        return None
                    if not head.is_websocket:
                        await self._answer(
                            stream,
                            respond(head, self._routes),
                            connection,
                            with_body=head.method != "HEAD",
                        )
                        return None
                    connection.dialect = dialect_for(head, self.config)
                    creds = credentials(head)
                    client = Client(
                        connection.peer,
                        client_ip(
                            connection.peer_ip,
                            head,
                            self._trusted_proxies,
                            self.config.real_ip_header,
                        ),
                        self._tokens.label_for(creds.token) if self._tokens else None,
                    )
                    early = self._check_before_upgrade(head, client)
                    if isinstance(early, Response):
                        await self._answer(stream, early, connection)
                        return None
                    connection.ws = await accept_websocket(
                        nursery,
                        ReplayStream(stream, raw),
                        self._frame_limits,
                        subprotocol=creds.subprotocol,
                    )
                    return connection.ws, client, early
                except BadRequest as exc:
                    await self._answer(
                        stream, json_response(exc.status, {"error": str(exc)}), connection
                    )
                except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        return None

    def _check_before_upgrade(self, head: RequestHead, client: Client) -> Response | Refusal | None:
        """Refusals decided from the request alone. The connection rate is charged first, so
        that guessing tokens costs connections like anything else. A foreign browser origin and
        a missing or wrong token from a client without an Origin (a program, which can read an
        HTTP 401) are answered in plain HTTP; the rest go over the socket after the upgrade,
        because a browser cannot read why an upgrade failed."""
        if self.config.connections_per_minute:
            wait = self._connection_rate.take(address_key(client.ip))
            if wait:
                return Refusal(
                    RefusalReason.RATE_LIMITED,
                    f"more than {self.config.connections_per_minute} connections per minute "
                    "from your address",
                    code=ErrorCode.RATE_LIMITED,
                    close=CloseCode.POLICY_VIOLATION,
                    retry_after=round(wait, 1),
                )
        origin = head.headers.get("origin")
        if self._allowed_origins and origin is not None and origin not in self._allowed_origins:
            self._count_refusal(
                RefusalReason.ORIGIN, client, f"origin {excerpt(origin, 80)} not allowed"
            )
            return json_response(
                403, {"error": "origin_not_allowed", "message": "this origin is not allowed"}
            )
        if self._tokens is not None and client.label is None:
            if origin is None:
                self._count_refusal(RefusalReason.UNAUTHORIZED, client, "no valid token")
                return attrs.evolve(
                    json_response(
                        401, {"error": "unauthorized", "message": "a valid token is required"}
                    ),
                    headers=(("WWW-Authenticate", 'Bearer realm="stt-server"'),),
                )
            return Refusal(
                RefusalReason.UNAUTHORIZED,
                "a valid token is required",
                code=ErrorCode.UNAUTHORIZED,
                close=CloseCode.UNAUTHORIZED,
                retry_after=None,
            )
        return None

    async def _serve_file_request(
        self, stream: trio.abc.Stream, connection: _Connection, head: RequestHead, raw: bytes
    ) -> None:
        """``POST /v1/audio/...`` (see :mod:`.openai_files`) behind a session's checks: the
        connection rate and the token (:meth:`_check_before_upgrade`), the drain, and the
        per-address and per-token session counts, in which a file holds a place while it is
        served. Refusals are answered in the OpenAI error format."""
        client = Client(
            connection.peer,
            client_ip(connection.peer_ip, head, self._trusted_proxies, self.config.real_ip_header),
            self._tokens.label_for(credentials(head).token) if self._tokens else None,
        )
        early = self._check_before_upgrade(head, client)
        if early is None and self._draining:
            early = Refusal(RefusalReason.DRAINING, _DRAINING_MESSAGE)
        if early is None:
            with self._session_slots(client) as early:
                if early is None:
                    response = await self._files.serve(stream, head, raw, peer=client.describe())
                    if response is not None:
                        connection.answered = True
                        await self._files.answer(stream, response)
                    return
        if isinstance(early, Refusal):
            self._count_refusal(early.reason, client, early.message)
        connection.answered = True
        await self._files.answer(stream, self._files.refuse(head, _file_api_error(early)))

    async def _answer(
        self,
        stream: trio.abc.Stream,
        response: Response,
        connection: _Connection,
        *,
        with_body: bool = True,
    ) -> None:
        connection.answered = True
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(response.encode(with_body=with_body))
        await trio.aclose_forcefully(stream)

    def _count_refusal(self, reason: RefusalReason, client: Client, message: str) -> None:
        self._refused[reason.value] += 1
        log.info(
            "refused %s: %s (%s)",
            client.describe(),
            reason.value,
            message,
            extra={
                "event": "session_refused",
                "peer": client.describe(),
                "token_label": client.label,
                "reason": reason.value,
            },
        )

    async def _refuse(
        self, ws: WebSocketConnection, client: Client, refusal: Refusal, dialect: Dialect
    ) -> None:
        """Tell a client why it cannot have a session (in its protocol's words), then close
        without lingering: a refused client gets ``REFUSAL_CLOSE_WAIT`` to answer the close,
        not a socket to hold."""
        self._count_refusal(refusal.reason, client, refusal.message)
        self.metrics.errors.labels(refusal.code.value).inc()
        with trio.move_on_after(REFUSAL_CLOSE_WAIT):
            try:
                await ws.send_message(
                    dialect.error(refusal.code, refusal.message, retry_after=refusal.retry_after)
                )
            except ConnectionClosed:
                return
            await ws.aclose(int(refusal.close), refusal.message[:120])

    async def _serve_client(
        self, ws: WebSocketConnection, client: Client, connection: _Connection
    ) -> None:
        dialect = connection.dialect
        refusal = self._check_capacity()
        if refusal is not None:
            await self._refuse(ws, client, refusal, dialect)
            return
        with self._session_slots(client) as refusal:
            if refusal is not None:
                await self._refuse(ws, client, refusal, dialect)
                return
            session_id = connection.session_id = secrets.token_hex(8)
            self._admitting += 1
            try:
                placed = await self.pool.admit(session_id)
            finally:
                self._admitting -= 1
            if isinstance(placed, Decision):
                assert placed.refusal is not None
                await self._refuse(ws, client, Refusal(placed.refusal, placed.message), dialect)
                return
            if self._draining:
                # Draining began while this client waited for GPU readings; it was not among
                # the sessions told to finish, so it must not start.
                self.pool.release(session_id, placed)
                await self._refuse(
                    ws, client, Refusal(RefusalReason.DRAINING, _DRAINING_MESSAGE), dialect
                )
                return
            self._placement[session_id] = placed
            try:
                session = Session(
                    ws,
                    session_id=session_id,
                    peer=client.describe(),
                    config=self.config,
                    engine=placed.engine,
                    vad_model=self._vad_model,
                    model_name=self._model_name,
                    language_check=self._language_check,
                    metrics=self.metrics,
                    token_label=client.label,
                    dialect=dialect,
                )
                self.sessions[session_id] = session
                self._accepted += 1
                await session.run()
            finally:
                # Also when the session could not even be built: its device slot is returned.
                self.sessions.pop(session_id, None)
                self.pool.release(session_id, self._placement.pop(session_id))
                self._session_ended.unpark_all()

    def _check_capacity(self) -> Refusal | None:
        if self._draining:
            return Refusal(RefusalReason.DRAINING, _DRAINING_MESSAGE)
        if len(self.sessions) + self._admitting >= self.max_connections:
            return Refusal(
                RefusalReason.MAX_CONNECTIONS,
                f"server is at its limit of {self.max_connections} sessions",
            )
        return None

    @contextlib.contextmanager
    def _session_slots(self, client: Client) -> Iterator[Refusal | None]:
        """Take this client's places under the per-address and per-token limits for as long as
        its session lasts. Taken before any await, so parallel connects cannot overshoot."""
        key = address_key(client.ip)
        label = client.label
        over = None
        limit = self.config.max_sessions_per_ip
        if limit and self._per_ip[key] >= limit:
            over = f"your address already has {limit} sessions open"
        limit = self.config.max_sessions_per_token
        if over is None and limit and label is not None and self._per_token[label] >= limit:
            over = f"this token already has {limit} sessions open"
        if over is not None:
            yield Refusal(
                RefusalReason.RATE_LIMITED,
                over,
                code=ErrorCode.RATE_LIMITED,
                close=CloseCode.POLICY_VIOLATION,
            )
            return
        self._per_ip[key] += 1
        if label is not None:
            self._per_token[label] += 1
        try:
            yield None
        finally:
            _decrement(self._per_ip, key)
            if label is not None:
                _decrement(self._per_token, label)

    def _device_lost(self, device: Device, reason: str) -> None:
        """A device's breaker opened: move its sessions elsewhere, or end them cleanly."""
        for session_id in list(device.sessions):
            session = self.sessions.get(session_id)
            if session is None:
                continue  # still being admitted; its first inference will tell
            target = self.pool.relocate(session_id, device)
            if target is not None:
                self._placement[session_id] = target
                session.move_to(
                    target.engine, f"{device.label} failed ({reason}); moved to {target.label}"
                )
            else:
                device.sessions.add(session_id)  # it stays until it has closed
                session.close(
                    CloseRequest(
                        CloseCode.TRY_AGAIN_LATER,
                        ErrorCode.SERVER_BUSY,
                        f"{device.label} failed ({reason}) and no other device has room",
                    )
                )

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            listening=self._listening,
            uptime=time.monotonic() - self._started,
            draining=self._draining,
            max_connections=self.max_connections,
            accepted=self._accepted,
            refused=dict(self._refused),
            handshaking=self._handshaking_total,
            sessions=tuple(s.statistics() for s in self.sessions.values()),
            devices=self.pool.statistics(),
            kicked=tuple(self._kicked),
            kicked_total=self._kicked_total,
        )


async def warm_up(pool: DevicePool) -> None:
    """Run each device's model once before the port opens: CTranslate2 builds its kernels on
    the first call, which would otherwise land on the first user's first utterance while
    ``/health`` already says ok. Models without ``warm_up`` (test doubles) are skipped."""
    for device in pool.devices:
        warm = getattr(device.engine.model, "warm_up", None)
        if warm is None:
            continue
        started = time.monotonic()
        await trio.to_thread.run_sync(warm, limiter=device.engine.limiter)
        log.info("model warmed up on %s in %.2f s", device.label, time.monotonic() - started)


async def serve(
    config: Config,
    *,
    model: SpeechModel | None = None,
    shutdown: trio.Event | None = None,
    notifier: Notifier | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole server until ``shutdown`` is set, then drain and return.

    Lifetimes, outermost first: devices (engines, GPU monitor), then the server and the control
    socket. On shutdown, systemd hears STOPPING=1, sessions finish their utterance within
    ``shutdown_grace`` (the rest are finalized at once), and only then do the listeners close,
    so ``/health`` answers 503 to the load balancer for the whole drain. ``model`` lets tests
    share one loaded model between servers.
    """
    notifier = notifier or Notifier()
    control = None
    if config.control_socket:
        control = ControlServer(
            None, resolve_socket_path(config.control_socket), group=config.control_group
        )
        control.prepare()
    vad_model = SileroModel()
    pool = await open_pool(config, model)
    first = pool.devices[0].engine.model
    shutdown = trio.Event() if shutdown is None else shutdown
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await warm_up(pool)
        server = Server(
            config,
            pool,
            vad_model,
            model_name=first.name,
            multilingual=bool(getattr(first, "is_multilingual", False)),
            metrics=Metrics(),
        )
        await nursery.start(server.serve)
        if control is not None:
            control.attach(
                server, on_drain=lambda: nursery.start_soon(notifier.notify, "STATUS=draining")
            )
            await nursery.start(control.run)
        nursery.start_soon(notifier.run_watchdog)
        await notifier.notify("READY=1")
        task_status.started(server)
        await shutdown.wait()
        await notifier.notify("STOPPING=1")
        await server.drain()
        server.stop_listening()
        nursery.cancel_scope.cancel()
    log.info("stopped")
