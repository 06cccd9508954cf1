"""The OpenAI Realtime transcription endpoint (``/v1/realtime?intent=transcription``) over real
sockets on 127.0.0.1, driven by the official ``openai`` client (in a worker thread: it is a
blocking client) and, for frames that client will not send, by a raw WebSocket."""

from __future__ import annotations

import base64
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
import trio
from openai import OpenAI
from openai.types.realtime import RealtimeErrorEvent
from trio_websocket import open_websocket_url

from stt_server.auth import new_token, tokens_file_line
from stt_server.config import Config
from stt_server.loadtest.client import stream_audio
from stt_server.loadtest.wer import normalize, word_error_rate
from stt_server.realtime_protocol import g711_to_pcm16
from stt_server.server import serve

from .conftest import DATA, receive_until_closed

#: Every I/O test gets an absolute deadline, so a hang fails instead of stalling the suite.
DEADLINE = 120

RATE = 24000
CATS_FIRST_SENTENCE = (
    "There was in that singular caravan a little boy with no father or mother, "
    "but only a tiny black kitten to cherish."
)
EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "openai_realtime.py"


def to_24k(samples: np.ndarray, seconds_of_silence: float = 0.0) -> np.ndarray:
    audio = soxr.resample(samples.astype(np.float32) / 32768, 16000, RATE)
    pcm = (np.clip(audio, -1, 32767 / 32768) * 32768).astype("<i2")
    return np.concatenate([pcm, np.zeros(int(seconds_of_silence * RATE), "<i2")])


def b64(pcm: np.ndarray | bytes) -> str:
    return base64.b64encode(pcm if isinstance(pcm, bytes) else pcm.tobytes()).decode()


def client_for(port: int, api_key: str = "unused") -> OpenAI:
    return OpenAI(api_key=api_key, websocket_base_url=f"ws://127.0.0.1:{port}/v1")


async def in_thread(fn, *args, **kwargs):
    """The blocking client, off the event loop, within the test's deadline."""
    with trio.fail_after(DEADLINE):
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), abandon_on_cancel=True
        )


def _send(connection, actions: list[tuple[Any, ...]], session: dict[str, Any] | None) -> None:
    if session is not None:
        connection.session.update(session=session)
    for action, *args in actions:
        if action == "append":
            pcm, speed = args
            step = RATE // 10
            for i in range(0, pcm.size, step):
                connection.input_audio_buffer.append(audio=b64(pcm[i : i + step]))
                if speed:
                    time.sleep(0.1 / speed)
        elif action == "commit":
            connection.input_audio_buffer.commit()
        elif action == "clear":
            connection.input_audio_buffer.clear()
    # Answered after everything sent before it: the end of what this session is owed.
    connection.session.update(session={"type": "transcription"})


def _receive(connection, updates: int, events: list[dict[str, Any]]) -> None:
    committed: set[str] = set()
    settled: set[str] = set()
    for event in connection:  # the client's own parsing of every server event
        events.append(event.to_dict())
        kind = event.type
        if kind == "session.updated":
            updates -= 1
        elif kind == "input_audio_buffer.committed":
            committed.add(event.item_id)
        elif kind.endswith((".completed", ".failed")):
            settled.add(event.item_id)
        if not updates and committed <= settled:
            return


async def run_client(
    port: int,
    actions: list[tuple[Any, ...]],
    *,
    api_key: str = "unused",
    session: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One session of the official client: ``session`` sent first, then ``actions``
    (``("append", pcm, speed)``, ``("commit",)``, ``("clear",)``), then a ``session.update``
    whose answer marks the end. Reads while it sends, as a live client must (the client's
    flow control would otherwise stop answering the server's pings). Returns every event
    received until every committed item is settled."""
    manager = client_for(port, api_key).realtime.connect(extra_query={"intent": "transcription"})
    connection = await in_thread(manager.enter)
    events: list[dict[str, Any]] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_thread, _receive, connection, 1 + (session is not None), events)
            await in_thread(_send, connection, actions, session)
    finally:
        await in_thread(connection.close)
    return events


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def items(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per item id, in order of commitment: its events' indices, deltas and transcript."""
    out: dict[str, dict[str, Any]] = {}
    for i, event in enumerate(events):
        item_id = event.get("item_id")
        if item_id is None:
            continue
        item = out.setdefault(item_id, {"deltas": [], "at": {}, "transcript": None})
        short = event["type"].rsplit(".", 1)[1]
        item["at"].setdefault(short, i)
        if short == "delta":
            item["deltas"].append((i, event["delta"]))
        elif short == "completed":
            item["transcript"] = event["transcript"]
    return out


@pytest.mark.slow
async def test_the_openai_client_transcribes_with_the_same_words_as_the_native_protocol(
    running_server, clip, references
) -> None:
    """Three sessions at once on the same 24 kHz audio: native, Realtime with the server's
    turn detection, and Realtime with a 2 s silence_duration_ms of its own. The audio is
    jfk.wav (four short utterances) and the first sentence of cats.wav (one of 7 s, long
    enough for words to become stable while it is spoken)."""
    cats = clip("cats.wav")[: int(7.5 * 16000)]  # ends in the pause after "cherish"
    audio = to_24k(np.concatenate([clip("jfk.wav"), cats]), seconds_of_silence=2.0)
    reference = references["jfk.wav"] + " " + CATS_FIRST_SENTENCE
    port = running_server.server.port
    results: dict[str, Any] = {}

    async def native() -> None:
        results["native"] = await stream_audio(running_server.url, audio, sample_rate=RATE)

    async def realtime(name: str, session: dict[str, Any] | None) -> None:
        actions = [("append", audio, 1.0), ("commit",)]
        results[name] = await run_client(port, actions, session=session)

    slow = {
        "type": "transcription",
        "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 2000}}},
    }
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(native)
            nursery.start_soon(realtime, "realtime", None)
            nursery.start_soon(realtime, "patient", slow)

    events = results["realtime"]
    created = events[0]
    assert created["type"] == "session.created"
    assert created["session"]["type"] == "transcription"
    assert created["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": RATE}
    assert not of(events, "error")

    spoken = {k: v for k, v in items(events).items() if "speech_started" in v["at"]}
    assert len(spoken) >= 4  # the pauses end items
    contradicted = []
    for item_id, item in spoken.items():
        at = item["at"]
        # The life of an item, in order; every one of them completed.
        assert at["speech_started"] < at["speech_stopped"] < at["committed"] < at["completed"]
        # The deltas add up to exactly the completed transcript, unless the final heard words
        # the partials had streamed differently (then the final stands).
        streamed = "".join(d for _, d in item["deltas"])
        if streamed != item["transcript"]:
            contradicted.append(item_id)
            assert not normalize(item["transcript"]).startswith(normalize(streamed)), item
    # That takes partials three times in a row agreeing on a word: rare.
    assert len(contradicted) <= len(spoken) // 4, contradicted
    # Live text: words arrived while the speaker was still speaking.
    assert any(
        i < item["at"]["speech_stopped"] for item in spoken.values() for i, _ in item["deltas"]
    )
    committed = of(events, "input_audio_buffer.committed")
    assert [c["previous_item_id"] for c in committed] == [None] + [
        c["item_id"] for c in committed[:-1]
    ]
    # The trailing silence after the last item was committed by hand: an item without text.
    assert items(events)[committed[-1]["item_id"]]["transcript"] == ""

    said = " ".join(item["transcript"] for item in spoken.values())
    assert normalize(said) == normalize(results["native"].text)
    assert word_error_rate(reference, said) <= 0.15

    # Its own turn detection waited through the pauses that end the default session's items.
    patient = [k for k, v in items(results["patient"]).items() if "speech_started" in v["at"]]
    assert 1 <= len(patient) < len(spoken)
    updated = of(results["patient"], "session.updated")[0]
    assert updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 2000


async def test_manual_commit_and_clear_through_the_openai_client(running_server, clip) -> None:
    port = running_server.server.port
    cats = to_24k(clip("cats.wav")[: 16000 * 3])
    suit = to_24k(clip("ldc93s1.wav"))
    session = {
        "type": "transcription",
        "audio": {
            "input": {
                "transcription": {"model": "whisper-1", "language": "en", "prompt": "greasy"},
                "turn_detection": None,
            }
        },
    }
    actions = [("append", cats, 0), ("clear",), ("append", suit, 0), ("commit",)]
    events = await run_client(port, actions, session=session)

    updated = of(events, "session.updated")[0]["session"]["audio"]["input"]
    assert updated["turn_detection"] is None
    assert updated["transcription"]["prompt"] == "greasy"
    assert updated["transcription"]["model"] == "tiny.en"  # the model this server has
    assert len(of(events, "input_audio_buffer.cleared")) == 1
    # No server VAD: no speech events, one item for the one commit.
    assert not of(events, "input_audio_buffer.speech_started")
    assert not of(events, "input_audio_buffer.speech_stopped")
    (committed,) = of(events, "input_audio_buffer.committed")
    (completed,) = of(events, "conversation.item.input_audio_transcription.completed")
    assert completed["item_id"] == committed["item_id"]
    assert "suit" in completed["transcript"].lower()
    # What was cleared was never transcribed.
    assert "cat" not in completed["transcript"].lower()
    deltas = of(events, "conversation.item.input_audio_transcription.delta")
    assert (
        "".join(d["delta"] for d in deltas if d["item_id"] == completed["item_id"])
        == (completed["transcript"])
    )


def realtime_url(running_server) -> str:
    return f"ws://127.0.0.1:{running_server.server.port}/v1/realtime?intent=transcription"


async def test_bad_events_get_openai_errors_without_ending_the_session_until_five_in_a_row(
    running_server,
) -> None:
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(realtime_url(running_server)) as ws:
            assert json.loads(await ws.get_message())["type"] == "session.created"
            for bad in (
                "{",
                '{"type":"response.create","event_id":"evt_1"}',
                '{"type":"input_audio_buffer.append","audio":"%%%","event_id":"evt_2"}',
                '{"type":"input_audio_buffer.commit","event_id":"evt_3"}',  # nothing to commit
            ):
                await ws.send_message(bad)
            errors = [json.loads(await ws.get_message()) for _ in range(4)]
            # A good event resets the count, and is answered: the session goes on.
            await ws.send_message('{"type":"session.update","session":{"type":"transcription"}}')
            assert json.loads(await ws.get_message())["type"] == "session.updated"
            for _ in range(5):
                await ws.send_message('{"type":"session.update","session":{"type":"realtime"}}')
            messages, code = await receive_until_closed(ws)
    for error in errors + messages:
        RealtimeErrorEvent.model_validate(error)  # the official client's model of an error
    codes = ["invalid_message", "invalid_message", "invalid_audio", "invalid_message"]
    assert [e["error"]["code"] for e in errors] == codes
    assert [e["error"]["event_id"] for e in errors] == [None, "evt_1", "evt_2", "evt_3"]
    assert all(e["error"]["type"] == "invalid_request_error" for e in errors)
    assert "empty" in errors[3]["error"]["message"]
    assert [m["error"]["code"] for m in messages] == ["invalid_message"] * 5 + ["too_many_errors"]
    assert code == 1008


async def test_tokens_as_bearer_and_refusals_in_openais_shape(
    nursery, speech_model, tmp_path
) -> None:
    token = new_token()
    tokens = tmp_path / "tokens"
    tokens.write_text(tokens_file_line(token, "team-openai") + "\n")
    config = Config(
        host="127.0.0.1",
        port=0,
        control_socket="",
        tokens_file=str(tokens),
        max_connections=1,
    )
    server = await nursery.start(functools.partial(serve, config, model=speech_model))
    port = server.port
    url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"

    def connect(api_key: str) -> str:
        manager = client_for(port, api_key).realtime.connect(
            extra_query={"intent": "transcription"}
        )
        with manager as connection:
            return connection.recv().type

    # The client sends its key as "Authorization: Bearer": the server's token goes there.
    assert await in_thread(connect, token) == "session.created"
    with pytest.raises(Exception, match="401"):
        await in_thread(connect, "wrong")
    with trio.fail_after(DEADLINE):
        # A browser (it sends an Origin) without a token learns why over the socket.
        async with open_websocket_url(url, extra_headers=[("Origin", "http://x")]) as ws:
            (refusal,), code = await receive_until_closed(ws)
        RealtimeErrorEvent.model_validate(refusal)
        assert refusal["error"]["code"] == "unauthorized" and code == 4401
        # max_connections 1: while one session is open, the next is told when to come back.
        bearer = [("Authorization", f"Bearer {token}")]
        async with open_websocket_url(url, extra_headers=bearer) as first:
            assert json.loads(await first.get_message())["type"] == "session.created"
            async with open_websocket_url(url, extra_headers=bearer) as second:
                (busy,), code = await receive_until_closed(second)
    RealtimeErrorEvent.model_validate(busy)
    assert busy["error"]["code"] == "server_busy" and code == 1013
    assert busy["error"]["retry_after"] > 0


async def test_the_readme_example_runs(running_server) -> None:
    url = f"ws://127.0.0.1:{running_server.server.port}/v1"
    with trio.fail_after(DEADLINE):
        done = await trio.run_process(
            [sys.executable, str(EXAMPLE), str(DATA / "ldc93s1.wav"), url],
            capture_stdout=True,
            capture_stderr=True,
        )
    out = done.stdout.decode()
    final = out.rsplit("final: ", 1)[1].strip()
    assert "suit" in final.lower()
    # The live line above it is the deltas, which add up to the final.
    assert out.split("\n")[0] == final


def test_the_readme_shows_the_example_as_it_is_tested() -> None:
    readme = (EXAMPLE.parent.parent.parent / "README.md").read_text()
    if "docs/examples/openai_realtime.py" not in readme:
        pytest.skip("the OpenAI Realtime section is not in README.md yet")
    code = EXAMPLE.read_text().split('"""', 2)[2].strip()
    assert code in readme


def to_ulaw(samples: np.ndarray) -> bytes:
    """16 kHz int16 as G.711 μ-law at 8 kHz: each sample the code whose value is nearest."""
    audio = soxr.resample(samples.astype(np.float32) / 32768, 16000, 8000)
    pcm = np.clip(audio * 32768, -32768, 32767)
    table = np.frombuffer(g711_to_pcm16(bytes(range(256)), "pcmu"), "<i2").astype(np.float32)
    order = np.argsort(table)
    ranks = np.clip(np.searchsorted(table[order], pcm), 1, 255)
    nearer_below = pcm - table[order][ranks - 1] < table[order][ranks] - pcm
    return order[np.where(nearer_below, ranks - 1, ranks)].astype(np.uint8).tobytes()


async def test_the_older_beta_shape_with_g711_and_manual_commits(running_server, clip) -> None:
    """A client of the Realtime API's beta: the ``OpenAI-Beta`` header, the older
    ``transcription_session.update``, μ-law audio at 8 kHz."""
    ulaw = to_ulaw(clip("ldc93s1.wav"))
    beta = [("OpenAI-Beta", "realtime=v1")]
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(realtime_url(running_server), extra_headers=beta) as ws:
            created = json.loads(await ws.get_message())
            update = {
                "type": "transcription_session.update",
                "session": {
                    "input_audio_format": "g711_ulaw",
                    "input_audio_transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                    "turn_detection": None,
                },
            }
            await ws.send_message(json.dumps(update))
            updated = json.loads(await ws.get_message())
            for i in range(0, len(ulaw), 800):  # 100 ms
                event = {"type": "input_audio_buffer.append", "audio": b64(ulaw[i : i + 800])}
                await ws.send_message(json.dumps(event))
            await ws.send_message('{"type":"input_audio_buffer.commit"}')
            while (event := json.loads(await ws.get_message()))["type"] != (
                "conversation.item.input_audio_transcription.completed"
            ):
                pass
    assert created["type"] == "transcription_session.created"
    assert created["session"]["input_audio_format"] == "pcm16"
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["input_audio_format"] == "g711_ulaw"
    assert updated["session"]["turn_detection"] is None
    assert "suit" in event["transcript"].lower()
