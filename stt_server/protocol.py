"""The wire protocol, sans-IO: frames in, frozen events out; events in, JSON text out.

Nothing here touches a socket or an event loop, so every rule of ARCHITECTURE.md's protocol
section is testable with plain function calls. Parsing raises an
:class:`~stt_server.errors.SttError` subclass whose ``error_code`` is what the client is told.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import attrs

from .errors import InvalidAudio, InvalidMessage, excerpt
from .jsonlimits import JsonRejected, loads_object

#: Sample rates a client may declare; anything else is resampled from this range to 16 kHz.
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000

#: The rate Whisper and Silero work at; every session's audio is converted to it on intake.
MODEL_SAMPLE_RATE = 16000


@attrs.frozen
class AudioChunk:
    """PCM16 little-endian mono bytes (even length), at ``sample_rate`` when the client said so."""

    pcm: bytes
    sample_rate: int | None = None


#: The ``language`` a client sends to have the model detect it (multilingual models).
DETECT_LANGUAGE = "auto"

TASKS = ("transcribe", "translate")

#: Longest prompt or hotwords text a client may set: Whisper reads at most 223 prompt tokens,
#: a few characters each.
MAX_PROMPT_CHARS = 1000


@attrs.frozen
class ConfigUpdate:
    """Fields left None are unchanged; an empty prompt or hotwords text clears it."""

    language: str | None = None
    sample_rate: int | None = None
    task: str | None = None
    prompt: str | None = None
    hotwords: str | None = None


@attrs.frozen
class Flush:
    pass


@attrs.frozen
class End:
    pass


ClientEvent = AudioChunk | ConfigUpdate | Flush | End


def _sample_rate(value: Any) -> int:
    # bool is an int subclass; "sample_rate": true is a client bug, not 1 Hz.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAudio(f"sample_rate must be an integer, got {excerpt(value)}")
    if not MIN_SAMPLE_RATE <= value <= MAX_SAMPLE_RATE:
        raise InvalidAudio(
            f"sample_rate {value} is outside the supported {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )
    return value


def _check_pcm(pcm: bytes) -> bytes:
    if len(pcm) % 2:
        raise InvalidAudio(f"PCM16 audio needs an even number of bytes, got {len(pcm)}")
    return pcm


def _language(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 2 <= len(value) <= 8 or not value.isascii():
        raise InvalidMessage(
            f'language must be a short language code like "en", got {excerpt(value)}'
        )
    return value.lower()


def _task(value: Any) -> str | None:
    if value is None or value in TASKS:
        return value
    raise InvalidMessage(f'task must be "transcribe" or "translate", got {excerpt(value)}')


def _text(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidMessage(f"{name} must be a string, got {excerpt(value)}")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidMessage(f"{name} is longer than {MAX_PROMPT_CHARS} characters")
    return value.strip()


def parse_client_message(message: str | bytes) -> ClientEvent:
    """Turn one received WebSocket message into an event, or raise what to tell the client."""
    if isinstance(message, bytes):
        return AudioChunk(_check_pcm(message))
    try:
        obj = loads_object(message)
    except JsonRejected as exc:
        raise InvalidMessage(f"text frames must be JSON objects ({exc})") from None
    kind = obj.get("type")
    if kind == "audio":
        data = obj.get("data")
        if not isinstance(data, str):
            raise InvalidAudio('audio messages need a base64 string in "data"')
        try:
            pcm = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidAudio('"data" is not valid base64') from None
        rate = obj.get("sample_rate")
        return AudioChunk(_check_pcm(pcm), None if rate is None else _sample_rate(rate))
    if kind == "config":
        rate = obj.get("sample_rate")
        return ConfigUpdate(
            language=_language(obj.get("language")),
            sample_rate=None if rate is None else _sample_rate(rate),
            task=_task(obj.get("task")),
            prompt=_text("prompt", obj.get("prompt")),
            hotwords=_text("hotwords", obj.get("hotwords")),
        )
    if kind == "flush":
        return Flush()
    if kind == "end":
        return End()
    if kind is None:
        raise InvalidMessage('message has no "type"')
    raise InvalidMessage(f"unknown message type {excerpt(kind)}")


# --- server -> client ---------------------------------------------------------------------------


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def session_message(
    session_id: str, sample_rate: int, model: str, language: str | None = None
) -> str:
    return _dump(
        {
            "type": "session",
            "session_id": session_id,
            "sample_rate": sample_rate,
            "model": model,
            "language": language or DETECT_LANGUAGE,
        }
    )


def realtime_message(text: str, utterance_id: int) -> str:
    return _dump({"type": "realtime", "text": text, "utterance_id": utterance_id})


def completed_message(
    text: str,
    utterance_id: int,
    start: float,
    end: float,
    *,
    language: str | None = None,
    language_probability: float | None = None,
) -> str:
    """``language``: the language the model detected in this utterance, when it was asked to."""
    obj: dict[str, Any] = {
        "type": "completed",
        "text": text,
        "utterance_id": utterance_id,
        "start": round(start, 2),
        "end": round(end, 2),
    }
    if language is not None:
        obj["language"] = language
        obj["language_probability"] = language_probability
    return _dump(obj)


def error_message(code: str, message: str, *, retry_after: float | None = None) -> str:
    obj: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if retry_after is not None:
        obj["retry_after"] = retry_after
    return _dump(obj)
