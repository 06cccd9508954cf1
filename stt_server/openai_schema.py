"""The OpenAI file API's wire shapes, sans-IO: form parts in, a checked request out; a transcript
in, a response body out; and the error bodies.

``POST /v1/audio/transcriptions`` and ``POST /v1/audio/translations`` take a
``multipart/form-data`` body (``file``, ``model``, ``language``, ``prompt``, ``response_format``,
``temperature``, ``timestamp_granularities[]``) and answer in one of five formats. Behaviour
follows OpenAI's own API where it is observable: word timestamps only with ``verbose_json``
(else 400); ``verbose_json`` lists segments unless only words were asked for; errors are
``{"error": {"message", "type", "param", "code"}}``. Fields OpenAI has added for other models
(``include[]``, ``chunking_strategy``, ...) are accepted and ignored, so clients that send them
still work; ``stream=true`` is refused, since the live API is the WebSocket one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import attrs

from .engine import Segment
from .http import Response
from .multipart import MultipartError, Part

TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"
#: Route -> Whisper task.
ROUTES = {TRANSCRIPTIONS: "transcribe", TRANSLATIONS: "translate"}

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")

#: Longest prompt accepted, in characters: Whisper reads at most 223 prompt tokens (the
#: native protocol's limit too).
MAX_PROMPT_CHARS = 1000
#: Longest value of any other text field: model names, language codes and formats are short.
MAX_FIELD_CHARS = 200

#: Whisper's languages, code -> the lowercase English name that ``verbose_json`` reports (the
#: same table as OpenAI's whisper package; a test checks it against faster-whisper's codes).
LANGUAGE_NAMES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian",
    "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian",
    "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala",
    "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans",
    "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi",
    "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan",
    "tl": "tagalog", "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian",
    "ln": "lingala", "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese",
    "yue": "cantonese",
}  # fmt: skip

#: The ``language`` that asks for detection, as in the native protocol (OpenAI's API detects
#: when ``language`` is left out; here that depends on the server's ``language`` setting).
DETECT = "auto"

#: Fields this API reads; the rest are ignored (see the module docstring).
_KNOWN = {"file", "model", "language", "prompt", "response_format", "temperature", "stream"}
_GRANULARITY_FIELDS = ("timestamp_granularities[]", "timestamp_granularities")

_ERROR_TYPES = {
    401: "invalid_request_error",
    429: "requests",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """Something to tell the client as an OpenAI error body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


def error_response(error: ApiError) -> Response:
    body = {
        "error": {
            "message": error.message,
            "type": _ERROR_TYPES.get(error.status, "invalid_request_error"),
            "param": error.param,
            "code": error.code,
        }
    }
    headers: tuple[tuple[str, str], ...] = ()
    if error.retry_after is not None:
        # Whole seconds, as the header's grammar wants, never 0: "now" would invite a storm.
        headers += (("Retry-After", str(max(1, math.ceil(error.retry_after)))),)
    if error.status == 401:
        headers += (("WWW-Authenticate", 'Bearer realm="stt-server"'),)
    return Response(error.status, _json(body), headers=headers)


@attrs.frozen
class FileRequest:
    """A checked request: everything a transcription of ``audio`` needs to know."""

    task: str
    audio: memoryview = attrs.field(repr=lambda view: f"<{len(view)} bytes>")
    filename: str | None
    model: str | None
    #: None: detect it (multilingual models); English-only models are always "en".
    language: str | None
    prompt: str | None
    response_format: str
    temperature: float | None
    granularities: frozenset[str]


def _invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def parse_request(
    parts: Sequence[Part], *, task: str, multilingual: bool, default_language: str | None = None
) -> FileRequest:
    """Check the form of a file request; :class:`ApiError` (400) says what is wrong with it.
    ``default_language`` (the server's ``language`` setting; None: detect) applies when the
    request names none, as it does for a session that sends none."""
    fields: dict[str, str] = {}
    granularities: list[str] = []
    files: list[Part] = []
    try:
        for part in parts:
            if part.name == "file":
                files.append(part)
            elif part.name in _GRANULARITY_FIELDS:
                granularities.append(_short(part, MAX_FIELD_CHARS))
            elif part.name in _KNOWN:
                if part.name in fields:
                    raise _invalid(f"{part.name} is given twice", part.name)
                limit = MAX_PROMPT_CHARS if part.name == "prompt" else MAX_FIELD_CHARS
                fields[part.name] = _short(part, limit)
    except MultipartError as exc:
        raise _invalid(str(exc)) from None
    if not files:
        raise _invalid("the request has no 'file' part (the audio to transcribe)", "file")
    if len(files) > 1:
        raise _invalid("send one 'file' per request", "file")
    if fields.get("stream", "false").strip().lower() not in ("false", "0", ""):
        raise _invalid(
            "stream is not supported on the file API; the live API is /v1/realtime", "stream"
        )
    response_format = fields.get("response_format", "json").strip() or "json"
    if response_format not in RESPONSE_FORMATS:
        raise _invalid(
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", "response_format"
        )
    wanted = frozenset(g.strip() for g in granularities if g.strip())
    if not wanted <= set(GRANULARITIES):
        raise _invalid(
            "timestamp_granularities may contain 'segment' and 'word'", "timestamp_granularities"
        )
    if "word" in wanted and response_format != "verbose_json":
        raise _invalid(
            "word timestamps need response_format verbose_json", "timestamp_granularities"
        )
    return FileRequest(
        task=task,
        audio=files[0].data,
        filename=files[0].filename,
        model=fields.get("model", "").strip() or None,
        language=_language(
            fields.get("language", ""), multilingual=multilingual, default=default_language
        ),
        prompt=fields.get("prompt", "").strip() or None,
        response_format=response_format,
        temperature=_temperature(fields.get("temperature", "")),
        granularities=wanted,
    )


def _short(part: Part, limit: int) -> str:
    if part.filename is not None:
        raise _invalid(f"{part.name} must be a form field, not a file", part.name)
    if len(part.data) > limit * 4:  # UTF-8: at most 4 bytes a character; cheap early check
        raise _invalid(f"{part.name} is longer than {limit} characters", part.name)
    text = part.text()
    if len(text) > limit:
        raise _invalid(f"{part.name} is longer than {limit} characters", part.name)
    return text


def _language(value: str, *, multilingual: bool, default: str | None) -> str | None:
    code = value.strip().lower()
    if not code:
        # English-only models know one language, whatever the setting says.
        code = (default or DETECT) if multilingual else "en"
    if code == DETECT:
        return None if multilingual else "en"
    if code not in LANGUAGE_NAMES:
        raise _invalid(
            f"language must be an ISO-639-1 code Whisper knows (en, de, fr, ...), got {value!r}",
            "language",
        )
    if not multilingual and code != "en":
        raise _invalid(
            f"this server's model only transcribes English, not {code!r}",
            "language",
            "unsupported_language",
        )
    return code


def _temperature(value: str) -> float | None:
    if not value.strip():
        return None
    try:
        temperature = float(value)
    except ValueError:
        temperature = math.nan
    if not 0.0 <= temperature <= 1.0:  # also NaN
        raise _invalid("temperature must be a number between 0 and 1", "temperature")
    return temperature


# -- responses ---------------------------------------------------------------------------------


@attrs.frozen
class TimedSegment:
    """A segment on the file's clock (the engine's are relative to the chunk decoded)."""

    id: int
    #: Where the chunk it came from starts, in 10 ms frames (Whisper's ``seek``).
    seek: int
    segment: Segment


@attrs.frozen
class FileTranscript:
    task: str
    language: str
    duration: float
    segments: tuple[TimedSegment, ...]

    @property
    def text(self) -> str:
        return " ".join(s.segment.text for s in self.segments if s.segment.text)


def render(transcript: FileTranscript, request: FileRequest) -> Response:
    """The response body in the format the client asked for."""
    kind = request.response_format
    if kind == "text":
        return _text_response(transcript.text + "\n", "text/plain; charset=utf-8")
    if kind == "srt":
        return _text_response(srt(transcript.segments), "application/x-subrip; charset=utf-8")
    if kind == "vtt":
        return _text_response(vtt(transcript.segments), "text/vtt; charset=utf-8")
    usage = {"type": "duration", "seconds": math.ceil(transcript.duration)}
    if kind == "json":
        return Response(200, _json({"text": transcript.text, "usage": usage}))
    body: dict[str, Any] = {
        "task": transcript.task,
        "language": LANGUAGE_NAMES.get(transcript.language, transcript.language),
        "duration": round(transcript.duration, 3),
        "text": transcript.text,
    }
    # OpenAI's rule: segments unless only words were asked for; words only when asked for.
    if request.granularities != {"word"}:
        body["segments"] = [_segment_json(s) for s in transcript.segments]
    if "word" in request.granularities:
        body["words"] = [
            {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
            for s in transcript.segments
            for w in s.segment.words
        ]
    body["usage"] = usage
    return Response(200, _json(body))


def _segment_json(timed: TimedSegment) -> dict[str, Any]:
    segment = timed.segment
    return {
        "id": timed.id,
        "seek": timed.seek,
        "start": round(segment.start, 3),
        "end": round(segment.end, 3),
        "text": segment.text,
        # Token ids are the model's internals; no client we know reads them, and the engine
        # does not carry them. The field stays for clients that expect it.
        "tokens": [],
        "temperature": segment.temperature,
        "avg_logprob": round(segment.avg_logprob, 4),
        "compression_ratio": round(segment.compression_ratio, 4),
        "no_speech_prob": round(segment.no_speech_prob, 4),
    }


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue in both formats; "-->" inside text would read as a timing line.
    return " ".join(text.split()).replace("-->", "->")


def srt(segments: Sequence[TimedSegment]) -> str:
    """SubRip: numbered cues, ``HH:MM:SS,mmm`` times."""
    cues = [s.segment for s in segments if s.segment.text.strip()]
    return "".join(
        f"{n}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n{_cue_text(c.text)}\n\n"
        for n, c in enumerate(cues, 1)
    )


def vtt(segments: Sequence[TimedSegment]) -> str:
    """WebVTT: the header, then cues with ``HH:MM:SS.mmm`` times."""
    cues = [s.segment for s in segments if s.segment.text.strip()]
    return "WEBVTT\n\n" + "".join(
        f"{_clock(c.start, '.')} --> {_clock(c.end, '.')}\n{_cue_text(c.text)}\n\n" for c in cues
    )


def _text_response(text: str, content_type: str) -> Response:
    return Response(200, text.encode("utf-8"), content_type)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
