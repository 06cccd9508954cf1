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
import time
from typing import Any

import attrs
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from .admission import Decision, RefusalReason
from .config import Config
from .control import ControlServer, resolve_socket_path
from .devices import Device, DevicePool, DeviceStatistics, open_pool
from .engine import SpeechModel
from .errors import CloseCode, ErrorCode
from .http import (
    BadRequest,
    ReplayStream,
    RequestHead,
    Routes,
    json_response,
    read_request_head,
    respond,
)
from .metrics import Metrics
from .protocol import error_message
from .session import CLOSE_TIMEOUT, CloseRequest, LanguageCheck, Session, SessionStatistics
from .systemd import Notifier
from .vad import SileroModel

log = logging.getLogger(__name__)

#: What a refused client is told to wait before trying again, in seconds.
RETRY_AFTER_BUSY = 5.0

#: trio-websocket buffers a whole message before we see it, and closes with a bare 1009 past its
#: own limit. Giving it twice ours lets every frame up to that size get a ``message_too_big``
#: error first, while anything larger is still cut off without being held in memory.
_TRANSPORT_SIZE_FACTOR = 2


@attrs.frozen
class ServerStatistics:
    listening: tuple[tuple[str, int], ...]
    uptime: float
    draining: bool
    max_connections: int
    accepted: int
    refused: dict[str, int]
    sessions: tuple[SessionStatistics, ...]
    devices: tuple[DeviceStatistics, ...]
    kicked: tuple[KickedClient, ...]
    kicked_total: int


def _peer_name(stream: trio.abc.Stream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return "unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.frozen
class KickedClient:
    session_id: str
    peer: str
    reason: str
    at: float  # wall-clock time


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
        self._vad_model = vad_model
        self._model_name = model_name
        self._language_check = LanguageCheck(multilingual)
        self.max_connections = config.max_connections
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
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        self._listening = tuple(listener.socket.getsockname()[:2] for listener in listeners)
        log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in self._listening))
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
        request = CloseRequest(CloseCode.GOING_AWAY, ErrorCode.GOING_AWAY, "server shutting down")
        for session in list(self.sessions.values()):
            session.close(request)
        # Forced closes still transcribe what is owed; this bounds that and the close handshake.
        with trio.move_on_after(self.config.inference_timeout + CLOSE_TIMEOUT):
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
    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        async with trio.open_nursery() as connection:
            ws = None
            with trio.move_on_after(self.config.handshake_timeout):
                try:
                    head, raw = await read_request_head(stream)
                    if not head.is_websocket:
                        await self._answer_http(stream, head)
                        return
                    request = await trio_websocket.wrap_server_stream(
                        connection,
                        ReplayStream(stream, raw),
                        max_message_size=self.config.max_message_size * _TRANSPORT_SIZE_FACTOR,
                    )
                    ws = await request.accept()
                except BadRequest as exc:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stream.send_all(
                            json_response(exc.status, {"error": str(exc)}).encode()
                        )
                except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                    ws = None
            if ws is None:
                connection.cancel_scope.cancel()
                await trio.aclose_forcefully(stream)
                return
            try:
                await self._serve_client(ws, peer)
            finally:
                with trio.move_on_after(CLOSE_TIMEOUT) as cleanup:
                    cleanup.shield = True
                    await ws.aclose()
                connection.cancel_scope.cancel()

    async def _answer_http(self, stream: trio.SocketStream, head: RequestHead) -> None:
        response = respond(head, self._routes)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(response.encode(with_body=head.method != "HEAD"))
        await trio.aclose_forcefully(stream)

    async def _refuse(
        self, ws: WebSocketConnection, peer: str, reason: RefusalReason, message: str
    ) -> None:
        """Tell a client why it cannot have a session (``server_busy``), then close 1013."""
        self._refused[reason.value] += 1
        self.metrics.errors.labels(ErrorCode.SERVER_BUSY.value).inc()
        log.info("refused %s: %s (%s)", peer, reason.value, message)
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await ws.send_message(
                    error_message(
                        ErrorCode.SERVER_BUSY.value, message, retry_after=RETRY_AFTER_BUSY
                    )
                )
            except ConnectionClosed:
                return
            await ws.aclose(int(CloseCode.TRY_AGAIN_LATER), message[:120])

    async def _serve_client(self, ws: WebSocketConnection, peer: str) -> None:
        if self._draining:
            await self._refuse(
                ws, peer, RefusalReason.DRAINING, "server is draining; try another instance"
            )
            return
        if len(self.sessions) + self._admitting >= self.max_connections:
            await self._refuse(
                ws,
                peer,
                RefusalReason.MAX_CONNECTIONS,
                f"server is at its limit of {self.max_connections} sessions",
            )
            return
        session_id = secrets.token_hex(8)
        self._admitting += 1
        try:
            placed = await self.pool.admit(session_id)
        finally:
            self._admitting -= 1
        if isinstance(placed, Decision):
            assert placed.refusal is not None
            await self._refuse(ws, peer, placed.refusal, placed.message)
            return
        if self._draining:
            # Draining began while this client waited for GPU readings; it was not among the
            # sessions told to finish, so it must not start.
            self.pool.release(session_id, placed)
            await self._refuse(
                ws, peer, RefusalReason.DRAINING, "server is draining; try another instance"
            )
            return
        session = Session(
            ws,
            session_id=session_id,
            peer=peer,
            config=self.config,
            engine=placed.engine,
            vad_model=self._vad_model,
            model_name=self._model_name,
            language_check=self._language_check,
            metrics=self.metrics,
        )
        self.sessions[session_id] = session
        self._placement[session_id] = placed
        self._accepted += 1
        try:
            await session.run()
        finally:
            del self.sessions[session_id]
            self.pool.release(session_id, self._placement.pop(session_id))
            self._session_ended.unpark_all()

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
            sessions=tuple(s.statistics() for s in self.sessions.values()),
            devices=self.pool.statistics(),
            kicked=tuple(self._kicked),
            kicked_total=self._kicked_total,
        )


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
