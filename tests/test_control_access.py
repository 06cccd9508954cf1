"""Who can reach the control socket, and where it may live.

The suite runs as root, so the people here are real accounts made for it (a group standing for
``control_group``, a member, an outsider). Each runs the console's own client in a child
process that starts as root, imports it, and then drops to the user for good (``setgroups``,
``setgid``, ``setuid``) before it connects: the kernel's permission check and the server's
``SO_PEERCRED`` see only that user. (``subprocess``'s ``user=`` would be the same, but the
virtualenv's interpreter may live where these users cannot read, under /root here.)

Also: the socket directory's rules against a squatter (someone else's directory, a writable
one, a symbolic link), the non-root fallback path, and the systemd unit's sandbox as
``systemd-analyze security`` rates it.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import json
import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio

from stt_server.config import Config
from stt_server.control import (
    DEFAULT_SOCKET,
    ControlError,
    ControlServer,
    ancestor_problem,
    directory_problem,
)
from stt_server.server import serve

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 60

GROUP = "sttctl-admins"
MEMBER = "sttctl-member"
OUTSIDER = "sttctl-outsider"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates accounts and chowns: root only")

# The console's client, as USER: prints what came back (or why it was refused) as JSON.
CLIENT = r"""
import asyncio, json, os, sys
from pathlib import Path
from admin_tui.client import ControlClient, ControlUnavailable

uid, gid, groups, path = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
assert (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == (uid, uid, gid, gid)
assert sorted(os.getgroups()) == sorted(groups)

async def snapshot():
    try:
        reply = await ControlClient(Path(path)).request(cmd="snapshot")
    except ControlUnavailable as exc:
        return {"refused": str(exc)}
    return {"ok": reply.get("ok"), "snapshot": sorted(reply.get("snapshot", {}))}

print(json.dumps({"uid": os.geteuid(), **asyncio.run(snapshot())}))
"""

# A control socket served by a non-root server, as USER: where the default path falls back to,
# whether the directory is accepted, and what becomes of the socket and the directory.
SERVER = r"""
import json, logging, os, stat, sys
from pathlib import Path
import trio
from stt_server.control import DEFAULT_SOCKET, ControlError, ControlServer, resolve_socket_path

uid, gid, groups, path, group = (
    int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
)
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
path = resolve_socket_path(DEFAULT_SOCKET) if path == "default" else Path(path)

async def main():
    out = {"path": str(path)}
    control = ControlServer(None, path, group=group)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.run)
            for name, st in (("socket", os.stat(path)), ("directory", os.stat(path.parent))):
                out[name] = [stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
            nursery.cancel_scope.cancel()
    except* ControlError as caught:
        while isinstance(caught, BaseExceptionGroup):
            caught = caught.exceptions[0]
        out["refused"] = str(caught)
    print(json.dumps(out))

trio.run(main)
"""


@attrs.frozen
class Account:
    name: str
    uid: int
    gid: int

    @property
    def groups(self) -> list[int]:
        """The supplementary groups a login would give this user (from the user database)."""
        return sorted(set(os.getgrouplist(self.name, self.gid)))


def _admin(*argv: str) -> None:
    """Run groupadd/useradd/usermod/gpasswd, waiting out another process's lock on /etc."""
    for _ in range(50):
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode == 0:
            return
        if "lock" not in proc.stderr.lower():
            raise AssertionError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        time.sleep(0.1)
    raise AssertionError(f"{' '.join(argv)}: /etc stayed locked")


def _ensure_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        # Made meanwhile by a parallel run? The lookup below decides.
        with contextlib.suppress(AssertionError):
            _admin("groupadd", "--system", name)
        return grp.getgrnam(name).gr_gid


def _ensure_user(name: str, *, member_of: str | None) -> Account:
    try:
        pwd.getpwnam(name)
    except KeyError:
        try:
            _admin(
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            )
        except AssertionError:
            pwd.getpwnam(name)  # made meanwhile by a parallel run, or a real failure
    entry = pwd.getpwnam(name)
    members = grp.getgrnam(GROUP).gr_mem
    if member_of and name not in members:
        _admin("usermod", "--append", "--groups", member_of, name)
    if not member_of and name in members:
        _admin("gpasswd", "--delete", name, GROUP)
    return Account(name, entry.pw_uid, entry.pw_gid)


@attrs.frozen
class Accounts:
    gid: int
    member: Account
    outsider: Account


@pytest.fixture(scope="module")
def accounts() -> Accounts:
    """Real entries in /etc/passwd and /etc/group, made once and kept (system accounts with no
    home and no login shell), so that every check the kernel and the server make is the real
    one. Running again reuses them and repairs their group membership if it changed."""
    if os.geteuid() != 0:
        pytest.skip("creates accounts: root only")
    gid = _ensure_group(GROUP)
    return Accounts(
        gid, _ensure_user(MEMBER, member_of=GROUP), _ensure_user(OUTSIDER, member_of=None)
    )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A root-owned directory everyone may enter (pytest's own temporary directories are 0700,
    which would keep the test users out before any rule of ours is reached)."""
    path = Path(tempfile.mkdtemp(prefix="stt-control-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _as_user(
    script: str, account: Account, *args: str, groups: list[int] | None = None
) -> dict:
    """Run ``script`` as ``account`` (after its imports); its last stdout line, parsed."""
    groups = account.groups if groups is None else groups
    who = [str(account.uid), str(account.gid), json.dumps(groups)]
    with trio.fail_after(DEADLINE):
        proc = await trio.run_process(
            [sys.executable, "-c", script, *who, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout.decode().splitlines()[-1])
    result["log"] = proc.stderr.decode()
    return result


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- who may connect ----------------------------------------------------------------------------


@needs_root
async def test_the_console_works_for_control_group_and_is_refused_to_others(
    nursery, speech_model, accounts, shared_dir
) -> None:
    path = shared_dir / "run" / "control.sock"
    config = Config(host="127.0.0.1", port=0, control_socket=str(path), control_group=GROUP)
    shutdown = trio.Event()
    await nursery.start(functools.partial(serve, config, model=speech_model, shutdown=shutdown))
    # The server made the directory for the group, and gave the socket to it.
    st = path.parent.lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 0, accounts.gid)
    st = path.lstat()
    assert stat.S_ISSOCK(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, accounts.gid)

    member = await _as_user(CLIENT, accounts.member, str(path))
    assert accounts.gid in accounts.member.groups
    assert member["uid"] == accounts.member.uid and member["ok"] is True, member
    assert {"sessions", "gpus", "max_connections", "draining"} <= set(member["snapshot"])

    # Not in the group: the socket's mode already keeps them out (EACCES on connect).
    outsider = await _as_user(CLIENT, accounts.outsider, str(path))
    assert accounts.gid not in accounts.outsider.groups
    assert outsider["refused"].startswith(f"permission denied on {path}"), outsider

    # Holding the group in its process but not in the user database: the kernel lets it
    # connect, the server's own check (SO_PEERCRED, then the group's members) does not.
    impostor = await _as_user(
        CLIENT, accounts.outsider, str(path), groups=[*accounts.outsider.groups, accounts.gid]
    )
    assert impostor["refused"] == "permission denied by the server: join its control_group"
    shutdown.set()


@needs_root
async def test_a_server_outside_control_group_warns_and_still_serves_its_own_user(
    accounts, shared_dir
) -> None:
    """Under a unit without SupplementaryGroups= the server cannot give its socket to the
    group: it says so in the log, keeps the socket its own (0660, its group) and runs on."""
    home = shared_dir / "outsider"
    home.mkdir(mode=0o700)
    os.chown(home, accounts.outsider.uid, accounts.outsider.gid)
    path = home / "control.sock"
    result = await _as_user(SERVER, accounts.outsider, str(path), GROUP)
    assert "refused" not in result, result
    assert result["socket"] == [0o660, accounts.outsider.uid, accounts.outsider.gid]
    assert f"cannot give {path} to group {GROUP}" in result["log"]
    assert f"uid {accounts.outsider.uid} ({OUTSIDER}) is not a member" in result["log"]


# --- where the socket may live ------------------------------------------------------------------


@needs_root
async def test_the_default_path_falls_back_per_user_and_a_squatted_fallback_is_refused(
    accounts, shared_dir
) -> None:
    """Not root, no /run/stt-server of its own: $XDG_RUNTIME_DIR/stt-server, else
    /tmp/stt-server-<uid>. Both names are predictable, so someone else may make them first
    in a shared directory; here $XDG_RUNTIME_DIR is such a directory (1777, like /tmp)."""
    shared = shared_dir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    fallback = shared / "stt-server"
    env = {"XDG_RUNTIME_DIR": str(shared)}

    async def start_as_outsider() -> dict:
        with _environment(env):
            return await _as_user(SERVER, accounts.outsider, "default", "")

    # Fresh: the server makes it, private to itself.
    result = await start_as_outsider()
    assert result["path"] == str(fallback / "control.sock")
    assert result["directory"] == [0o700, accounts.outsider.uid, accounts.outsider.gid], result
    assert result["socket"][0] == 0o660

    # Squatted by another user (the member here): refused, naming the path and the owner.
    shutil.rmtree(fallback)
    fallback.mkdir(mode=0o755)
    os.chown(fallback, accounts.member.uid, accounts.member.gid)
    result = await start_as_outsider()
    assert result["refused"].startswith(
        f"control socket directory {fallback} is owned by uid {accounts.member.uid} ({MEMBER}), "
        f"not by this server's user (uid {accounts.outsider.uid} ({OUTSIDER})) or root"
    ), result
    assert "socket" not in result

    # A link to a directory of the squatter's: refused without following it.
    shutil.rmtree(fallback)
    target = shared / "elsewhere"
    target.mkdir(mode=0o700)
    os.chown(target, accounts.outsider.uid, accounts.outsider.gid)
    fallback.symlink_to(target)
    os.lchown(fallback, accounts.member.uid, accounts.member.gid)
    result = await start_as_outsider()
    assert result["refused"].startswith(f"control socket directory {fallback} is a symbolic link")
    assert not (target / "control.sock").exists()

    # Without $XDG_RUNTIME_DIR: /tmp/stt-server-<uid> (only resolved here, not created).
    with _environment({"XDG_RUNTIME_DIR": None}):
        resolved = await _as_user(
            "import json, os, sys\n"
            "from stt_server.control import DEFAULT_SOCKET, resolve_socket_path\n"
            "os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[1]))\n"
            "print(json.dumps({'path': str(resolve_socket_path(DEFAULT_SOCKET))}))",
            accounts.outsider,
        )
    assert resolved["path"] == f"/tmp/stt-server-{accounts.outsider.uid}/control.sock"


class _environment:
    """Set (or, with None, remove) environment variables for the children started inside."""

    def __init__(self, changes: dict[str, str | None]) -> None:
        self._changes = changes
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for name, value in self._changes.items():
            self._saved[name] = os.environ.get(name)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def __exit__(self, *exc: object) -> None:
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@needs_root
@pytest.mark.parametrize(
    ("make", "problem"),
    [
        ("someone else's", "is owned by uid {member} ({member_name}), not by root"),
        ("world-writable", "is writable by group or others (mode 0777)"),
        ("group-writable", "is writable by group or others (mode 0770)"),
        ("sticky like /tmp", "is writable by group or others (mode 1777)"),
        ("a symbolic link", "is a symbolic link"),
        ("a file", "is not a directory"),
        (
            "under a writable one",
            "lies under {base}/open, which is writable by group or others "
            "without the sticky bit (mode 0777)",
        ),
    ],
)
def test_a_directory_someone_else_can_change_is_refused(
    accounts, shared_dir, make, problem
) -> None:
    base = shared_dir
    directory = base / "run"
    if make == "someone else's":
        directory.mkdir()
        os.chown(directory, accounts.member.uid, accounts.member.gid)
    elif make == "world-writable":
        directory.mkdir()
        directory.chmod(0o777)
    elif make == "group-writable":
        directory.mkdir()
        directory.chmod(0o770)
    elif make == "sticky like /tmp":
        directory.mkdir()
        directory.chmod(0o1777)
    elif make == "a symbolic link":
        (base / "real").mkdir(mode=0o700)
        directory.symlink_to(base / "real")
    elif make == "a file":
        directory.write_text("")
    else:
        (base / "open").mkdir()
        (base / "open").chmod(0o777)
        directory = base / "open" / "run"
        directory.mkdir(mode=0o700)
    expected = problem.format(member=accounts.member.uid, member_name=MEMBER, base=base)
    control = ControlServer(None, directory / "control.sock")
    with pytest.raises(ControlError) as caught:
        control.prepare()
    message = str(caught.value)
    assert message.startswith(f"control socket directory {directory} {expected}; refusing")
    assert "set control_socket" in message
    assert not (directory / "control.sock").exists()
    assert not (base / "real" / "control.sock").exists()


@needs_root
def test_the_server_refuses_to_start_with_one_clear_line(accounts, shared_dir) -> None:
    """Through the real entry point: the check comes before the model loads."""
    directory = shared_dir / "run"
    directory.mkdir()
    os.chown(directory, accounts.member.uid, accounts.member.gid)
    proc = subprocess.run(
        [
            Path(sys.executable).with_name("stt-server"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--control-socket",
            str(directory / "control.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert proc.returncode == 1, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if "cannot start" in line]
    assert f"cannot start: control socket directory {directory} is owned by uid" in line
    assert "Traceback" not in proc.stderr


async def test_a_fresh_directory_is_private_whatever_the_umask(tmp_path, caplog) -> None:
    """The unit sets UMask=0077; the socket must still come out 0660 and its new directory
    0700 (0750 for a control group, with its missing parents 0755)."""
    old = os.umask(0o077)
    try:
        path = tmp_path / "a" / "b" / "control.sock"
        control = ControlServer(None, path)
        async with trio.open_nursery() as nursery:
            await nursery.start(control.run)
            assert _mode(path) == 0o660 and stat.S_ISSOCK(path.lstat().st_mode)
            assert _mode(path.parent) == 0o700 and _mode(path.parent.parent) == 0o755
            nursery.cancel_scope.cancel()
        assert not path.exists()  # removed on the way out

        if os.geteuid() == 0:
            group = grp.getgrgid(os.getegid()).gr_name
            path = tmp_path / "grouped" / "control.sock"
            with caplog.at_level(logging.WARNING, logger="stt_server.control"):
                async with trio.open_nursery() as nursery:
                    await nursery.start(ControlServer(None, path, group=group).run)
                    assert _mode(path) == 0o660 and _mode(path.parent) == 0o750
                    nursery.cancel_scope.cancel()
            assert not [r for r in caplog.records if r.name == "stt_server.control"]
    finally:
        os.umask(old)


def test_directory_rules_without_a_filesystem() -> None:
    def st(mode: int, uid: int = 1000) -> os.stat_result:
        return os.stat_result((mode, 0, 0, 1, uid, 1000, 0, 0, 0, 0))

    directory = stat.S_IFDIR
    assert directory_problem(st(directory | 0o700), 1000) is None
    assert directory_problem(st(directory | 0o755, uid=0), 1000) is None  # root's, like /run
    assert directory_problem(st(directory | 0o750), 1000) is None
    assert "owned by uid 1234" in directory_problem(st(directory | 0o700, uid=1234), 1000)
    assert "writable" in directory_problem(st(directory | 0o720), 1000)
    assert "writable" in directory_problem(st(directory | 0o1777, uid=0), 1000)
    assert directory_problem(st(stat.S_IFLNK | 0o777), 1000) == "is a symbolic link"
    # Above it, a sticky shared directory is fine (/tmp): nobody can rename what is not theirs.
    assert ancestor_problem(st(directory | 0o1777, uid=0), 1000) is None
    assert "without the sticky bit" in ancestor_problem(st(directory | 0o777, uid=0), 1000)
    assert "owned by uid 1234" in ancestor_problem(st(directory | 0o755, uid=1234), 1000)


# --- the systemd unit ---------------------------------------------------------------------------

#: What `systemd-analyze security --offline=true` (systemd 252, Debian 12) rates the unit; it
#: was 3.4 before the hardening below. Lower is better; do not let it creep back up.
MAX_EXPOSURE = 1.9


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in (ROOT / "systemd/stt-server.service").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_keeps_its_hardening() -> None:
    unit = _unit_settings()
    for key, value in {
        "UMask": "0077",
        "SystemCallFilter": "@system-service",
        "SystemCallErrorNumber": "EPERM",
        "ProtectProc": "invisible",
        "PrivateIPC": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "LogsDirectory": "stt-server",
        "RuntimeDirectory": "stt-server",
        # Everyone may enter; the socket inside is 0660 for control_group (see the unit).
        "RuntimeDirectoryMode": "0755",
    }.items():
        assert unit.get(key) == [value], (key, unit.get(key))
    assert re.fullmatch(r"\d+[KMGT]", unit["MemoryHigh"][0])
    assert re.fullmatch(r"\d+[KMGT]", unit["MemoryMax"][0])
    assert "ProcSubset" not in unit  # hides /proc/cpuinfo and /proc/driver/nvidia
    assert "ReadWritePaths" not in unit  # LogsDirectory= makes /var/log/stt-server writable
    # The service user must be in control_group to give the socket to it.
    example = Config.from_toml(ROOT / "deploy/config.toml")
    assert unit["SupplementaryGroups"] == [example.control_group]


def test_systemd_analyze_security_rates_the_unit_low() -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze not installed (Debian: systemd)"
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "systemd/stt-server.service"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"Overall exposure level for stt-server\.service: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_the_default_socket_is_the_units_runtime_directory() -> None:
    assert Path(DEFAULT_SOCKET).parent == Path("/run") / _unit_settings()["RuntimeDirectory"][0]
