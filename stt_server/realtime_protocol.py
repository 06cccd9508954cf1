"""OpenAI's Realtime transcription protocol as a session dialect, sans-IO.

Clients of OpenAI's Realtime API (``wss://…/v1/realtime?intent=transcription``) connect to
``/v1/realtime`` on this server's port and get the same sessions as native clients: the same
endpointing, model, limits, tokens and metrics. This module only translates.

Client events understood (anything else gets an ``error`` event and the session goes on):

- ``session.update`` with a ``transcription`` session (the current shape:
  ``audio.input.format``, ``audio.input.transcription.{language,prompt}``,
  ``audio.input.turn_detection``), and the older ``transcription_session.update``
  (``input_audio_format``, ``input_audio_transcription``, ``turn_detection``);
- ``input_audio_buffer.append`` (base64 audio: PCM16 at 24 kHz by default, any rate from 8 to
  48 kHz, or G.711 μ-law/A-law at 8 kHz), ``input_audio_buffer.commit``,
  ``input_audio_buffer.clear``.

Server events sent: ``session.created`` / ``session.updated`` (``transcription_session.*`` for
the older shape), ``input_audio_buffer.speech_started`` / ``speech_stopped`` (server VAD only) /
``committed`` / ``cleared``, ``conversation.item.input_audio_transcription.delta`` /
``completed`` / ``failed``, and ``error``.

Items are utterances
--------------------
Each utterance the segmenter opens is one conversation item. With server VAD (the default)
the item opens when speech starts (``speech_started``) and is committed when the silence
reaches ``silence_duration_ms``; with ``turn_detection: null`` the item is the speech between
two ``input_audio_buffer.commit`` events. Either way, an item longer than ``max_utterance``
(25 s; Whisper hears 30 s at most) is cut at a pause and continues as the next item.

Deltas from partials
--------------------
The native protocol's partials *replace* the text shown; OpenAI's deltas are *appended* and can
never be taken back. So the dialect streams only text that has become stable, and the final
settles the rest:

1. A word is stable when ``AGREEING_PARTIALS`` partials in a row agree on it and on every word
   before it (words compared without case and punctuation), and it is not the last word of the
   newest partial (the audio may end in the middle of that one). Each delta appends the newly
   stable words, as the newest partial spells them. A partial that contradicts text already
   streamed adds nothing.
2. The ``completed`` transcript carries the final's words, and one last delta carries what the
   final adds to the streamed text. Where the final has the streamed words (compared as above;
   nearly always), the streamed stretch keeps the spelling it was streamed with (a comma the
   final adds there cannot be sent any more), so the deltas concatenate to exactly the
   ``completed`` transcript. Where the final hears a streamed word differently (the partials
   are decoded more cheaply than the final), the transcript is the final's text as it is, and
   the last delta carries the final's words after the last one the streamed text also has:
   clients that replace an item's text with the ``completed`` transcript show the final, those
   that only append deltas show nearly the same.

Partials are rendered into deltas when the session's outbox hands them to the socket, not when
they are made, so coalescing a slow reader's partials never loses a delta.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import secrets
from typing import Any
from urllib.parse import parse_qs

import attrs
import numpy as np

from .config import Config
from .dialect import Clear, Dialect, NativeDialect, SessionEvent, SessionUpdate, TurnDetection
from .errors import ErrorCode, InvalidAudio, InvalidMessage, excerpt
from .http import BadRequest, RequestHead
from .jsonlimits import JsonRejected, loads_object
from .protocol import (
    DETECT_LANGUAGE,
    MAX_PROMPT_CHARS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AudioChunk,
    ConfigUpdate,
    Flush,
)

#: The path of the compatible endpoint (also below a proxy's prefix, e.g. ``/stt/v1/realtime``).
REALTIME_PATH = "/v1/realtime"

#: The one ``intent`` offered there.
INTENT = "transcription"

#: OpenAI's PCM rate, assumed until a session says otherwise.
OPENAI_SAMPLE_RATE = 24000

#: G.711 is 8 kHz by definition.
G711_SAMPLE_RATE = 8000

#: Bounds on the turn detection a client may choose: shorter pauses would end an utterance
#: between syllables, longer ones hold a final back for no reason.
SILENCE_MS_RANGE = (100, 10000)
PREFIX_PADDING_MS_RANGE = (0, 2000)
#: Silero's probabilities never quite reach 0 or 1, so OpenAI's 0.0-1.0 is clamped to this.
THRESHOLD_CLAMP = (0.01, 0.99)

#: Partials in a row that must agree on a word before it is streamed. Measured on the four
#: clips (30 items; tiny.en): with 2, the final heard a streamed word differently in 8 items,
#: with 3 in 3, with 4 in 1, while 138, 118 and 101 of their 231 words were streamed before the
#: final. (Partials are decoded more cheaply than finals, so some disagreement stays.)
AGREEING_PARTIALS = 3

#: Longest client ``event_id`` quoted back in an error.
MAX_EVENT_ID_CHARS = 128

#: Client events of the conversation (speech-to-speech) API: real, but not offered here.
_CONVERSATION_EVENTS = frozenset(
    {
        "conversation.item.create",
        "conversation.item.delete",
        "conversation.item.retrieve",
        "conversation.item.truncate",
        "output_audio_buffer.clear",
        "response.cancel",
        "response.create",
    }
)

#: OpenAI's error ``type`` for each of our codes (the ``code`` itself stays ours).
_ERROR_TYPES = {
    ErrorCode.RATE_LIMITED: "rate_limit_error",
    ErrorCode.UNAUTHORIZED: "authentication_error",
    ErrorCode.SERVER_BUSY: "server_error",
    ErrorCode.GOING_AWAY: "server_error",
    ErrorCode.KICKED: "server_error",
    ErrorCode.TRANSCRIPTION_FAILED: "server_error",
    ErrorCode.DEVICE_CHANGED: "server_error",
    ErrorCode.INTERNAL_ERROR: "server_error",
}
_CLIENT_ERROR = "invalid_request_error"


# --- G.711 --------------------------------------------------------------------------------------


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)
    return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84).astype("<i2")


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = (a & 0x0F) << 4
    magnitude = np.where(exponent == 0, mantissa + 8, (mantissa + 0x108) << (exponent - 1).clip(0))
    return np.where(a & 0x80, magnitude, -magnitude).astype("<i2")


#: Byte -> PCM16 sample, ITU-T G.711 (the same values as the retired ``audioop`` module).
_G711 = {"pcmu": _ulaw_table(), "pcma": _alaw_table()}


def g711_to_pcm16(data: bytes, encoding: str) -> bytes:
    """μ-law (``pcmu``) or A-law (``pcma``) bytes as PCM16 little-endian bytes."""
    return _G711[encoding][np.frombuffer(data, dtype=np.uint8)].tobytes()


# --- session state ------------------------------------------------------------------------------


@attrs.frozen
class _Settings:
    """What the client has set, as ``session.updated`` reports it."""

    turn_detection: TurnDetection
    encoding: str = "pcm16"  # "pcm16", "pcmu" or "pcma"
    rate: int = OPENAI_SAMPLE_RATE
    language: str | None = None  # None: detected
    prompt: str = ""


@attrs.define
class _Item:
    """One utterance as a conversation item, and what its client has been sent of it."""

    item_id: str
    streamed: list[str] = attrs.Factory(list)  # words sent in deltas, as spelled there
    text: str = ""  # the deltas so far, concatenated
    #: The last AGREEING_PARTIALS partials' words, in the form they are compared in.
    recent: list[list[str]] = attrs.Factory(list)
    committed: bool = False


def _compared(word: str) -> str:
    """A word as stability and alignment compare it: no case, no punctuation."""
    return "".join(c for c in word.casefold() if c.isalnum() or c == "'")


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def stable_growth(item: _Item, text: str) -> str:
    """The delta a partial adds to ``item`` (rule 1 of the module docstring); updates it."""
    words = text.split()
    compared = [_compared(w) for w in words]
    item.recent = [*item.recent, compared][-AGREEING_PARTIALS:]
    if len(item.recent) < AGREEING_PARTIALS:
        return ""
    agreed = min(_common_prefix(compared, earlier) for earlier in item.recent[:-1])
    stable = min(agreed, len(words) - 1)
    sent = len(item.streamed)
    if stable <= sent or compared[:sent] != [_compared(w) for w in item.streamed]:
        return ""
    new = words[sent:stable]
    delta = (" " if sent else "") + " ".join(new)
    item.streamed.extend(new)
    item.text += delta
    return delta


def _aligned_end(streamed: list[str], final: list[str]) -> int:
    """Index in ``final`` just past its last word that matches one of ``streamed`` (in order):
    where the final catches up with what was streamed. 0 when nothing matches, so that a
    final that agrees with none of it is sent whole."""
    blocks = difflib.SequenceMatcher(None, streamed, final, autojunk=False).get_matching_blocks()
    return max((j + size for _i, j, size in blocks if size), default=0)


def settle(item: _Item, final: str) -> tuple[str, str]:
    """``(completed transcript, last delta)`` of ``item`` once its final is known (rule 2)."""
    if final.startswith(item.text):
        return final, final[len(item.text) :]
    words = final.split()
    # Words that are punctuation alone compare as nothing and are skipped on both sides.
    keyed = [(i, c) for i, w in enumerate(words) if (c := _compared(w))]
    streamed = [c for c in map(_compared, item.streamed) if c]
    space = " " if item.text else ""

    def after(count: int) -> str:
        """The final's text after its first ``count`` compared words."""
        return " ".join(words[keyed[count - 1][0] + 1 :] if count else words)

    if [c for _, c in keyed[: len(streamed)]] == streamed:
        # The same words, spelled otherwise (case, punctuation): the streamed spelling stays,
        # so that the deltas still add up to the transcript.
        rest = after(len(streamed))
        delta = space + rest if rest else ""
        return item.text + delta, delta
    # The final hears a streamed word differently: its text stands, and the last delta brings
    # its words after the last one that the streamed text also has.
    rest = after(_aligned_end(streamed, [c for _, c in keyed]))
    return final, space + rest if rest else ""


# --- parsing helpers ----------------------------------------------------------------------------


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _object(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidMessage(f'"{where}" must be an object, got {excerpt(value)}')
    return value


def _int_ms(value: Any, name: str, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise InvalidMessage(f"{name} must be a whole number of milliseconds, got {excerpt(value)}")
    low, high = bounds
    if not low <= value <= high:
        raise InvalidMessage(f"{name} must be between {low} and {high}, got {int(value)}")
    return int(value)


def _language(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not 2 <= len(value) <= 8 or not value.isascii():
        raise InvalidMessage(f'language must be an ISO-639-1 code like "en", got {excerpt(value)}')
    return value.lower()


def _prompt(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidMessage(f"prompt must be a string, got {excerpt(value)}")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidMessage(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
    return value.strip()


_LEGACY_FORMATS = {"pcm16": "pcm16", "g711_ulaw": "pcmu", "g711_alaw": "pcma"}
_FORMAT_TYPES = {"audio/pcm": "pcm16", "audio/pcmu": "pcmu", "audio/pcma": "pcma"}


class RealtimeDialect:
    """One session's side of the OpenAI Realtime transcription protocol (see the module
    docstring). ``defaults`` is the server's endpointing, which ``server_vad`` fields that a
    client leaves out fall back to; ``legacy``: the client announced the older API
    (``OpenAI-Beta: realtime=v1``) and is greeted with ``transcription_session.created``."""

    name = "openai-realtime"
    sample_rate = OPENAI_SAMPLE_RATE
    completes_every_utterance = True
    reports_speech_start = True

    def __init__(self, defaults: TurnDetection, *, legacy: bool = False) -> None:
        self._defaults = defaults
        self._legacy = legacy
        self._settings = _Settings(turn_detection=defaults)
        self._pending: tuple[_Settings, bool] | None = None  # parsed, not yet applied
        self._model = ""
        self._session_id = ""
        self._prefix = secrets.token_hex(6)
        self._events = 0
        self._items: dict[int, _Item] = {}
        self._previous_item: str | None = None
        self._uncommitted = False  # audio appended since the last commit or clear
        self._event_id: str | None = None  # of the client event being handled

    # -- client -> server ------------------------------------------------------------------------
    def parse(self, message: str | bytes) -> SessionEvent:
        self._event_id = None
        self._pending = None  # an update the session refused is forgotten
        if isinstance(message, bytes):
            raise InvalidMessage(
                "binary frames are not part of the Realtime API; send input_audio_buffer.append"
            )
        try:
            obj = loads_object(message)
        except JsonRejected as exc:
            raise InvalidMessage(f"events must be JSON objects ({exc})") from None
        event_id = obj.get("event_id")
        if isinstance(event_id, str):
            self._event_id = event_id[:MAX_EVENT_ID_CHARS]
        kind = obj.get("type")
        if kind == "input_audio_buffer.append":
            return self._append(obj.get("audio"))
        if kind == "input_audio_buffer.commit":
            return Flush()
        if kind == "input_audio_buffer.clear":
            return Clear()
        if kind == "session.update":
            return self._update(obj.get("session"), legacy=False)
        if kind == "transcription_session.update":
            return self._update(obj.get("session"), legacy=True)
        if kind is None:
            raise InvalidMessage('event has no "type"')
        if isinstance(kind, str) and kind in _CONVERSATION_EVENTS:
            raise InvalidMessage(f"{kind} is not part of a transcription session")
        raise InvalidMessage(f"unknown event type {excerpt(kind)}")

    def _append(self, audio: Any) -> AudioChunk:
        if not isinstance(audio, str):
            raise InvalidAudio('input_audio_buffer.append needs base64 audio in "audio"')
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidAudio('"audio" is not valid base64') from None
        encoding = self._settings.encoding
        if encoding != "pcm16":
            data = g711_to_pcm16(data, encoding)
        elif len(data) % 2:
            raise InvalidAudio(f"PCM16 audio needs an even number of bytes, got {len(data)}")
        self._uncommitted = self._uncommitted or bool(data)
        return AudioChunk(data)

    def _update(self, session: Any, *, legacy: bool) -> SessionUpdate:
        if not isinstance(session, dict):
            raise InvalidMessage('"session" must be an object')
        if legacy:
            section = session
            fmt = self._legacy_format(session) if "input_audio_format" in session else None
            transcription_key = "input_audio_transcription"
        else:
            kind = session.get("type", INTENT)
            if kind != INTENT:
                raise InvalidMessage(
                    f"this server offers transcription sessions only: session.type must be "
                    f'"transcription", got {excerpt(kind)}'
                )
            section = _object(_object(session, "audio", "session.audio"), "input", "audio.input")
            fmt = self._format(section["format"]) if "format" in section else None
            transcription_key = "transcription"
        settings = self._settings
        if fmt is not None:
            settings = attrs.evolve(settings, encoding=fmt[0], rate=fmt[1])
        transcription = _object(section, transcription_key, transcription_key)
        if "language" in transcription:
            settings = attrs.evolve(settings, language=_language(transcription["language"]))
        if "prompt" in transcription:
            settings = attrs.evolve(settings, prompt=_prompt(transcription["prompt"]))
        if "turn_detection" in section:
            settings = attrs.evolve(
                settings, turn_detection=self._turn_detection(section["turn_detection"])
            )
        self._pending = (settings, legacy)
        return SessionUpdate(
            ConfigUpdate(
                language=(settings.language or DETECT_LANGUAGE)
                if "language" in transcription
                else None,
                sample_rate=settings.rate if fmt is not None else None,
                prompt=settings.prompt if "prompt" in transcription else None,
            ),
            turn_detection=settings.turn_detection if "turn_detection" in section else None,
        )

    @staticmethod
    def _legacy_format(session: dict[str, Any]) -> tuple[str, int]:
        value = session["input_audio_format"]
        # Checked as a string first: a list or an object in the field cannot be looked up.
        if not isinstance(value, str) or value not in _LEGACY_FORMATS:
            raise InvalidAudio(
                f'input_audio_format must be "pcm16", "g711_ulaw" or "g711_alaw", '
                f"got {excerpt(value)}"
            )
        encoding = _LEGACY_FORMATS[value]
        return encoding, OPENAI_SAMPLE_RATE if encoding == "pcm16" else G711_SAMPLE_RATE

    @staticmethod
    def _format(value: Any) -> tuple[str, int]:
        if value is None:
            return "pcm16", OPENAI_SAMPLE_RATE
        if not isinstance(value, dict):
            raise InvalidAudio(f"audio.input.format must be an object, got {excerpt(value)}")
        kind = value.get("type", "audio/pcm")
        if not isinstance(kind, str) or kind not in _FORMAT_TYPES:
            raise InvalidAudio(
                'audio.input.format.type must be "audio/pcm", "audio/pcmu" or "audio/pcma", '
                f"got {excerpt(kind)}"
            )
        encoding = _FORMAT_TYPES[kind]
        if encoding != "pcm16":
            return encoding, G711_SAMPLE_RATE
        rate = value.get("rate", OPENAI_SAMPLE_RATE)
        # OpenAI takes 24 kHz only; any rate the native protocol takes is accepted too.
        if isinstance(rate, bool) or not isinstance(rate, int):
            raise InvalidAudio(f"audio.input.format.rate must be an integer, got {excerpt(rate)}")
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise InvalidAudio(
                f"audio.input.format.rate {rate} is outside the supported "
                f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
            )
        return encoding, rate

    def _turn_detection(self, value: Any) -> TurnDetection:
        """``null``: manual commits only. Fields left out take the server's defaults, as in
        OpenAI's API, where an update replaces the whole ``turn_detection`` object."""
        if value is None:
            return attrs.evolve(self._defaults, enabled=False)
        if not isinstance(value, dict):
            raise InvalidMessage(f"turn_detection must be an object or null, got {excerpt(value)}")
        kind = value.get("type", "server_vad")
        if kind not in ("server_vad", "semantic_vad"):
            raise InvalidMessage(
                f'turn_detection.type must be "server_vad" or "semantic_vad", got {excerpt(kind)}'
            )
        settings = attrs.evolve(self._defaults, enabled=True)
        if kind == "semantic_vad":
            return settings  # served by server VAD with the server's defaults
        threshold = value.get("threshold")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                raise InvalidMessage(
                    f"turn_detection.threshold must be a number, got {excerpt(threshold)}"
                )
            if not 0.0 <= threshold <= 1.0:
                raise InvalidMessage(
                    f"turn_detection.threshold must be between 0.0 and 1.0, got {threshold}"
                )
            low, high = THRESHOLD_CLAMP
            settings = attrs.evolve(settings, threshold=min(max(float(threshold), low), high))
        if value.get("silence_duration_ms") is not None:
            ms = _int_ms(value["silence_duration_ms"], "silence_duration_ms", SILENCE_MS_RANGE)
            settings = attrs.evolve(settings, silence=ms / 1000)
        if value.get("prefix_padding_ms") is not None:
            ms = _int_ms(value["prefix_padding_ms"], "prefix_padding_ms", PREFIX_PADDING_MS_RANGE)
            settings = attrs.evolve(settings, prefix_padding=ms / 1000)
        return settings

    # -- server -> client ------------------------------------------------------------------------
    def _event(self, kind: str, **fields: Any) -> str:
        self._events += 1
        return _dump({"type": kind, "event_id": f"event_{self._prefix}_{self._events}", **fields})

    def _session_object(self, legacy: bool) -> dict[str, Any]:
        s = self._settings
        td = s.turn_detection
        turn = (
            {
                "type": "server_vad",
                "threshold": round(td.threshold, 3),
                "prefix_padding_ms": round(td.prefix_padding * 1000),
                "silence_duration_ms": round(td.silence * 1000),
            }
            if td.enabled
            else None
        )
        transcription = {"model": self._model, "language": s.language, "prompt": s.prompt}
        common = {"id": f"sess_{self._session_id}", "object": "realtime.transcription_session"}
        if legacy:
            formats = {v: k for k, v in _LEGACY_FORMATS.items()}
            return {
                **common,
                "input_audio_format": formats[s.encoding],
                "input_audio_transcription": transcription,
                "turn_detection": turn,
                "input_audio_noise_reduction": None,
                "include": None,
            }
        fmt: dict[str, Any] = {"type": {v: k for k, v in _FORMAT_TYPES.items()}[s.encoding]}
        if s.encoding == "pcm16":
            fmt["rate"] = s.rate
        return {
            **common,
            "type": INTENT,
            "audio": {
                "input": {
                    "format": fmt,
                    "transcription": transcription,
                    "noise_reduction": None,
                    "turn_detection": turn,
                }
            },
            "include": None,
        }

    def greeting(self, session_id: str, model: str, language: str | None) -> list[str]:
        self._session_id = session_id
        self._model = model
        self._settings = attrs.evolve(self._settings, language=language)
        kind = "transcription_session.created" if self._legacy else "session.created"
        return [self._event(kind, session=self._session_object(self._legacy))]

    def updated(self) -> list[str]:
        if self._pending is None:
            return []
        self._settings, legacy = self._pending
        self._pending = None
        kind = "transcription_session.updated" if legacy else "session.updated"
        return [self._event(kind, session=self._session_object(legacy))]

    def _item(self, utterance_id: int) -> _Item:
        item = self._items.get(utterance_id)
        if item is None:
            item = self._items[utterance_id] = _Item(f"item_{self._prefix}_{utterance_id:04d}")
        return item

    def speech_started(self, utterance_id: int, start: float) -> list[str]:
        item = self._item(utterance_id)
        if not self._settings.turn_detection.enabled:
            return []
        return [
            self._event(
                "input_audio_buffer.speech_started",
                audio_start_ms=round(start * 1000),
                item_id=item.item_id,
            )
        ]

    def utterance_ended(self, utterance_id: int, end: float, reason: str) -> list[str]:
        item = self._item(utterance_id)
        if item.committed:
            return []  # the same end, handed over again after an interrupted dispatch
        item.committed = True
        self._uncommitted = False
        out = []
        if reason != "flush" and self._settings.turn_detection.enabled:
            out.append(
                self._event(
                    "input_audio_buffer.speech_stopped",
                    audio_end_ms=round(end * 1000),
                    item_id=item.item_id,
                )
            )
        out.append(self._committed(item.item_id))
        return out

    def _committed(self, item_id: str) -> str:
        previous, self._previous_item = self._previous_item, item_id
        return self._event(
            "input_audio_buffer.committed", item_id=item_id, previous_item_id=previous
        )

    def commit_empty(self) -> bool:
        if not self._uncommitted:
            raise InvalidMessage("the input audio buffer is empty: nothing to commit")
        # Audio without speech: an item all the same, whose transcript is empty.
        return True

    def cleared(self, utterance_id: int | None) -> list[str]:
        if utterance_id is not None:
            self._items.pop(utterance_id, None)
        self._uncommitted = False
        return [self._event("input_audio_buffer.cleared")]

    def partial(self, text: str, utterance_id: int) -> str | None:
        item = self._items.get(utterance_id)
        if item is None:
            return None  # cleared, or already completed: its text can no longer grow
        delta = stable_growth(item, text)
        return self._delta(item.item_id, delta) if delta else None

    def _delta(self, item_id: str, delta: str) -> str:
        return self._event(
            "conversation.item.input_audio_transcription.delta",
            item_id=item_id,
            content_index=0,
            delta=delta,
        )

    def _completed(
        self, item_id: str, transcript: str, seconds: float, language: str | None = None
    ) -> str:
        extra: dict[str, Any] = {}
        if language is not None:
            extra["languages"] = [{"code": language}]
        return self._event(
            "conversation.item.input_audio_transcription.completed",
            item_id=item_id,
            content_index=0,
            transcript=transcript,
            usage={"type": "duration", "seconds": round(seconds, 3)},
            **extra,
        )

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
        item = self._items.pop(utterance_id, None) or _Item(
            f"item_{self._prefix}_{utterance_id:04d}"
        )
        transcript, rest = settle(item, text)
        out = []
        if rest:
            out.append(self._delta(item.item_id, rest))
        out.append(self._completed(item.item_id, transcript, end - start, language))
        return out

    def failed(self, utterance_id: int, message: str) -> list[str]:
        item = self._items.pop(utterance_id, None)
        item_id = item.item_id if item else f"item_{self._prefix}_{utterance_id:04d}"
        return [
            self._event(
                "conversation.item.input_audio_transcription.failed",
                item_id=item_id,
                content_index=0,
                error={
                    "type": "server_error",
                    "code": ErrorCode.TRANSCRIPTION_FAILED.value,
                    "message": message,
                    "param": None,
                },
            )
        ]

    def error(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry_after: float | None = None,
        reply: bool = False,
    ) -> str:
        error: dict[str, Any] = {
            "type": _ERROR_TYPES.get(code, _CLIENT_ERROR),
            "code": code.value,
            "message": message,
            "param": None,
            "event_id": self._event_id if reply else None,
        }
        if retry_after is not None:
            error["retry_after"] = retry_after
        return self._event("error", error=error)


def dialect_for(head: RequestHead, config: Config) -> Dialect:
    """The dialect a WebSocket upgrade asks for, by its path: this one on ``…/v1/realtime``
    (also below a proxy's prefix), the native protocol on any other path. Raises
    :class:`~stt_server.http.BadRequest` for an ``intent`` this server does not offer, so that
    such a client learns it from the handshake's answer."""
    if not head.path.rstrip("/").endswith(REALTIME_PATH):
        return NativeDialect()
    intent = parse_qs(head.query).get("intent", [INTENT])[0]
    if intent != INTENT:
        raise BadRequest(400, f"{REALTIME_PATH} offers intent={INTENT} only")
    defaults = TurnDetection(
        enabled=True,
        threshold=config.vad_threshold,
        silence=config.min_silence,
        prefix_padding=config.speech_pad,
    )
    # The Realtime API's beta announced itself with this header and spoke the older shapes.
    legacy = "realtime=v1" in head.headers.get("openai-beta", "")
    return RealtimeDialect(defaults, legacy=legacy)
