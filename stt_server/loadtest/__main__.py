"""``python -m stt_server.loadtest``: the same as ``stt-loadtest``."""

from .cli import main

raise SystemExit(main())
