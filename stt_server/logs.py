"""Logging set-up: stderr (the journal) by default, or a file that survives logrotate."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time

from .config import Config

#: What every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger and message, plus the
    fields the call site gave as ``extra`` (event, session_id, peer, token_label, device,
    durations, error_code, ...) as keys of their own, so tools filter on them."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(config: Config) -> None:
    if config.log_file:
        # WatchedFileHandler reopens the file when logrotate has moved it away.
        handler: logging.Handler = logging.handlers.WatchedFileHandler(config.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, config.log_level.upper()))
    # faster-whisper logs every call at INFO; at our request rate that would drown the journal.
    if config.log_level != "debug":
        logging.getLogger("faster_whisper").setLevel(logging.WARNING)
