"""``stt-server``: parse settings, set up logging, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from .auth import TokensFileError, new_token, tokens_file_line
from .config import Config, ConfigError
from .control import ControlError
from .logs import setup_logging
from .server import serve

log = logging.getLogger("stt_server")


async def run(config: Config) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            nursery.start_soon(functools.partial(serve, config, shutdown=shutdown))

            async for signum in signals:
                log.info(
                    "received %s: shutting down (grace %.1f s)",
                    signal.Signals(signum).name,
                    config.shutdown_grace,
                )
                shutdown.set()
                break


def token_command(argv: Sequence[str]) -> int:
    """``stt-server token new LABEL``: the token on line 1, the tokens-file line on line 2."""
    if len(argv) != 2 or argv[0] != "new":
        print("usage: stt-server token new LABEL", file=sys.stderr)
        return 2
    token = new_token()
    try:
        line = tokens_file_line(token, argv[1])
    except ValueError as exc:
        print(f"stt-server token: {exc}", file=sys.stderr)
        return 2
    print(token)
    print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["token"]:
        return token_command(argv[1:])
    # NVML numbers GPUs by PCI bus; CUDA by default puts the fastest first. Without this, the
    # memory read for GPU n could belong to another device than the one cuda:n runs on.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        config = Config.from_sources(argv)
    except ConfigError as exc:
        print(f"stt-server: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    failure = None
    try:
        trio.run(run, config)
    except* (ControlError, OSError, TokensFileError) as group:
        # Start-up problems an operator fixes (port taken, socket path in use): one clear line.
        failure = group.exceptions[0]
    if failure is not None:
        log.error("cannot start: %s", failure)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
