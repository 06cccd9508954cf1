"""The file API's request checks and response formats, without sockets or a model."""

from __future__ import annotations

import json

import pytest

from stt_server.engine import Segment, Word
from stt_server.multipart import Part
from stt_server.openai_schema import (
    LANGUAGE_NAMES,
    ApiError,
    FileRequest,
    FileTranscript,
    TimedSegment,
    error_response,
    parse_request,
    render,
    srt,
    vtt,
)


def field(name: str, value: str | bytes, filename: str | None = None) -> Part:
    data = value.encode() if isinstance(value, str) else value
    return Part(name, filename, None, memoryview(data))


AUDIO = field("file", b"RIFF....WAVE", "speech.wav")


def request(*parts: Part, multilingual: bool = False, task: str = "transcribe") -> FileRequest:
    return parse_request([AUDIO, *parts], task=task, multilingual=multilingual)


def test_defaults_of_a_minimal_request() -> None:
    checked = request(field("model", "whisper-1"))
    assert checked.response_format == "json"
    assert checked.language == "en"  # the English-only model's only language
    assert checked.prompt is None and checked.temperature is None
    assert checked.granularities == frozenset()
    assert bytes(checked.audio) == b"RIFF....WAVE" and checked.filename == "speech.wav"
    # A multilingual model detects the language unless it is given, or the server's default.
    assert request(multilingual=True).language is None
    assert request(field("language", "DE"), multilingual=True).language == "de"
    assert request(field("language", "auto"), multilingual=True).language is None
    assert request(field("language", "auto")).language == "en"


def test_the_servers_language_setting_is_the_default() -> None:
    def language(*parts: Part, default: str | None, multilingual: bool = True) -> str | None:
        checked = parse_request(
            [AUDIO, *parts], task="transcribe", multilingual=multilingual, default_language=default
        )
        return checked.language

    assert language(default="fr") == "fr"
    assert language(default=None) is None  # language = "": detect
    assert language(field("language", "de"), default="fr") == "de"
    assert language(field("language", "auto"), default="fr") is None
    assert language(default="en", multilingual=False) == "en"
    assert language(default=None, multilingual=False) == "en"


def test_granularities_arrive_as_the_openai_client_sends_them() -> None:
    checked = request(
        field("response_format", "verbose_json"),
        field("timestamp_granularities[]", "word"),
        field("timestamp_granularities[]", "segment"),
    )
    assert checked.granularities == {"word", "segment"}


def test_fields_of_newer_models_are_ignored() -> None:
    checked = request(field("include[]", "logprobs"), field("chunking_strategy", "auto"))
    assert checked.response_format == "json"


@pytest.mark.parametrize(
    ("parts", "param", "message"),
    [
        ([field("response_format", "xml")], "response_format", "must be one of"),
        ([field("timestamp_granularities[]", "word")], "timestamp_granularities", "verbose_json"),
        ([field("response_format", "verbose_json"), field("timestamp_granularities[]", "char")],
         "timestamp_granularities", "may contain"),
        ([field("language", "fr")], "language", "only transcribes English"),
        ([field("language", "klingon")], "language", "ISO-639-1"),
        ([field("temperature", "hot")], "temperature", "between 0 and 1"),
        ([field("temperature", "nan")], "temperature", "between 0 and 1"),
        ([field("temperature", "1.5")], "temperature", "between 0 and 1"),
        ([field("prompt", "x" * 1001)], "prompt", "longer than"),
        ([field("model", "a"), field("model", "b")], "model", "twice"),
        ([field("model", "whisper-1", "model.txt")], "model", "form field"),
        ([field("stream", "true")], "stream", "/v1/realtime"),
        ([AUDIO], "file", "one 'file'"),
    ],
)  # fmt: skip
def test_bad_requests_name_the_parameter(parts: list[Part], param: str, message: str) -> None:
    with pytest.raises(ApiError, match=message) as error:
        request(*parts)
    assert error.value.status == 400
    assert error.value.param == param


def test_a_request_without_a_file_or_with_bad_utf8() -> None:
    with pytest.raises(ApiError, match="no 'file' part"):
        parse_request([field("model", "whisper-1")], task="transcribe", multilingual=False)
    with pytest.raises(ApiError, match="UTF-8"):
        request(field("prompt", b"\xff"))


def test_language_names_are_faster_whispers_languages() -> None:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert set(LANGUAGE_NAMES) == set(_LANGUAGE_CODES)


def test_error_bodies_are_openais_shape() -> None:
    response = error_response(
        ApiError(429, "slow down", code="rate_limit_exceeded", retry_after=0.2)
    )
    assert response.status == 429
    assert dict(response.headers)["Retry-After"] == "1"  # whole seconds, never 0
    assert json.loads(response.body) == {
        "error": {
            "message": "slow down",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    unauthorized = error_response(ApiError(401, "token", code="invalid_api_key"))
    assert dict(unauthorized.headers)["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(error_response(ApiError(400, "x", param="file")).body)["error"] == {
        "message": "x",
        "type": "invalid_request_error",
        "param": "file",
        "code": None,
    }


def transcript(task: str = "transcribe") -> FileTranscript:
    words = (Word(0.0, 0.4, " Ask", 0.9), Word(0.4, 0.8, " not", 0.8))
    return FileTranscript(
        task=task,
        language="en",
        duration=3661.25,
        segments=(
            TimedSegment(0, 0, Segment(0.0, 1.5, "Ask not", -0.2, 0.01, 1.1, 0.0, words)),
            TimedSegment(1, 3000, Segment(3600.5, 3661.25, "what --> your\n\ncountry", -0.3)),
        ),
    )


def test_subtitles() -> None:
    segments = transcript().segments
    assert srt(segments) == (
        "1\n00:00:00,000 --> 00:00:01,500\nAsk not\n\n"
        "2\n01:00:00,500 --> 01:01:01,250\nwhat -> your country\n\n"
    )
    assert vtt(segments) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:01.500\nAsk not\n\n"
        "01:00:00.500 --> 01:01:01.250\nwhat -> your country\n\n"
    )
    assert srt(()) == "" and vtt(()) == "WEBVTT\n\n"


def test_each_response_format() -> None:
    def answer(fmt: str, *granularities: str) -> tuple[str, bytes]:
        parts = [field("response_format", fmt)]
        parts += [field("timestamp_granularities[]", g) for g in granularities]
        response = render(transcript(), request(*parts))
        assert response.status == 200
        return response.content_type, response.body

    text = "Ask not what --> your\n\ncountry"
    kind, body = answer("json")
    assert kind == "application/json"
    assert json.loads(body) == {"text": text, "usage": {"type": "duration", "seconds": 3662}}
    assert answer("text") == ("text/plain; charset=utf-8", (text + "\n").encode())
    assert answer("srt")[0].startswith("application/x-subrip")
    assert answer("vtt")[0].startswith("text/vtt")
    verbose = json.loads(answer("verbose_json")[1])
    assert {k: verbose[k] for k in ("task", "language", "duration", "text")} == {
        "task": "transcribe",
        "language": "english",
        "duration": 3661.25,
        "text": text,
    }
    assert verbose["segments"][0] == {
        "id": 0,
        "seek": 0,
        "start": 0.0,
        "end": 1.5,
        "text": "Ask not",
        "tokens": [],
        "temperature": 0.0,
        "avg_logprob": -0.2,
        "compression_ratio": 1.1,
        "no_speech_prob": 0.01,
    }
    assert "words" not in verbose
    # OpenAI's rules: words only when asked for; segments unless only words were asked for.
    words_only = json.loads(answer("verbose_json", "word")[1])
    assert "segments" not in words_only
    assert words_only["words"] == [
        {"word": "Ask", "start": 0.0, "end": 0.4},
        {"word": "not", "start": 0.4, "end": 0.8},
    ]
    both = json.loads(answer("verbose_json", "word", "segment")[1])
    assert len(both["segments"]) == 2 and len(both["words"]) == 2
