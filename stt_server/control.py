"""The operator's control socket: newline-delimited JSON over a local Unix stream socket.

One request per line, one reply per line (``watch`` replies with a snapshot per interval until
the client hangs up). Requests are parsed without I/O by :func:`parse_request`; the socket side
checks who is asking (``SO_PEERCRED``: root, the server's own user, or members of
``control_group``) before parsing a byte of it.

Where the socket lives matters as much as who may connect. Whoever can write to its directory
can put their own socket (or a symbolic link) at its name and read what the console sends, or
point the server's ``chmod`` at another file. So the directory must be one nobody else can
change: see :func:`directory_problem` and :func:`ancestor_problem` for the rules, which the server
checks before anything slow starts and refuses to start on, naming the path and what is wrong.
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
from typing import Any, Protocol

import attrs
import trio

from .stats import ServerStatistics

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

#: How long a refused peer's request is waited for (then dropped, unparsed) after the refusal,
#: so that its write does not meet a closed socket before it has read why (it would only learn
#: "connection lost").
_REFUSAL_LINGER = 2.0

#: Mode of a socket directory the server creates: private, or searchable by ``control_group``.
PRIVATE_DIRECTORY_MODE = 0o700
GROUP_DIRECTORY_MODE = 0o750

#: The socket itself: the server's user and ``control_group`` may connect (``SO_PEERCRED``
#: then checks each peer again).
SOCKET_MODE = 0o660


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
    this process cannot use ``/run/stt-server`` (not root, and no directory of its own there, as
    systemd's ``RuntimeDirectory`` would be). The fallback is predictable, so anybody could
    create it first: :meth:`ControlServer.prepare` refuses a directory that is not the server's."""
    path = Path(configured)
    if configured != DEFAULT_SOCKET or os.geteuid() == 0 or _is_own_directory(path.parent):
        return path
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "stt-server" if runtime else Path(f"/tmp/stt-server-{os.geteuid()}")
    return base / "control.sock"


def _is_own_directory(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _foreign_owner(uid: int, euid: int) -> str:
    mine = "root" if euid == 0 else f"this server's user ({_owner(euid)}) or root"
    return f"is owned by {_owner(uid)}, not by {mine}"


def directory_problem(st: os.stat_result, euid: int) -> str | None:
    """What is wrong with the socket's own directory (``lstat`` of it), or ``None``.

    It must be a real directory (a symbolic link could be re-pointed), owned by the server's
    user or root, and writable by nobody else: no group or other write bit, sticky or not (in a
    shared directory like /tmp anybody may take the socket's name before the server does).
    """
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (0, euid):
        return _foreign_owner(st.st_uid, euid)
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def ancestor_problem(st: os.stat_result, euid: int) -> str | None:
    """What is wrong with a directory above the socket's (``stat`` of it), or ``None``.

    Whoever can write there can rename the socket's directory and put another in its place, so
    each must be owned by the server's user or root and writable by nobody else, except with the
    sticky bit (/tmp), where only an entry's owner may rename or remove it.
    """
    if st.st_uid not in (0, euid):
        return _foreign_owner(st.st_uid, euid)
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        mode = stat.S_IMODE(st.st_mode)
        return f"is writable by group or others without the sticky bit (mode {mode:04o})"
    return None


def _refuse(path: Path, problem: str) -> ControlError:
    return ControlError(
        f"control socket directory {path} {problem}; refusing to put the control socket there "
        "(fix it, or set control_socket to a path in a directory only this server's user can "
        "change)"
    )


def _check_ancestors(directory: Path, euid: int) -> None:
    """Every directory above ``directory``, and every symbolic link on the way to it."""
    literal = Path(os.path.abspath(directory))
    for link in literal.parents:
        st = os.lstat(link)
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, euid):
            raise _refuse(
                directory, f"is reached through {link}, a link owned by {_owner(st.st_uid)}"
            )
    real = Path(os.path.realpath(directory.parent))
    for ancestor in (real, *real.parents):
        problem = ancestor_problem(os.stat(ancestor), euid)
        if problem:
            raise _refuse(directory, f"lies under {ancestor}, which {problem}")


def _group_id(group: str) -> int | None:
    try:
        return grp.getgrnam(group).gr_gid if group else None
    except KeyError:
        return None


def _open_directory(path: Path) -> int:
    """A descriptor of ``path`` itself: a symbolic link or anything but a directory fails."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _make_directory(path: Path, mode: int, gid: int | None) -> None:
    """Create ``path`` with exactly ``mode`` (whatever the umask), owned by group ``gid`` if it
    can be; left private (0700) if that group cannot be given."""
    try:
        os.mkdir(path, PRIVATE_DIRECTORY_MODE)
    except FileExistsError:
        return  # made meanwhile by someone else: the checks that follow judge it
    fd = _open_directory(path)
    try:
        if gid is not None:
            try:
                os.fchown(fd, -1, gid)
            except PermissionError:
                mode = PRIVATE_DIRECTORY_MODE  # ControlServer.run() warns about the group
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def secure_directory(directory: Path, *, group: str = "") -> None:
    """Make sure the socket's directory is one only this server's user (or root) can change,
    or raise :class:`ControlError` saying which path is wrong and why.

    An existing directory is checked, never changed. A missing one is created 0700, or 0750 and
    owned by ``group`` when a control group is configured; missing parents are created 0755.
    Every level is checked before anything is created in it, with ``lstat``/``O_NOFOLLOW``.
    """
    euid = os.geteuid()
    directory = Path(os.path.abspath(directory))
    missing = []
    probe = directory
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    for path in reversed(missing):
        _check_ancestors(path, euid)
        if path == directory:
            gid = _group_id(group)
            _make_directory(
                path, PRIVATE_DIRECTORY_MODE if gid is None else GROUP_DIRECTORY_MODE, gid
            )
        else:
            _make_directory(path, 0o755, None)
    _check_ancestors(directory, euid)
    try:
        fd = _open_directory(directory)
    except OSError as exc:
        try:
            problem = directory_problem(os.lstat(directory), euid)
        except OSError:
            problem = None
        raise _refuse(directory, problem or f"cannot be opened ({exc.strerror})") from None
    try:
        problem = directory_problem(os.fstat(fd), euid)
    finally:
        os.close(fd)
    if problem:
        raise _refuse(directory, problem)


def _group_can_reach(st: os.stat_result, gid: int) -> bool:
    return bool(st.st_mode & 0o001 or (st.st_gid == gid and st.st_mode & 0o010))


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


class ControlTarget(Protocol):
    """What the control socket may read and ask of the server: a snapshot and the operator's
    commands, nothing else. The server implements it; tests can too."""

    def statistics(self) -> ServerStatistics: ...
    def kick(self, session_id: str, reason: str) -> bool: ...
    def start_draining(self) -> None: ...
    def stop_draining(self) -> None: ...
    def reset_breaker(self, gpu: int) -> bool: ...
    def set_max_connections(self, value: int) -> None: ...


class ControlServer:
    def __init__(self, server: ControlTarget | None, path: Path, *, group: str = "") -> None:
        self._server = server
        self.path = path
        self._group = group
        self._on_drain: Callable[[], None] = lambda: None

    def attach(self, server: ControlTarget, *, on_drain: Callable[[], None]) -> None:
        """Bind to the running server (created after the path was checked)."""
        self._server = server
        self._on_drain = on_drain

    def prepare(self) -> None:
        """Check the path before anything slow starts: a directory others can change (see
        :func:`secure_directory`), a live server there, or a file that is not a socket, is a
        start-up error the operator should see at once."""
        secure_directory(self.path.parent, group=self._group)
        _remove_stale(self.path)

    def _share_with_group(self) -> None:
        """Give the bound socket to ``control_group``. Failing that is logged, not fatal: root
        and the server's own user can still use the console, and the speech service runs on."""
        if not self._group:
            return
        gid = _group_id(self._group)
        if gid is None:
            log.warning(
                "control socket: no group named %r (control_group); only root and the server's "
                "user can use %s",
                self._group,
                self.path,
            )
            return
        try:
            os.chown(self.path, -1, gid, follow_symlinks=False)
        except PermissionError:
            log.warning(
                "control socket: cannot give %s to group %s: this server's %s is not a member "
                "of it (under systemd: SupplementaryGroups=%s), so members cannot connect",
                self.path,
                self._group,
                _owner(os.geteuid()),
                self._group,
            )
            return
        st = os.stat(self.path.parent)
        if not _group_can_reach(st, gid):
            log.warning(
                "control socket: members of %s cannot enter %s (mode %04o, group %d): make it "
                "0755, or 0750 with group %s (RuntimeDirectoryMode=0755 under systemd)",
                self._group,
                self.path.parent,
                stat.S_IMODE(st.st_mode),
                st.st_gid,
                self._group,
            )

    async def run(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        self.prepare()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # born 0600: nobody else can connect before the chmod below
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        # Path operations are safe from here on: nobody else can change the directory.
        self._share_with_group()
        os.chmod(self.path, SOCKET_MODE)
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
                    await self._drop_request(stream)
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

    @staticmethod
    async def _drop_request(stream: trio.SocketStream) -> None:
        """Discard, unparsed, what a refused peer sends up to its first line (or EOF, or
        ``MAX_LINE`` bytes, or ``_REFUSAL_LINGER`` seconds)."""
        received = 0
        with trio.move_on_after(_REFUSAL_LINGER):
            while received <= MAX_LINE:
                data = await stream.receive_some(4096)
                if not data or b"\n" in data:
                    return
                received += len(data)

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
            if not server.reset_breaker(request.gpu):
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
