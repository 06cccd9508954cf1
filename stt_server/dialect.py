"""What a session says on the wire, as a small per-session object: the *dialect*, sans-IO.

A :class:`~stt_server.session.Session` is one recognizer (intake, endpointing, partials,
finals, limits) that can speak more than one protocol. It reads frames through its dialect's
:meth:`Dialect.parse`, which turns them into the events of :mod:`.protocol`, and it tells the
dialect what happened (an utterance opened or ended, a partial or a final is ready, an error),
which answers with the JSON text to send. Nothing here touches a socket or a clock.

- :class:`NativeDialect`: this server's own protocol (ARCHITECTURE.md), unchanged.
- :class:`~stt_server.realtime_protocol.RealtimeDialect`: OpenAI's Realtime transcription
  protocol on ``/v1/realtime``.

A dialect object belongs to one session, so whatever it remembers (item ids, the text a client
has already been sent) is that session's alone.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from .errors import ErrorCode
from .protocol import (
    MODEL_SAMPLE_RATE,
    ClientEvent,
    ConfigUpdate,
    completed_message,
    error_message,
    parse_client_message,
    realtime_message,
    session_message,
)

# --- what a session can be asked beyond the native protocol's events ---------------------------


@attrs.frozen
class TurnDetection:
    """How utterances end, as a client chose (OpenAI's ``turn_detection``): after ``silence``
    seconds without speech, keeping ``prefix_padding`` seconds around it; ``enabled=False``:
    only when the client commits."""

    enabled: bool
    threshold: float
    silence: float
    prefix_padding: float


@attrs.frozen
class SessionUpdate:
    """Settings changed at once: the native ones, and turn detection (None: unchanged)."""

    config: ConfigUpdate = attrs.Factory(ConfigUpdate)
    turn_detection: TurnDetection | None = None


@attrs.frozen
class Clear:
    """Throw away the audio not yet committed, and the utterance it was part of."""


#: Everything a dialect's parse may return.
SessionEvent = ClientEvent | SessionUpdate | Clear


class Dialect(Protocol):
    #: For log lines: which protocol the session speaks.
    name: str
    #: Rate assumed for client audio until it declares one; None: the server's ``sample_rate``.
    sample_rate: int | None
    #: Every utterance gets a final, also one with too little speech or no text (the client was
    #: told that it began, so it waits for its end).
    completes_every_utterance: bool
    #: The session wants :class:`~stt_server.segmenter.UtteranceStarted` events.
    reports_speech_start: bool

    def parse(self, message: str | bytes) -> SessionEvent:
        """One received message as an event; raises an SttError for what to tell the client."""
        ...

    def greeting(self, session_id: str, model: str, language: str | None) -> list[str]: ...

    def updated(self) -> list[str]:
        """The answer to a settings change (ConfigUpdate or SessionUpdate) the session has
        applied."""
        ...

    def speech_started(self, utterance_id: int, start: float) -> list[str]: ...

    def utterance_ended(self, utterance_id: int, end: float, reason: str) -> list[str]:
        """The utterance is closed (its audio goes to the final); ``reason`` as the segmenter's."""
        ...

    def commit_empty(self) -> bool:
        """A flush found no open utterance: True to end an empty one all the same (the client
        expects an item for the audio it sent); raises an SttError when there is nothing to
        commit at all."""
        ...

    def cleared(self, utterance_id: int | None) -> list[str]:
        """The uncommitted audio, and the open utterance if any, were thrown away."""
        ...

    def partial(self, text: str, utterance_id: int) -> str | None:
        """Rendered when the outbox hands it to the socket (never earlier), so it can be
        computed against what the client has actually received; None: nothing to send."""
        ...

    def final(
        self,
        text: str,
        utterance_id: int,
        start: float,
        end: float,
        *,
        language: str | None = None,
        language_probability: float | None = None,
    ) -> list[str]: ...

    def failed(self, utterance_id: int, message: str) -> list[str]:
        """The utterance's final could not be transcribed."""
        ...

    def error(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry_after: float | None = None,
        reply: bool = False,
    ) -> str:
        """An error; ``reply``: caused by the message just parsed."""
        ...


class NativeDialect:
    """The server's own protocol: ``session``, ``realtime``, ``completed``, ``error``."""

    name = "native"
    sample_rate = None
    completes_every_utterance = False
    reports_speech_start = False

    def parse(self, message: str | bytes) -> SessionEvent:
        return parse_client_message(message)

    def greeting(self, session_id: str, model: str, language: str | None) -> list[str]:
        return [session_message(session_id, MODEL_SAMPLE_RATE, model, language)]

    def updated(self) -> list[str]:
        return []

    def speech_started(self, utterance_id: int, start: float) -> list[str]:
        return []

    def utterance_ended(self, utterance_id: int, end: float, reason: str) -> list[str]:
        return []

    def commit_empty(self) -> bool:
        return False

    def cleared(self, utterance_id: int | None) -> list[str]:
        return []

    def partial(self, text: str, utterance_id: int) -> str | None:
        return realtime_message(text, utterance_id)

    def final(
        self,
        text: str,
        utterance_id: int,
        start: float,
        end: float,
        *,
        language: str | None = None,
        language_probability: float | None = None,
    ) -> list[str]:
        return [
            completed_message(
                text,
                utterance_id,
                start,
                end,
                language=language,
                language_probability=language_probability,
            )
        ]

    def failed(self, utterance_id: int, message: str) -> list[str]:
        return [error_message(ErrorCode.TRANSCRIPTION_FAILED.value, message)]

    def error(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry_after: float | None = None,
        reply: bool = False,
    ) -> str:
        return error_message(code.value, message, retry_after=retry_after)
