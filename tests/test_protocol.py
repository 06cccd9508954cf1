"""The wire protocol without sockets: every row of ARCHITECTURE.md's error table for parsing."""

import base64
import json

import pytest

from stt_server.errors import ErrorCode
from stt_server.protocol import (
    AudioChunk,
    ConfigUpdate,
    End,
    Flush,
    completed_message,
    error_message,
    parse_client_message,
    realtime_message,
    session_message,
)


def audio(pcm: bytes, **extra) -> str:
    return json.dumps({"type": "audio", "data": base64.b64encode(pcm).decode(), **extra})


def test_seed_audio_format_is_decoded() -> None:
    event = parse_client_message(audio(b"\x01\x00\xff\x7f", sample_rate=16000))
    assert event == AudioChunk(b"\x01\x00\xff\x7f", 16000)


def test_binary_frames_are_raw_pcm() -> None:
    assert parse_client_message(b"\x00\x01" * 4) == AudioChunk(b"\x00\x01" * 4, None)


def test_control_messages() -> None:
    assert parse_client_message('{"type":"flush"}') == Flush()
    assert parse_client_message('{"type":"end"}') == End()
    assert parse_client_message(
        '{"type":"config","language":"EN","sample_rate":48000}'
    ) == ConfigUpdate(language="en", sample_rate=48000)
    assert parse_client_message('{"type":"config"}') == ConfigUpdate()


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert parse_client_message('{"type":"flush","future":1}') == Flush()


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", ErrorCode.INVALID_MESSAGE),
        ("[1,2]", ErrorCode.INVALID_MESSAGE),
        ('"audio"', ErrorCode.INVALID_MESSAGE),
        ("{}", ErrorCode.INVALID_MESSAGE),
        ('{"type":"dance"}', ErrorCode.INVALID_MESSAGE),
        ('{"type":7}', ErrorCode.INVALID_MESSAGE),
        ('{"type":"audio"}', ErrorCode.INVALID_AUDIO),
        ('{"type":"audio","data":5}', ErrorCode.INVALID_AUDIO),
        ('{"type":"audio","data":"***"}', ErrorCode.INVALID_AUDIO),
        (audio(b"\x01\x02\x03"), ErrorCode.INVALID_AUDIO),
        (audio(b"\x00\x00", sample_rate=4000), ErrorCode.INVALID_AUDIO),
        (audio(b"\x00\x00", sample_rate=96000), ErrorCode.INVALID_AUDIO),
        (audio(b"\x00\x00", sample_rate="16000"), ErrorCode.INVALID_AUDIO),
        (audio(b"\x00\x00", sample_rate=True), ErrorCode.INVALID_AUDIO),
        (audio(b"\x00\x00", sample_rate=16000.5), ErrorCode.INVALID_AUDIO),
        ('{"type":"config","sample_rate":1}', ErrorCode.INVALID_AUDIO),
        ('{"type":"config","language":42}', ErrorCode.INVALID_MESSAGE),
        ('{"type":"config","language":"a-very-long-language"}', ErrorCode.INVALID_MESSAGE),
        (b"\x00\x01\x02", ErrorCode.INVALID_AUDIO),
        ("[" * 100000, ErrorCode.INVALID_MESSAGE),
    ],
)
def test_bad_messages_raise_the_documented_code(message, code) -> None:
    with pytest.raises(Exception) as info:
        parse_client_message(message)
    assert info.value.error_code is code
    assert info.value.message  # a human-readable reason, always


def test_server_messages_match_the_contract() -> None:
    assert json.loads(session_message("abc", 16000, "tiny.en", "en")) == {
        "type": "session",
        "session_id": "abc",
        "sample_rate": 16000,
        "model": "tiny.en",
        "language": "en",
    }
    # None: the model detects the language, which the client learns per completed.
    assert json.loads(session_message("abc", 16000, "base"))["language"] == "auto"
    assert json.loads(realtime_message("hel", 3)) == {
        "type": "realtime",
        "text": "hel",
        "utterance_id": 3,
    }
    assert json.loads(completed_message("hello", 3, 12.4812, 15.0249)) == {
        "type": "completed",
        "text": "hello",
        "utterance_id": 3,
        "start": 12.48,
        "end": 15.02,
    }
    detected = completed_message("bonjour", 4, 1.0, 2.0, language="fr", language_probability=0.9)
    assert json.loads(detected)["language"] == "fr"
    assert json.loads(detected)["language_probability"] == 0.9
    assert json.loads(error_message("server_busy", "full", retry_after=5.0)) == {
        "type": "error",
        "code": "server_busy",
        "message": "full",
        "retry_after": 5.0,
    }
    assert "retry_after" not in json.loads(error_message("invalid_audio", "odd"))
