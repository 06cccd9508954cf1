"""One error hierarchy for everything a client can be told.

Each error carries the wire ``error_code`` and, where the session must end, the WebSocket
``close_code``; the session translates them once, at its boundary, into an ``error`` message
(and a close). Codes are public contract (see ARCHITECTURE.md), so they live here as constants.
"""

from __future__ import annotations

import enum
import json
from typing import Any

#: Consecutive client errors after which a session is closed (1008).
MAX_CONSECUTIVE_ERRORS = 5


class ErrorCode(enum.StrEnum):
    INVALID_MESSAGE = "invalid_message"
    INVALID_AUDIO = "invalid_audio"
    TOO_MANY_ERRORS = "too_many_errors"
    MESSAGE_TOO_BIG = "message_too_big"
    RATE_LIMITED = "rate_limited"
    SERVER_BUSY = "server_busy"
    UNAUTHORIZED = "unauthorized"
    KICKED = "kicked"
    GOING_AWAY = "going_away"
    IDLE_TIMEOUT = "idle_timeout"
    TRANSCRIPTION_FAILED = "transcription_failed"
    SESSION_TOO_LONG = "session_too_long"
    #: Informational: the session's GPU failed and it continues on another one.
    DEVICE_CHANGED = "device_changed"
    #: Something failed inside the server while serving this client; the details are in the
    #: server's log (under the session id), never on the wire.
    INTERNAL_ERROR = "internal_error"


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    KICKED = 4000
    UNAUTHORIZED = 4401


#: Longest piece of a client's input quoted back in an error message.
EXCERPT_CHARS = 40


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short, escaped quotation of client input for an error message: JSON-escaped (no control
    characters or markup reach a log line or a browser), cut to ``limit`` characters."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value[: limit * 2]).decode("latin-1")
    if isinstance(value, str):
        # Cut before escaping, so a megabyte string costs no more than a short one.
        text = json.dumps(value[: limit * 2])
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = json.dumps(type(value).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SttError(Exception):
    """Base of every error reported to a client."""

    error_code: ErrorCode = ErrorCode.INVALID_MESSAGE
    close_code: CloseCode | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidMessage(SttError):
    """The frame is not a message we understand (bad JSON, unknown type, wrong field type)."""

    error_code = ErrorCode.INVALID_MESSAGE


class InvalidAudio(SttError):
    """The audio payload cannot be decoded as PCM16 mono at a supported rate."""

    error_code = ErrorCode.INVALID_AUDIO


class RateLimited(SttError):
    """More than the session's allowance: the session ends (its finals still sent)."""

    error_code = ErrorCode.RATE_LIMITED
    close_code = CloseCode.POLICY_VIOLATION


class AudioTooFast(RateLimited):
    """Audio beyond the allowed real-time ratio."""


class MessageTooBig(SttError):
    error_code = ErrorCode.MESSAGE_TOO_BIG
    close_code = CloseCode.MESSAGE_TOO_BIG
