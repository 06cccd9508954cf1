"""What a client hears from the server, as frozen events (sans-IO: text in, an event out).

The wire protocol's server messages (``session``, ``realtime``, ``completed``, ``error``) and the
end of the connection each become one event stamped with its arrival time. Unknown message types
and fields are kept, never rejected, as the protocol asks of clients.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

#: Error codes that refuse a session for load or policy before it starts (the server's
#: refusals); after a ``session`` message the same ``rate_limited`` code is an error instead.
REFUSAL_CODES = frozenset({"server_busy", "rate_limited", "unauthorized"})

#: Error codes that tell, rather than complain: the session moved or the server is leaving.
INFORMATIONAL_CODES = frozenset({"going_away", "device_changed"})


@attrs.frozen
class Event:
    """Something the client learned, at ``at`` (trio clock seconds)."""

    at: float


@attrs.frozen
class SessionStarted(Event):
    session_id: str
    sample_rate: int
    model: str


@attrs.frozen
class Partial(Event):
    text: str
    utterance_id: int


@attrs.frozen
class Final(Event):
    text: str
    utterance_id: int
    start: float  # seconds of session audio
    end: float


@attrs.frozen
class ServerError(Event):
    code: str
    message: str
    retry_after: float | None = None


@attrs.frozen
class Unknown(Event):
    """A message of a type this client does not know (ignored, but kept for the record)."""

    message: dict[str, Any]


@attrs.frozen
class Closed(Event):
    """The connection ended: the close code and reason (``None`` when the peer just vanished)."""

    code: int | None
    reason: str | None = None


def decode(raw: str | bytes, at: float) -> Event:
    """One server frame as an event. A frame that is not a JSON object is an ``Unknown``
    wrapping ``{"raw": ...}``: a client must survive whatever a (future) server sends."""
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return Unknown(at, {"raw": raw[:200]})
    if not isinstance(message, dict):
        return Unknown(at, {"raw": message})
    return decode_message(message, at)


def decode_message(message: dict[str, Any], at: float) -> Event:
    kind = message.get("type")
    try:
        if kind == "session":
            return SessionStarted(
                at,
                str(message.get("session_id", "")),
                int(message.get("sample_rate", 16000)),
                str(message.get("model", "")),
            )
        if kind == "realtime":
            return Partial(at, str(message["text"]), int(message["utterance_id"]))
        if kind == "completed":
            return Final(
                at,
                str(message["text"]),
                int(message["utterance_id"]),
                float(message["start"]),
                float(message["end"]),
            )
        if kind == "error":
            retry = message.get("retry_after")
            return ServerError(
                at,
                str(message.get("code", "")),
                str(message.get("message", "")),
                float(retry) if isinstance(retry, int | float) else None,
            )
    except (KeyError, TypeError, ValueError):
        pass  # a known type with missing or odd fields: keep it as unknown
    return Unknown(at, message)
