"""Accepting connections: handshake, admission, and the lifetime of every session.

Nurseries are layered by lifetime (as in hypercorn): :func:`serve` owns the engine, which must
outlive every session because draining sessions still need their finals transcribed; the
:class:`Server` owns the listeners and one handler task per connection; each handler owns the
WebSocket's reader task and the :class:`~stt_server.session.Session` nursery.
"""

from __future__ import annotations

import functools
import logging
import secrets

import attrs
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from .config import Config
from .engine import Engine, EngineStatistics, SpeechModel
from .errors import CloseCode, ErrorCode
from .protocol import error_message
from .session import CLOSE_TIMEOUT, CloseRequest, LanguageCheck, Session, SessionStatistics
from .vad import SileroModel
from .whisper import WhisperModel, cuda_device_count

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
    refused: int
    sessions: tuple[SessionStatistics, ...]
    engine: EngineStatistics


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
        engine: Engine,
        vad_model: SileroModel,
        *,
        model_name: str,
        multilingual: bool,
    ) -> None:
        self.config = config
        self.engine = engine
        self._vad_model = vad_model
        self._model_name = model_name
        self._language_check = LanguageCheck(multilingual)
        self.sessions: dict[str, Session] = {}
        self._draining = False
        self._accepted = 0
        self._refused = 0
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
        self,
        ws: WebSocketConnection,
        peer: str,
        code: ErrorCode,
        close: CloseCode,
        message: str,
        retry_after: float | None,
    ) -> None:
        self._refused += 1
        log.info("refused %s: %s (%s)", peer, code.value, message)
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await ws.send_message(error_message(code.value, message, retry_after=retry_after))
            except ConnectionClosed:
                return
            await ws.aclose(int(close), message)

    async def _serve_client(self, ws: WebSocketConnection, peer: str) -> None:
        if self._draining:
            await self._refuse(
                ws,
                peer,
                ErrorCode.SERVER_BUSY,
                CloseCode.TRY_AGAIN_LATER,
                "server is draining; try another instance",
                RETRY_AFTER_BUSY,
            )
            return
        if len(self.sessions) >= self.config.max_connections:
            await self._refuse(
                ws,
                peer,
                ErrorCode.SERVER_BUSY,
                CloseCode.TRY_AGAIN_LATER,
                f"server is at its limit of {self.config.max_connections} sessions",
                RETRY_AFTER_BUSY,
            )
            return
        session_id = secrets.token_hex(8)
        session = Session(
            ws,
            session_id=session_id,
            peer=peer,
            config=self.config,
            engine=self.engine,
            vad_model=self._vad_model,
            model_name=self._model_name,
            language_check=self._language_check,
        )
        # Registered before the first checkpoint, so the max_connections check above and this
        # insert are atomic with respect to other handlers.
        self.sessions[session_id] = session
        self._accepted += 1
        try:
            await session.run()
        finally:
            del self.sessions[session_id]
            self._session_ended.unpark_all()

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            listening=self._listening,
            draining=self._draining,
            max_connections=self.config.max_connections,
            accepted=self._accepted,
            refused=self._refused,
            sessions=tuple(s.statistics() for s in self.sessions.values()),
            engine=self.engine.statistics(),
        )


def pick_device(config: Config) -> str:
    if config.device != "auto":
        return config.device
    if cuda_device_count() > 0:
        return "cuda"
    log.info("no CUDA device found: running inference on the CPU")
    return "cpu"


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
    if model is None:
        device = pick_device(config)
        model = await trio.to_thread.run_sync(lambda: WhisperModel.load(config, device=device))
    multilingual = bool(getattr(model, "is_multilingual", False))
    engine = Engine(model, device=getattr(model, "device", "cpu"), workers=config.inference_workers)
    shutdown = trio.Event() if shutdown is None else shutdown
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        server = Server(config, engine, vad_model, model_name=model.name, multilingual=multilingual)
        await nursery.start(server.serve)
        task_status.started(server)
        await shutdown.wait()
        await server.drain()
        nursery.cancel_scope.cancel()
    log.info("stopped")
