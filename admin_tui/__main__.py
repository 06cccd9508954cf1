"""``stt-admin [--socket PATH]``: the operator's console for a running stt-server."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .app import AdminApp, default_socket
from .client import ControlClient


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stt-admin", description=__doc__.split(":")[1].strip())
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        help=f"the server's control socket (default: {default_socket()})",
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between updates (default: 1)"
    )
    args = parser.parse_args(argv)
    AdminApp(ControlClient(args.socket or default_socket()), interval=args.interval).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
