"""The operator's control socket: newline-delimited JSON over a local Unix stream socket.

One request per line, one reply per line (``watch`` replies with a snapshot per interval until
the client hangs up). Requests are parsed without I/O by :func:`parse_request`; the socket side
checks who is asking (``SO_PEERCRED``: root, the server's own user, or members of
``control_group``) before reading a byte of it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

if TYPE_CHECKING:
    from .server import Server, ServerStatistics

log = logging.getLogger(__name__)

#: The systemd unit's RuntimeDirectory; for non-root runs see :func:`resolve_socket_path`.
DEFAULT_SOCKET = "/run/stt-server/control.sock"

#: Longest request line accepted; real ones are tens of bytes.
MAX_LINE = 64 * 1024

#: Bounds on ``watch`` intervals, so a typo cannot flood a console or hide updates for hours.
MIN_WATCH_INTERVAL = 0.1
MAX_WATCH_INTERVAL = 3600.0

#: A console that has not taken a snapshot for this long is gone or stuck; it is disconnected.
_WATCH_SEND_TIMEOUT = 30.0


class ControlError(Exception):
    """A request that cannot be carried out; the message goes back as ``{"ok":false}``."""


@attrs.frozen
class Request:
    cmd: str
    session_id: str = ""
    reason: str = ""
    interval: float = 1.0
    gpu: int = 0
    value: int = 0


_COMMANDS = {
    "snapshot",
    "watch",
    "kick",
    "drain",
    "undrain",
    "reset_breaker",
    "set_max_connections",
}


def _field(obj: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = obj.get(name, default)
    if value is None:
        raise ControlError(f'{obj.get("cmd")} needs "{name}"')
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ControlError(f'"{name}" must be {kind.__name__}')
    return value


def parse_request(line: bytes) -> Request:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ControlError("each line must be a JSON object") from None
    if not isinstance(obj, dict):
        raise ControlError("each line must be a JSON object")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or cmd not in _COMMANDS:
        raise ControlError(
            f"unknown cmd {json.dumps(cmd)[:40]}; known: {', '.join(sorted(_COMMANDS))}"
        )
    if cmd == "kick":
        return Request(
            cmd,
            session_id=_field(obj, "session_id", str),
            reason=_field(obj, "reason", str, "kicked by operator"),
        )
    if cmd == "watch":
        interval = _field(obj, "interval", float, 1.0)
        if not MIN_WATCH_INTERVAL <= interval <= MAX_WATCH_INTERVAL:
            raise ControlError(
                f"interval must be between {MIN_WATCH_INTERVAL} and {MAX_WATCH_INTERVAL} s"
            )
        return Request(cmd, interval=interval)
    if cmd == "reset_breaker":
        return Request(cmd, gpu=_field(obj, "gpu", int))
    if cmd == "set_max_connections":
        value = _field(obj, "value", int)
        if value <= 0:
            raise ControlError("value must be > 0")
        return Request(cmd, value=value)
    return Request(cmd)


def _plain(_inst: Any, _attribute: Any, value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def snapshot(stats: ServerStatistics) -> dict[str, Any]:
    """The server's state as JSON-ready data (the ``snapshot`` and ``watch`` reply)."""
    data = attrs.asdict(stats, value_serializer=_plain)
    data["gpus"] = [
        {
            "device": d["label"],
            "index": d["index"],
            "sessions": d["sessions"],
            "memory_used_mb": d["reading"]["used_mb"] if d["reading"] else None,
            "memory_total_mb": d["reading"]["total_mb"] if d["reading"] else None,
            "utilization": d["reading"]["utilization"] if d["reading"] else None,
            "healthy": d["reading"]["healthy"] if d["reading"] else True,
            "breaker": d["breaker"]["state"] if d["breaker"] else None,
            "breaker_reason": d["breaker"]["last_reason"] if d["breaker"] else None,
            "queue_finals": d["engine"]["queued_finals"],
            "queue_partials": d["engine"]["queued_partials"],
            "busy": d["engine"]["busy"],
        }
        for d in data.pop("devices")
    ]
    return data


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def resolve_socket_path(configured: str) -> Path:
    """The configured path, except that the default falls back to a per-user runtime path when
    this process cannot create ``/run/stt-server`` (not root and not under systemd)."""
    path = Path(configured)
    if configured != DEFAULT_SOCKET or os.geteuid() == 0 or os.access(path.parent, os.W_OK):
        return path
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "stt-server" if runtime else Path(f"/tmp/stt-server-{os.getuid()}")
    return base / "control.sock"


def _peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)  # pid, uid, gid


def peer_allowed(uid: int, gid: int, group: str) -> bool:
    if uid in (0, os.geteuid()):
        return True
    if not group:
        return False
    try:
        wanted = grp.getgrnam(group)
    except KeyError:
        return False
    if gid == wanted.gr_gid:
        return True
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return wanted.gr_gid in os.getgrouplist(name, gid)


def _remove_stale(path: Path) -> None:
    """Delete a socket file left by a dead server; refuse to touch anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        path.unlink(missing_ok=True)
        log.info("removed stale control socket %s", path)
        return
    finally:
        probe.close()
    raise ControlError(f"another server is listening on {path}")


class ControlServer:
    def __init__(self, server: Server | None, path: Path, *, group: str = "") -> None:
        self._server = server
        self.path = path
        self._group = group
        self._on_drain: Callable[[], None] = lambda: None

    def attach(self, server: Server, *, on_drain: Callable[[], None]) -> None:
        """Bind to the running server (created after the path was checked)."""
        self._server = server
        self._on_drain = on_drain

    def prepare(self) -> None:
        """Check the path before anything slow starts: a live server there, or a file that is
        not a socket, is a start-up error the operator should see at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.path)

    async def run(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        self.prepare()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # born 0600: nobody else can connect before the chmod below
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        if self._group:
            with contextlib.suppress(KeyError, PermissionError):
                os.chown(self.path, -1, grp.getgrnam(self._group).gr_gid)
        os.chmod(self.path, 0o660)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        log.info("control socket on %s", self.path)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, [listener])
                task_status.started(self.path)
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            _pid, uid, gid = _peer_credentials(stream.socket)
        except OSError:
            uid, gid = -1, -1
        async with stream:
            if not peer_allowed(uid, gid, self._group):
                log.warning("control socket: refused uid %d", uid)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(encode({"ok": False, "error": "permission denied"}))
                return
            try:
                await self._converse(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception:
                # An operator's request must never take the server down with it.
                log.exception("control socket: request failed")
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(encode({"ok": False, "error": "internal error"}))

    async def _converse(self, stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            while b"\n" not in buffer:
                if len(buffer) > MAX_LINE:
                    await stream.send_all(encode({"ok": False, "error": "line too long"}))
                    return
                data = await stream.receive_some(4096)
                if not data:
                    return
                buffer += data
            line, buffer = buffer.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                request = parse_request(line)
                if request.cmd == "watch":
                    await self._watch(stream, request.interval)
                    return
                reply = self._execute(request)
            except ControlError as exc:
                reply = {"ok": False, "error": str(exc)}
            await stream.send_all(encode(reply))

    def _execute(self, request: Request) -> dict[str, Any]:
        server = self._server
        assert server is not None
        if request.cmd == "snapshot":
            return {"ok": True, "snapshot": snapshot(server.statistics())}
        if request.cmd == "kick":
            if not server.kick(request.session_id, request.reason):
                raise ControlError(f"no session {request.session_id!r}")
            return {"ok": True}
        if request.cmd == "drain":
            server.start_draining()
            self._on_drain()
            return {"ok": True}
        if request.cmd == "undrain":
            server.stop_draining()
            return {"ok": True}
        if request.cmd == "reset_breaker":
            if not server.pool.reset_breaker(request.gpu):
                raise ControlError(f"no GPU {request.gpu} with a circuit breaker")
            return {"ok": True}
        if request.cmd == "set_max_connections":
            server.set_max_connections(request.value)
            return {"ok": True, "max_connections": request.value}
        raise ControlError(f"unhandled cmd {request.cmd}")  # pragma: no cover

    async def _watch(self, stream: trio.SocketStream, interval: float) -> None:
        """A snapshot now and every ``interval`` until the client hangs up."""
        async with trio.open_nursery() as nursery:

            async def until_hangup() -> None:
                while await stream.receive_some(4096):
                    pass  # a watcher has nothing more to say; anything sent is ignored
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_hangup)
            while True:
                assert self._server is not None
                message = encode({"ok": True, "snapshot": snapshot(self._server.statistics())})
                with trio.move_on_after(_WATCH_SEND_TIMEOUT) as scope:
                    await stream.send_all(message)
                if scope.cancelled_caught:
                    log.info("control socket: watcher stopped reading; dropping it")
                    nursery.cancel_scope.cancel()
                    return
                await trio.sleep(interval)
