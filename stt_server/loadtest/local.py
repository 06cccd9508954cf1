"""Starting an stt-server process on this machine, for benchmarks, demos and tests."""

from __future__ import annotations

import socket
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, *extra: str) -> list[str]:
    """``stt-server`` on 127.0.0.1:``port`` with the current interpreter, plus ``extra`` flags."""
    return [sys.executable, "-m", "stt_server", "--host", "127.0.0.1", "--port", str(port), *extra]


def wait_until_listening(port: int, seconds: float) -> bool:
    """Blocking: True once something accepts on the port, False after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False
