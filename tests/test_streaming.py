"""The server over real sockets, with the real model on real speech, streamed at real time.

Several clients stream at once in most tests: that is the product, and it keeps the suite short.
"""

from __future__ import annotations

import functools
import itertools
import json

import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from stt_server.loadtest.client import StreamResult, read_wav, stream_audio
from stt_server.loadtest.wer import normalize, word_error_rate

from .conftest import SYNTHETIC, receive_until_closed, wait_until

#: Every I/O test gets an absolute deadline, so a hang fails instead of stalling the suite.
DEADLINE = 120


@pytest.fixture(scope="session")
def offline_text(speech_model):
    """Each clip transcribed whole by plain faster-whisper: the quality bar for streaming."""

    @functools.cache
    def transcribe(key: str, samples_bytes: bytes) -> str:
        audio = np.frombuffer(samples_bytes, dtype="<i2").astype(np.float32) / 32768
        segments, _ = speech_model._model.transcribe(audio, language="en")
        return " ".join(s.text for s in segments)

    return lambda key, samples: transcribe(key, samples.tobytes())


def check_message_rules(result: StreamResult, duration: float) -> None:
    """What every well-behaved session must look like on the wire."""
    kinds = [m["type"] for _, m in result.messages]
    assert kinds[0] == "session"
    finals = result.finals
    ids = [m["utterance_id"] for m in finals]
    assert ids == sorted(set(ids)), "exactly one completed per utterance, in order"
    for m in finals:
        assert 0 <= m["start"] < m["end"] <= duration + 0.05
    for a, b in itertools.pairwise(finals):
        assert a["end"] <= b["start"]
    completed_at = {}
    for i, (_, m) in enumerate(result.messages):
        if m["type"] == "completed":
            completed_at[m["utterance_id"]] = i
        if m["type"] == "realtime":
            # Never a partial of an utterance whose final was already sent.
            assert m["utterance_id"] not in completed_at


async def stream_clip(url: str, samples: np.ndarray, **kwargs) -> StreamResult:
    return await stream_audio(url, samples, **kwargs)


@pytest.mark.slow
async def test_realtime_streams_match_offline_quality(
    running_server, clip, references, synthetic_dir, offline_text
) -> None:
    station = read_wav(synthetic_dir / "station.16000.wav")
    jobs = {
        "cats.wav": (clip("cats.wav"), references["cats.wav"]),
        "ldc93s1.wav": (clip("ldc93s1.wav"), references["ldc93s1.wav"]),
        "station": (station, SYNTHETIC["station"]),
    }
    results: dict[str, StreamResult] = {}

    async def run(name: str, samples: np.ndarray) -> None:
        results[name] = await stream_clip(running_server.url, samples, trailing_silence=1.0)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for name, (samples, _) in jobs.items():
                nursery.start_soon(run, name, samples)

    for name, (samples, reference) in jobs.items():
        result = results[name]
        streamed = word_error_rate(reference, result.text)
        offline = word_error_rate(reference, offline_text(name, samples))
        assert streamed <= offline + 0.03, (name, streamed, offline, result.text)
        assert result.close_code == 1000
        check_message_rules(result, samples.size / 16000 + 1.0)
        # Live text while speaking: partials precede the first final.
        first_final = next(
            i for i, (_, m) in enumerate(result.messages) if m["type"] == "completed"
        )
        assert any(m["type"] == "realtime" for _, m in result.messages[:first_final]), name
    assert len(results["cats.wav"].finals) >= 2  # a 30 s reading is several utterances
    assert len(results["cats.wav"].partials) >= 10


@pytest.mark.slow
async def test_four_simultaneous_clients_each_get_only_their_own_words(
    running_server, clip, references, synthetic_dir
) -> None:
    clips = {
        "jfk": (clip("jfk.wav"), references["jfk.wav"]),
        "ldc": (clip("ldc93s1.wav"), references["ldc93s1.wav"]),
        "station": (read_wav(synthetic_dir / "station.16000.wav"), SYNTHETIC["station"]),
        "football": (read_wav(synthetic_dir / "football.16000.wav"), SYNTHETIC["football"]),
    }
    results: dict[str, StreamResult] = {}

    async def run(name: str) -> None:
        results[name] = await stream_clip(running_server.url, clips[name][0])

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for name in clips:
                nursery.start_soon(run, name)

    for name, (_, reference) in clips.items():
        own = set(normalize(reference).split())
        others = set().union(
            *(set(normalize(r).split()) for n, (_, r) in clips.items() if n != name)
        )
        foreign = {w for w in others - own if len(w) >= 4}
        said = results[name].finals + results[name].partials
        heard = normalize(" ".join(m["text"] for m in said))
        leaked = foreign & set(heard.split())
        assert not leaked, f"{name} received another client's words: {leaked}"
        assert word_error_rate(reference, results[name].text) <= 0.35, results[name].text
        assert len({m["session_id"] for m in results[name].of_type("session")}) == 1


@pytest.mark.slow
async def test_any_rate_from_8_to_48_khz_as_json_or_binary(running_server, synthetic_dir) -> None:
    results = {}

    async def run(name: str, rate: int, binary: bool) -> None:
        samples = read_wav(synthetic_dir / f"{name}.{rate}.wav")
        results[name] = await stream_clip(
            running_server.url, samples, sample_rate=rate, binary=binary, speed=2.0
        )

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "station", 48000, False)
            nursery.start_soon(run, "football", 8000, True)
    for name, result in results.items():
        assert result.errors == []
        # Both sentences are transcribed without error offline from the same rates.
        assert word_error_rate(SYNTHETIC[name], result.text) <= 0.1, (name, result.text)


@pytest.mark.slow
async def test_misbehaving_clients_leave_a_good_clients_transcript_intact(
    running_server, clip, references
) -> None:
    url = running_server.url
    good_audio = clip("jfk.wav")
    with trio.fail_after(DEADLINE):
        undisturbed = await stream_clip(url, good_audio, speed=0)
    rng = np.random.default_rng(7)
    outcomes: dict[str, object] = {}

    async def good() -> None:
        outcomes["good"] = await stream_clip(url, good_audio)

    async def disconnects_mid_utterance() -> None:
        # 3.5 s into a sentence, then gone without a goodbye.
        outcomes["gone"] = await stream_clip(
            url, clip("cats.wav")[: int(3.5 * 16000)], finish="close"
        )

    async def never_reads() -> None:
        async with open_websocket_url(url, message_queue_size=0) as ws:
            audio = clip("cats.wav")[: 8 * 16000]
            for i in range(0, audio.size, 1600):
                await ws.send_message(audio[i : i + 1600].tobytes())
                await trio.sleep(0.1)
            outcomes["never_reads_open"] = not ws.closed

    async def garbage() -> None:
        errors = []
        async with open_websocket_url(url) as ws:
            for payload in ["{", "[]", '{"type":"x"}', rng.bytes(3), '{"type":"audio","data":"%"}']:
                await ws.send_message(payload)
            try:
                while True:
                    errors.append(json.loads(await ws.get_message()))
            except ConnectionClosed as exc:
                outcomes["garbage_close"] = exc.reason.code
        outcomes["garbage_errors"] = [e.get("code") for e in errors if e["type"] == "error"]

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for task in (good, disconnects_mid_utterance, never_reads, garbage):
                nursery.start_soon(task)

    good_result = outcomes["good"]
    # Finals depend only on the audio, so the disturbed run must say exactly the same.
    assert [m["text"] for m in good_result.finals] == [m["text"] for m in undisturbed.finals]
    assert good_result.close_code == 1000
    assert word_error_rate(references["jfk.wav"], good_result.text) <= 0.15
    assert outcomes["never_reads_open"] is True
    assert outcomes["garbage_close"] == 1008
    assert outcomes["garbage_errors"] == ["invalid_message"] * 3 + ["invalid_audio"] * 2 + [
        "too_many_errors"
    ]
    # The server is still healthy and tracks no leftover session.
    with trio.fail_after(30):
        await wait_until(lambda: not running_server.server.sessions)
    with trio.fail_after(30):
        again = await stream_clip(url, clip("ldc93s1.wav"), speed=0)
    assert "suit" in again.text.lower()


async def test_valid_messages_reset_the_error_count_and_five_in_a_row_close(running_server):
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(running_server.url) as ws:
            assert json.loads(await ws.get_message())["type"] == "session"
            for _ in range(4):
                await ws.send_message("nonsense")
            await ws.send_message(b"\x00\x00" * 160)  # valid audio resets the count
            for _ in range(4):
                await ws.send_message('{"type":"audio","data":"AAA"}')
            await ws.send_message('{"type":"flush"}')
            for _ in range(5):
                await ws.send_message('{"type":"config","sample_rate":5}')
            messages, code = await receive_until_closed(ws)
    codes = [m["code"] for m in messages if m["type"] == "error"]
    assert codes == ["invalid_message"] * 4 + ["invalid_audio"] * 4 + ["invalid_audio"] * 5 + [
        "too_many_errors"
    ]
    assert all(m["message"] for m in messages)
    assert code == 1008


@pytest.mark.parametrize("server_config", [{"max_message_size": 64 * 1024}], indirect=True)
async def test_oversized_frames_get_message_too_big_and_1009(running_server) -> None:
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            await ws.send_message(b"\x00" * (100 * 1024))
            messages, code = await receive_until_closed(ws)
        assert messages[-1]["code"] == "message_too_big"
        assert "65536" in messages[-1]["message"]
        assert code == 1009
        # Far past the limit, the transport cuts the frame off without buffering it.
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            try:
                await ws.send_message(b"\x00" * (512 * 1024))
            except ConnectionClosed as exc:  # cut off while still sending
                code = exc.reason.code
            else:
                _, code = await receive_until_closed(ws)
        assert code == 1009


@pytest.mark.parametrize("server_config", [{"max_connections": 2}], indirect=True)
async def test_max_connections_refuses_with_server_busy_and_1013(running_server) -> None:
    url = running_server.url
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(url) as first, open_websocket_url(url) as second:
            await first.get_message()
            await second.get_message()
            async with open_websocket_url(url) as third:
                messages, code = await receive_until_closed(third)
            assert code == 1013
            (refusal,) = messages
            assert refusal["code"] == "server_busy" and refusal["retry_after"] > 0
            assert "2" in refusal["message"]
        with trio.fail_after(30):
            await wait_until(lambda: not running_server.server.sessions)
        async with open_websocket_url(url) as fourth:  # room again once they left
            assert json.loads(await fourth.get_message())["type"] == "session"


async def test_flush_finalizes_now_and_end_sends_the_last_final_then_1000(
    running_server, clip
) -> None:
    speech = clip("ldc93s1.wav")
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            await ws.send_message(speech.tobytes())  # no trailing silence: no endpoint yet
            await ws.send_message('{"type":"flush"}')
            while (m := json.loads(await ws.get_message()))["type"] != "completed":
                pass
            assert "suit" in m["text"].lower() and m["utterance_id"] == 1
            await ws.send_message(speech[: 16000 * 2].tobytes())
            await ws.send_message('{"type":"end"}')
            messages, code = await receive_until_closed(ws)
    finals = [m for m in messages if m["type"] == "completed"]
    assert [f["utterance_id"] for f in finals] == [2]
    assert finals[0]["start"] >= m["end"]
    assert code == 1000


async def test_silence_and_noise_produce_no_text(running_server) -> None:
    rng = np.random.default_rng(3)
    noise = (rng.standard_normal(16000 * 5) * 1500).astype("<i2")
    quiet = np.zeros(16000 * 5, dtype="<i2")
    with trio.fail_after(DEADLINE):
        result = await stream_clip(
            running_server.url, np.concatenate([quiet, noise, quiet]), speed=0
        )
    assert result.finals == [] and result.partials == []
    assert result.close_code == 1000


async def test_language_the_model_cannot_do_is_an_error(running_server) -> None:
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            await ws.send_message('{"type":"config","language":"de"}')
            error = json.loads(await ws.get_message())
            await ws.send_message('{"type":"config","language":"en"}')
            await ws.send_message('{"type":"end"}')
            messages, code = await receive_until_closed(ws)
    assert error["code"] == "invalid_message" and "English" in error["message"]
    assert messages == [] and code == 1000


@pytest.mark.parametrize(
    "server_config", [{"ping_interval": 0.2, "ping_timeout": 1.0}], indirect=True
)
async def test_a_silent_connection_stays_open_across_pings(running_server) -> None:
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            await trio.sleep(2.0)  # ten ping intervals without a message
            assert not ws.closed
            await ws.send_message('{"type":"end"}')
            _, code = await receive_until_closed(ws)
    assert code == 1000


@pytest.mark.parametrize("server_config", [{"idle_timeout": 0.5}], indirect=True)
async def test_explicit_idle_timeout_closes_with_its_code(running_server) -> None:
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            messages, code = await receive_until_closed(ws)
    assert messages[-1]["code"] == "idle_timeout"
    assert code == 1000


@pytest.mark.parametrize("server_config", [{"shutdown_grace": 0.0}], indirect=True)
async def test_a_clients_own_end_is_not_bounded_by_the_drain_grace(running_server, clip) -> None:
    # shutdown_grace governs draining only; a client's `end` always gets its final.
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            await ws.send_message(clip("ldc93s1.wav").tobytes())
            await ws.send_message('{"type":"end"}')
            messages, code = await receive_until_closed(ws)
    assert code == 1000
    assert "suit" in " ".join(m["text"] for m in messages if m["type"] == "completed").lower()
