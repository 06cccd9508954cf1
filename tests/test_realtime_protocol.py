"""The OpenAI Realtime dialect, sans-IO: events in, JSON out, checked against the official
client's own models (``openai.types.realtime``), without a socket or an event loop."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.realtime import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemInputAudioTranscriptionDeltaEvent,
    ConversationItemInputAudioTranscriptionFailedEvent,
    InputAudioBufferClearedEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    RealtimeErrorEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
)

from stt_server.config import Config
from stt_server.dialect import Clear, NativeDialect, SessionUpdate, TurnDetection
from stt_server.errors import ErrorCode, InvalidAudio, InvalidMessage
from stt_server.http import BadRequest, RequestHead
from stt_server.loadtest.wer import normalize
from stt_server.protocol import AudioChunk, ConfigUpdate, Flush
from stt_server.realtime_protocol import (
    RealtimeDialect,
    _Item,
    dialect_for,
    g711_to_pcm16,
    settle,
    stable_growth,
)

DEFAULTS = TurnDetection(enabled=True, threshold=0.5, silence=0.6, prefix_padding=0.3)


def dialect(**kwargs) -> RealtimeDialect:
    d = RealtimeDialect(DEFAULTS, **kwargs)
    d.greeting("abc123", "tiny.en", "en")
    return d


def send(d: RealtimeDialect, **event) -> object:
    return d.parse(json.dumps(event))


def one(messages: list[str]) -> dict:
    (message,) = messages
    return json.loads(message)


# --- client events ------------------------------------------------------------------------------


def test_append_decodes_base64_pcm16_and_commit_and_clear_map_to_session_events() -> None:
    d = dialect()
    pcm = b"\x01\x00\xff\x7f" * 10
    event = send(d, type="input_audio_buffer.append", audio=base64.b64encode(pcm).decode())
    assert event == AudioChunk(pcm)
    assert send(d, type="input_audio_buffer.commit") == Flush()
    assert send(d, type="input_audio_buffer.clear") == Clear()


@pytest.mark.parametrize(
    ("event", "error", "words"),
    [
        ({"type": "input_audio_buffer.append", "audio": "%%%"}, InvalidAudio, "base64"),
        ({"type": "input_audio_buffer.append", "audio": "AAAA"}, InvalidAudio, "even"),
        ({"type": "input_audio_buffer.append"}, InvalidAudio, "audio"),
        ({"type": "response.create"}, InvalidMessage, "not part of a transcription session"),
        ({"type": "nonsense"}, InvalidMessage, "unknown event type"),
        # Unhashable values where a name is looked up (found by the socket fuzzer).
        ({"type": []}, InvalidMessage, "unknown event type"),
        (
            {"type": "transcription_session.update", "session": {"input_audio_format": {}}},
            InvalidAudio,
            "input_audio_format",
        ),
        (
            {"type": "session.update", "session": {"audio": {"input": {"format": {"type": []}}}}},
            InvalidAudio,
            "format.type",
        ),
        ({"audio": ""}, InvalidMessage, 'no "type"'),
        ({"type": "session.update", "session": {"type": "realtime"}}, InvalidMessage, "only"),
        ({"type": "session.update", "session": 3}, InvalidMessage, "object"),
        (
            {
                "type": "session.update",
                "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 96000}}}},
            },
            InvalidAudio,
            "96000",
        ),
        (
            {
                "type": "session.update",
                "session": {"audio": {"input": {"turn_detection": {"silence_duration_ms": 5}}}},
            },
            InvalidMessage,
            "silence_duration_ms",
        ),
        (
            {
                "type": "session.update",
                "session": {"audio": {"input": {"turn_detection": {"threshold": 2}}}},
            },
            InvalidMessage,
            "threshold",
        ),
        (
            {"type": "transcription_session.update", "session": {"input_audio_format": "mp3"}},
            InvalidAudio,
            "input_audio_format",
        ),
    ],
)
def test_bad_events_raise_what_the_client_is_told(event, error, words) -> None:
    with pytest.raises(error, match=words):
        send(dialect(), **event)


def test_binary_frames_and_non_json_are_refused() -> None:
    with pytest.raises(InvalidMessage, match="binary"):
        dialect().parse(b"\x00\x00")
    with pytest.raises(InvalidMessage, match="JSON"):
        dialect().parse("{")


def test_session_update_in_the_current_shape() -> None:
    d = dialect()
    update = send(
        d,
        type="session.update",
        session={
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": {"model": "whisper-1", "language": "EN", "prompt": " cats "},
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": 0.7,
                        "silence_duration_ms": 800,
                        "prefix_padding_ms": 200,
                    },
                    "noise_reduction": None,
                }
            },
            "include": ["item.input_audio_transcription.logprobs"],
        },
    )
    assert update == SessionUpdate(
        ConfigUpdate(language="en", sample_rate=24000, prompt="cats"),
        TurnDetection(enabled=True, threshold=0.7, silence=0.8, prefix_padding=0.2),
    )
    reply = one(d.updated())
    event = SessionUpdatedEvent.model_validate(reply)  # the official client's own model
    session = reply["session"]
    assert event.type == "session.updated" and session["type"] == "transcription"
    assert session["audio"]["input"]["transcription"] == {
        "model": "tiny.en",
        "language": "en",
        "prompt": "cats",
    }
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "server_vad",
        "threshold": 0.7,
        "prefix_padding_ms": 200,
        "silence_duration_ms": 800,
    }


def test_fields_left_out_are_unchanged_and_null_means_off_or_detect() -> None:
    d = dialect()
    update = send(d, type="session.update", session={"type": "transcription"})
    assert update == SessionUpdate()  # nothing to change
    d.updated()
    update = send(
        d,
        type="session.update",
        session={
            "type": "transcription",
            "audio": {"input": {"turn_detection": None, "transcription": {"language": None}}},
        },
    )
    assert update.turn_detection == TurnDetection(
        enabled=False, threshold=0.5, silence=0.6, prefix_padding=0.3
    )
    assert update.config.language == "auto"  # the native protocol's word for "detect it"
    session = one(d.updated())["session"]
    assert session["audio"]["input"]["turn_detection"] is None
    assert session["audio"]["input"]["transcription"]["language"] is None
    # server_vad without values: the server's defaults, whatever was set before.
    update = send(
        d,
        type="session.update",
        session={"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
    )
    assert update.turn_detection == DEFAULTS


def test_an_update_the_session_refused_is_never_reported() -> None:
    d = dialect()
    send(
        d,
        type="session.update",
        session={"audio": {"input": {"transcription": {"language": "de"}}}},
    )
    # The session's language check failed: it never calls updated(); the next update
    # reports the settings that are really in force.
    send(d, type="session.update", session={"type": "transcription"})
    session = one(d.updated())["session"]
    assert session["audio"]["input"]["transcription"]["language"] == "en"


def test_the_older_transcription_session_shape_with_g711() -> None:
    d = dialect(legacy=True)
    update = send(
        d,
        type="transcription_session.update",
        session={
            "input_audio_format": "g711_ulaw",
            "input_audio_transcription": {"model": "gpt-4o-transcribe", "language": "en"},
            "turn_detection": None,
        },
    )
    assert update.config.sample_rate == 8000 and update.turn_detection.enabled is False
    reply = one(d.updated())
    assert reply["type"] == "transcription_session.updated"
    assert reply["session"]["input_audio_format"] == "g711_ulaw"
    assert reply["session"]["turn_detection"] is None
    # From now on appended audio is μ-law, one byte a sample.
    chunk = send(d, type="input_audio_buffer.append", audio=base64.b64encode(b"\xff\x80").decode())
    assert chunk == AudioChunk((0).to_bytes(2, "little") + (32124).to_bytes(2, "little"))


def as_ints(pcm: bytes) -> list[int]:
    return [int.from_bytes(pcm[i : i + 2], "little", signed=True) for i in range(0, len(pcm), 2)]


def test_g711_tables_are_itu_g711() -> None:
    # Values of the standard (and of Python's retired audioop module).
    ulaw = g711_to_pcm16(bytes([0xFF, 0x00, 0x80, 0x7F, 0x0F]), "pcmu")
    alaw = g711_to_pcm16(bytes([0xD5, 0x55, 0x2A, 0xAA, 0x00, 0x80]), "pcma")
    assert as_ints(ulaw) == [0, -32124, 32124, 0, -16764]
    assert as_ints(alaw) == [8, -8, -32256, 32256, -5504, 5504]


def test_the_greeting_is_session_created_or_the_older_transcription_session_created() -> None:
    created = json.loads(RealtimeDialect(DEFAULTS).greeting("s1", "tiny.en", "en")[0])
    SessionCreatedEvent.model_validate(created)
    assert created["session"]["id"] == "sess_s1"
    assert created["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert created["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 600
    legacy = json.loads(RealtimeDialect(DEFAULTS, legacy=True).greeting("s1", "tiny.en", None)[0])
    assert legacy["type"] == "transcription_session.created"
    assert legacy["session"]["input_audio_format"] == "pcm16"


# --- server events ------------------------------------------------------------------------------


def test_an_utterance_is_an_item_from_speech_started_to_completed() -> None:
    d = dialect()
    started = one(d.speech_started(1, 0.42))
    InputAudioBufferSpeechStartedEvent.model_validate(started)
    item = started["item_id"]
    assert started["audio_start_ms"] == 420
    stopped, committed = (json.loads(m) for m in d.utterance_ended(1, 2.5, "silence"))
    InputAudioBufferSpeechStoppedEvent.model_validate(stopped)
    InputAudioBufferCommittedEvent.model_validate(committed)
    assert stopped["audio_end_ms"] == 2500 and stopped["item_id"] == item
    assert committed["item_id"] == item and committed["previous_item_id"] is None
    assert d.utterance_ended(1, 2.5, "silence") == []  # handed over twice: told once
    delta, completed = (json.loads(m) for m in d.final("Hello there.", 1, 0.42, 2.5))
    assert delta["delta"] == "Hello there."  # nothing streamed before: all of it
    ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(completed)
    assert completed["item_id"] == item and completed["transcript"] == "Hello there."
    assert completed["usage"] == {"type": "duration", "seconds": 2.08}
    d.speech_started(2, 3.0)
    assert json.loads(d.utterance_ended(2, 4.0, "flush")[0])["previous_item_id"] == item


def test_manual_commits_send_no_vad_events_and_an_empty_commit_is_an_error() -> None:
    d = dialect()
    send(d, type="session.update", session={"audio": {"input": {"turn_detection": None}}})
    d.updated()
    assert d.speech_started(1, 0.0) == []
    first = one(d.utterance_ended(1, 3.0, "flush"))
    assert first["type"] == "input_audio_buffer.committed"
    with pytest.raises(InvalidMessage, match="empty"):
        d.commit_empty()  # no audio since that commit
    send(d, type="input_audio_buffer.append", audio=base64.b64encode(b"\x00" * 480).decode())
    # Audio without speech (no utterance opened): an item all the same, with empty text.
    assert d.commit_empty() is True
    second = one(d.utterance_ended(2, 3.1, "flush"))
    assert second["previous_item_id"] == first["item_id"]
    assert NativeDialect().commit_empty() is False


def test_clear_forgets_the_open_item() -> None:
    d = dialect()
    d.speech_started(1, 0.0)
    d.partial("one two three", 1)
    cleared = one(d.cleared(1))
    InputAudioBufferClearedEvent.model_validate(cleared)
    assert d.partial("one two three four", 1) is None  # a late partial of a cleared item


def test_errors_have_openais_shape_and_quote_the_client_event_id() -> None:
    d = dialect()
    with pytest.raises(InvalidMessage) as caught:
        d.parse('{"type":"nope","event_id":"evt_42"}')
    reply = json.loads(d.error(caught.value.error_code, caught.value.message, reply=True))
    RealtimeErrorEvent.model_validate(reply)
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["code"] == "invalid_message"
    assert reply["error"]["event_id"] == "evt_42"
    busy = json.loads(d.error(ErrorCode.SERVER_BUSY, "full", retry_after=5.0))
    assert busy["error"] == {
        "type": "server_error",
        "code": "server_busy",
        "message": "full",
        "param": None,
        "event_id": None,
        "retry_after": 5.0,
    }
    failed = one(d.failed(3, "utterance 3 could not be transcribed: timed out"))
    ConversationItemInputAudioTranscriptionFailedEvent.model_validate(failed)
    assert failed["error"]["code"] == "transcription_failed"


# --- deltas -------------------------------------------------------------------------------------


def deltas(messages: list[str | None]) -> str:
    out = ""
    for m in messages:
        if m is not None:
            event = json.loads(m)
            if event["type"].endswith(".delta"):
                ConversationItemInputAudioTranscriptionDeltaEvent.model_validate(event)
                out += event["delta"]
    return out


def test_deltas_stream_words_three_partials_agree_on_and_never_the_last_one() -> None:
    d = dialect()
    d.speech_started(1, 0.0)
    assert d.partial("Ask", 1) is None  # nothing to agree with yet
    assert d.partial("Ask not", 1) is None
    partials = ("Ask not what", "Ask not what your", "Ask not what your country")
    got = [d.partial(t, 1) for t in partials]
    assert [json.loads(m)["delta"] for m in got] == ["Ask", " not", " what"]
    # A partial that changes a streamed word adds nothing, and breaks the agreement.
    assert d.partial("Ask knot what your country", 1) is None
    assert d.partial("Ask not what your country can", 1) is None
    assert d.partial("Ask not what your country can do", 1) is None
    assert json.loads(d.partial("Ask not what your country can do for", 1))["delta"] == (
        " your country can"
    )


def test_the_final_completes_what_was_streamed() -> None:
    d = dialect()
    d.speech_started(1, 0.0)
    partials = ("And so my", "And so my fellow", "And so my fellow Am")
    streamed = deltas([d.partial(t, 1) for t in partials])
    assert streamed == "And so my"
    out = d.final("And so, my fellow Americans, ask not.", 1, 0.0, 3.0)
    completed = json.loads(out[-1])
    # The comma the final adds in the streamed stretch cannot be sent any more; the words after
    # it are the final's own.
    assert completed["transcript"] == "And so my fellow Americans, ask not."
    assert streamed + deltas(out) == completed["transcript"]


words = st.sampled_from(["ask", "Ask", "not", "not,", "what", "your", "country", "can", "do", "."])
texts = st.lists(words, max_size=8).map(" ".join)


def compared(text: str) -> list[str]:
    return [w for w in normalize(text).split() if w]


@settings(max_examples=500, deadline=None)
@given(partials=st.lists(texts, max_size=10), final=texts)
def test_the_completed_transcript_has_the_finals_words_and_the_deltas_add_up_to_it(
    partials, final
) -> None:
    d = dialect()
    d.speech_started(1, 0.0)
    streamed = deltas([d.partial(p, 1) for p in partials])
    out = d.final(final, 1, 0.0, 1.0)
    transcript = json.loads(out[-1])["transcript"]
    assert compared(transcript) == compared(final)  # the final's words, always
    if not streamed:
        assert transcript == final  # nothing shown yet: the final as it is
    contradicted = compared(final)[: len(compared(streamed))] != compared(streamed)
    if contradicted and not final.startswith(streamed):
        assert transcript == final
    else:
        assert streamed + deltas(out) == transcript


def test_settle_keeps_the_streamed_spelling_unless_the_final_hears_other_words() -> None:
    item = _Item("i", streamed=["the", "cat", "sat"], text="the cat sat")
    assert settle(item, "the cat sat on the mat") == ("the cat sat on the mat", " on the mat")
    assert settle(item, "The cat sat, on the mat.") == ("the cat sat on the mat.", " on the mat.")
    # Another word: the final stands, and the last delta brings what follows "sat".
    assert settle(item, "The bat sat on the mat.") == ("The bat sat on the mat.", " on the mat.")
    assert settle(item, "") == ("", "")
    # Nothing in common: the final is sent whole after what was streamed.
    guess = _Item("k", streamed=["are"], text="are")
    assert settle(guess, "The natural frequencies.") == (
        "The natural frequencies.",
        " The natural frequencies.",
    )
    fresh = _Item("j")
    assert [stable_growth(fresh, t) for t in ("one", "one two", "one two three")] == ["", "", "one"]
    assert stable_growth(fresh, "one two three four") == " two"  # "four" may still change


# --- choosing a dialect -------------------------------------------------------------------------


def head(target: str, **headers: str) -> RequestHead:
    path, _, query = target.partition("?")
    return RequestHead("GET", target, {"upgrade": "websocket", **headers}, path, query)


def test_the_path_chooses_the_dialect() -> None:
    config = Config(min_silence=0.8)
    assert isinstance(dialect_for(head("/"), config), NativeDialect)
    assert isinstance(dialect_for(head("/stt/"), config), NativeDialect)
    realtime = dialect_for(head("/v1/realtime?intent=transcription"), config)
    assert isinstance(realtime, RealtimeDialect)
    created = json.loads(realtime.greeting("s", "m", "en")[0])
    assert created["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 800
    assert isinstance(dialect_for(head("/stt/v1/realtime"), config), RealtimeDialect)
    legacy = dialect_for(head("/v1/realtime", **{"openai-beta": "realtime=v1"}), config)
    assert json.loads(legacy.greeting("s", "m", "en")[0])["type"] == (
        "transcription_session.created"
    )
    with pytest.raises(BadRequest, match="intent=transcription"):
        dialect_for(head("/v1/realtime?intent=conversation"), config)
