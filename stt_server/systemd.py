"""systemd's notify protocol (``Type=notify``), spoken directly over ``NOTIFY_SOCKET``.

The protocol is one datagram per state change on a Unix socket whose path systemd puts in the
environment (a leading ``@`` means the abstract namespace). Nothing is sent when the variable is
unset, so the same binary runs fine outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address = ("\0" + path[1:]) if path.startswith("@") else path
        self._watchdog_usec = self._watchdog(env)

    @staticmethod
    def _watchdog(env: Mapping[str, str]) -> int | None:
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) or None
        except ValueError:
            return None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives: half of systemd's WatchdogSec, as sd_watchdog_enabled
        recommends, or None when no watchdog is configured."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec else None

    async def notify(self, state: str) -> None:
        if not self._address:
            return
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            await sock.sendto(state.encode(), self._address)
        except OSError as exc:
            # systemd gone or the socket unusable: nothing to tell, and no reason to stop serving.
            log.warning("cannot notify systemd (%s): %s", state, exc)
        finally:
            sock.close()

    async def run_watchdog(self) -> None:
        """Send WATCHDOG=1 at half the configured interval until cancelled."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            await self.notify("WATCHDOG=1")
            await trio.sleep(interval)
