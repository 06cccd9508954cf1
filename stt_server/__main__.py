"""``stt-server``: parse settings, set up logging, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import checkconfig
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
    parser = argparse.ArgumentParser(
        prog="stt-server token",
        description="Make a client token. Line 1 is the token: give it to the client, it is "
        "shown only now. Line 2 goes into the tokens file (only the token's hash is stored).",
    )
    parser.add_argument("action", choices=["new"])
    parser.add_argument("label", help="one word naming the client, e.g. team-web (logged)")
    args = parser.parse_args(argv)
    token = new_token()
    try:
        line = tokens_file_line(token, args.label)
    except ValueError as exc:
        print(f"stt-server token: {exc}", file=sys.stderr)
        return 2
    print(token)
    print(line)
    return 0


def check_config_command(argv: Sequence[str]) -> int:
    """``stt-server check-config FILE``: 0 when the file is fine, 1 with its problems listed."""
    parser = argparse.ArgumentParser(
        prog="stt-server check-config",
        description="Print the effective settings of a config file and every problem with "
        "them, without starting the server.",
    )
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    report = checkconfig.check(args.file)
    print(checkconfig.render(report, args.file))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["token"]:
        return token_command(argv[1:])
    if argv[:1] == ["check-config"]:
        return check_config_command(argv[1:])
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
