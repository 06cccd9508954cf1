"""Accepting connections: handshake, admission, and the lifetime of every session.

Nurseries are layered by lifetime (as in hypercorn): :func:`serve` owns the devices (engines
and the GPU monitor), which must outlive every session because draining sessions still need
their finals transcribed; the :class:`Server` owns the listeners and one handler task per
connection; each handler owns the WebSocket's reader task and the
:class:`~stt_server.session.Session` nursery.
"""

from __future__ import annotations

import collections
import functools
import logging
import secrets

import attrs
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from .admission import Decision, RefusalReason
from .config import Config
from .devices import Device, DevicePool, DeviceStatistics, open_pool
from .engine import SpeechModel
from .errors import CloseCode, ErrorCode
from .protocol import error_message
from .session import CLOSE_TIMEOUT, CloseRequest, LanguageCheck, Session, SessionStatistics
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
    draining: bool
    max_connections: int
    accepted: int
    refused: dict[str, int]
    sessions: tuple[SessionStatistics, ...]
    devices: tuple[DeviceStatistics, ...]


def _peer_name(stream: trio.abc.Stream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return "unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    def __init__(
        self,
        config: Config,
        pool: DevicePool,
        vad_model: SileroModel,
        *,
        model_name: str,
        multilingual: bool,
    ) -> None:
        self.config = config
        self.pool = pool
        pool.on_device_lost = self._device_lost
        self._vad_model = vad_model
        self._model_name = model_name
        self._language_check = LanguageCheck(multilingual)
        self.sessions: dict[str, Session] = {}
        self._placement: dict[str, Device] = {}
        # Handshakes past the max_connections check but still awaiting GPU admission: they hold
        # a slot, so concurrent arrivals cannot overshoot the limit while readings are taken.
        self._admitting = 0
        self._draining = False
        self._accepted = 0
        self._refused: collections.Counter[str] = collections.Counter()
        self._listen_scope = trio.CancelScope()
        self._session_ended = trio.lowlevel.ParkingLot()
        self._listening: tuple[tuple[str, int], ...] = ()

    @property
    def port(self) -> int:
        return self._listening[0][1]

    async def serve(
        self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections until :meth:`drain`; return once every session has ended."""
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        self._listening = tuple(listener.socket.getsockname()[:2] for listener in listeners)
        log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in self._listening))
        # Handlers live in the outer nursery so that they outlast the accept loop: drain stops
        # accepting at once while open sessions finish.
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

    async def drain(
        self,
        code: CloseCode = CloseCode.GOING_AWAY,
        error: ErrorCode = ErrorCode.GOING_AWAY,
        message: str = "server shutting down",
    ) -> None:
        """Stop accepting, end every session gracefully, and wait (at most the grace period)."""
        self._draining = True
        self._listen_scope.cancel()
        log.info("draining %d session(s)", len(self.sessions))
        for session in list(self.sessions.values()):
            session.close(CloseRequest(code, error, message))
        # Each session bounds its own finish by shutdown_grace; the margin covers the close
        # handshake after it.
        with trio.move_on_after(self.config.shutdown_grace + CLOSE_TIMEOUT):
            while self.sessions:
                await self._session_ended.park()

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        async with trio.open_nursery() as connection:
            ws = None
            with trio.move_on_after(self.config.handshake_timeout):
                try:
                    request = await trio_websocket.wrap_server_stream(
                        connection,
                        stream,
                        max_message_size=self.config.max_message_size * _TRANSPORT_SIZE_FACTOR,
                    )
                    ws = await request.accept()
                except (ConnectionClosed, trio.BrokenResourceError):
                    ws = None
            if ws is None:
                log.info("handshake from %s failed or timed out", peer)
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

    async def _refuse(
        self, ws: WebSocketConnection, peer: str, reason: RefusalReason, message: str
    ) -> None:
        """Tell a client why it cannot have a session (``server_busy``), then close 1013."""
        self._refused[reason.value] += 1
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
        if len(self.sessions) + self._admitting >= self.config.max_connections:
            await self._refuse(
                ws,
                peer,
                RefusalReason.MAX_CONNECTIONS,
                f"server is at its limit of {self.config.max_connections} sessions",
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
        session = Session(
            ws,
            session_id=session_id,
            peer=peer,
            config=self.config,
            engine=placed.engine,
            vad_model=self._vad_model,
            model_name=self._model_name,
            language_check=self._language_check,
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
            draining=self._draining,
            max_connections=self.config.max_connections,
            accepted=self._accepted,
            refused=dict(self._refused),
            sessions=tuple(s.statistics() for s in self.sessions.values()),
            devices=self.pool.statistics(),
        )


async def serve(
    config: Config,
    *,
    model: SpeechModel | None = None,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole server until ``shutdown`` is set, then drain and return.

    ``model`` lets tests share one loaded model between servers; normally it is loaded here.
    """
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
        )
        await nursery.start(server.serve)
        task_status.started(server)
        await shutdown.wait()
        await server.drain()
        nursery.cancel_scope.cancel()
    log.info("stopped")
