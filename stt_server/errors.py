"""One error hierarchy for everything a client can be told.

Each error carries the wire ``error_code`` and, where the session must end, the WebSocket
``close_code``; the session translates them once, at its boundary, into an ``error`` message
(and a close). Codes are public contract (see ARCHITECTURE.md), so they live here as constants.
"""

from __future__ import annotations

import enum

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


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013
    KICKED = 4000
    UNAUTHORIZED = 4401


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


class AudioTooFast(SttError):
    """Audio beyond the allowed real-time ratio: the session ends (its finals still sent)."""

    error_code = ErrorCode.RATE_LIMITED
    close_code = CloseCode.POLICY_VIOLATION


class MessageTooBig(SttError):
    error_code = ErrorCode.MESSAGE_TOO_BIG
    close_code = CloseCode.MESSAGE_TOO_BIG
