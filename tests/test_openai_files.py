"""The OpenAI-compatible file API over real sockets: the official ``openai`` client as users run
it, curl, and raw HTTP for everything a client can get wrong."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
import trio

from stt_server.config import Config
from stt_server.loadtest.client import read_wav, stream_audio
from stt_server.loadtest.wer import normalize, word_error_rate
from stt_server.server import serve

from .conftest import DATA, SPOKEN, SYNTHETIC, http_request, wait_until
from .test_filedecode import encode
from .test_multipart import BOUNDARY, form
from .test_security import make_token

#: Every test's I/O finishes within this, transcription of the longest clip included.
DEADLINE = 120

#: The openai package marks ``audio.translations.create`` deprecated (OpenAI's newer models do
#: not translate); the endpoint and the method still work, and users still call it.
translations_deprecated = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")

ROUTE = "/v1/audio/transcriptions"


def client(port: int, api_key: str = "not-checked") -> openai.OpenAI:
    # No retries: a test must see the first answer, not a retried one.
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=DEADLINE
    )


async def call(fn, /, *args, **kwargs):
    """The openai client is synchronous (httpx): run it on a thread, as a user's script would
    run beside the server."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def start(nursery, speech_model, **settings):
    config = Config(**{"host": "127.0.0.1", "port": 0, "control_socket": "", **settings})
    return await nursery.start(functools.partial(serve, config, model=speech_model))


def request_bytes(body: bytes, *, extra: str = "", path: str = ROUTE) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def error_of(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def int16(samples: np.ndarray) -> np.ndarray:
    return samples if samples.dtype == np.int16 else (samples * 32767).astype(np.int16)


# -- transcripts ------------------------------------------------------------------------------


async def test_the_openai_client_gets_the_native_protocols_words_from_wav_and_compressed_files(
    running_server, clip, synthetic_dir, tmp_path, references
) -> None:
    """WAV, Ogg/Opus and MP3 (made with PyAV) and Ogg/Vorbis (made with sox) files through
    ``client.audio.transcriptions.create`` give the words a native WebSocket client gets for
    the same speech, as well: a file is decoded on Whisper's full window, a live final on a
    right-sized one, and tiny.en makes two mistakes in ldc93s1.wav either way, not the same
    two ("dog suit and ... water" against "dog suit in ... for")."""
    port = running_server.server.port
    station = synthetic_dir / "station.16000.wav"
    ldc = DATA / "ldc93s1.wav"
    opus = tmp_path / "ldc93s1.ogg"
    opus.write_bytes(encode(int16(clip("ldc93s1.wav")), 16000, "ogg", "libopus"))
    mp3 = tmp_path / "station.mp3"
    mp3.write_bytes(encode(read_wav(station), 16000, "mp3", "libmp3lame"))
    vorbis = tmp_path / "station.ogg"
    await trio.run_process(["sox", str(station), "-C", "3", str(vorbis)])
    api = client(port)
    with trio.fail_after(DEADLINE):
        spoken = {ldc: references["ldc93s1.wav"], station: SYNTHETIC["station"]}
        for native_source, files in ((ldc, (ldc, opus)), (station, (station, mp3, vorbis))):
            native = await stream_audio(
                running_server.url, read_wav(native_source), speed=0, trailing_silence=1.0
            )
            for path in files:
                with path.open("rb") as fh:
                    result = await call(api.audio.transcriptions.create, file=fh, model="whisper-1")
                said = spoken[native_source]
                native_wer = word_error_rate(said, native.text)
                assert word_error_rate(said, result.text) <= native_wer + 0.05, path.name
                assert word_error_rate(native.text, result.text) <= 0.2, path.name


async def test_verbose_json_subtitles_and_text_through_the_client(running_server, references):
    api = client(running_server.server.port)
    jfk = DATA / "jfk.wav"
    with trio.fail_after(DEADLINE):
        verbose = await call(
            api.audio.transcriptions.create,
            file=jfk,
            model="whisper-1",
            language="en",
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )
        assert verbose.language == "english"
        assert verbose.duration == pytest.approx(11.0, abs=0.05)
        assert word_error_rate(references["jfk.wav"], verbose.text) <= 0.05
        segments, words = verbose.segments, verbose.words
        assert segments and words
        assert [s.id for s in segments] == list(range(len(segments)))
        assert all(0 <= s.start < s.end <= 11.0 for s in segments)
        assert all(a.end <= b.start + 0.01 for a, b in itertools.pairwise(segments))
        assert " ".join(w.word for w in words).split() == verbose.text.split()
        assert all(s.avg_logprob < 0 and 0 <= s.no_speech_prob <= 1 for s in segments)
        srt = await call(
            api.audio.transcriptions.create, file=jfk, model="whisper-1", response_format="srt"
        )
        vtt = await call(
            api.audio.transcriptions.create, file=jfk, model="whisper-1", response_format="vtt"
        )
        text = await call(
            api.audio.transcriptions.create, file=jfk, model="whisper-1", response_format="text"
        )
    assert re.match(r"1\n00:00:00,\d{3} --> 00:00:\d\d,\d{3}\n\S", srt)
    assert vtt.startswith("WEBVTT\n\n00:00:")
    assert text.strip() == verbose.text
    cue_texts = [block.split("\n", 2)[2] for block in srt.strip().split("\n\n")]
    assert " ".join(cue_texts).split() == verbose.text.split()


@translations_deprecated
async def test_translation_on_the_english_only_model_is_the_english_transcript(
    running_server,
) -> None:
    """tiny.en knows one language: translating English into English is transcribing it."""
    api = client(running_server.server.port)
    ldc = DATA / "ldc93s1.wav"
    with trio.fail_after(DEADLINE):
        translated = await call(
            api.audio.translations.create,
            file=ldc,
            model="whisper-1",
            response_format="verbose_json",
        )
        transcribed = await call(api.audio.transcriptions.create, file=ldc, model="whisper-1")
        with pytest.raises(openai.BadRequestError, match="only transcribes English"):
            await call(api.audio.transcriptions.create, file=ldc, model="whisper-1", language="fr")
    assert translated.text == transcribed.text
    assert translated.task == "translate" and translated.language == "english"


async def test_a_long_file_is_transcribed_in_chunks_on_one_clock(running_server, references):
    """lucier.wav (100 s) is four chunks; its segments run in order to its end, and the text
    is as good as the clip's offline transcription."""
    api = client(running_server.server.port)
    engine = running_server.server.pool.devices[0].engine
    before = engine.statistics().uploads_done
    with trio.fail_after(DEADLINE):
        verbose = await call(
            api.audio.transcriptions.create,
            file=DATA / "lucier.wav",
            model="whisper-1",
            response_format="verbose_json",
        )
    chunks = engine.statistics().uploads_done - before
    assert 4 <= chunks <= 5  # at most 30 s each, cut at a pause in the last 8 s
    assert verbose.duration == pytest.approx(100.0, abs=2.0)
    starts = [s.start for s in verbose.segments]
    assert starts == sorted(starts) and verbose.segments[-1].end > 90.0
    seeks = sorted({s.seek for s in verbose.segments})  # where each chunk starts, 10 ms frames
    assert len(seeks) == chunks and seeks[0] == 0
    assert all(0 < b - a <= 3000 for a, b in itertools.pairwise(seeks))
    # 1.9% measured (offline, whole file: 1.0%; streamed with context: 2.9%).
    assert word_error_rate(references["lucier.wav"], verbose.text) <= 0.04


# -- limits and refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "server_config", [{"max_upload_size": 100_000, "max_upload_seconds": 2.0}], indirect=True
)
async def test_size_and_duration_limits(running_server, clip) -> None:
    port = running_server.server.port
    api = client(port)
    with trio.fail_after(DEADLINE):
        # Declared too large: refused before a byte of the body is read.
        huge = request_bytes(b"").replace(b"Length: 0", b"Length: 99999999999")
        status, _headers, body = await http_request(port, huge)
        assert status == 413 and error_of(body)["code"] == "request_too_large"
        # The openai client sends the whole body anyway: the lingering close lets it read why.
        with pytest.raises(openai.APIStatusError) as too_big:
            await call(api.audio.transcriptions.create, file=DATA / "jfk.wav", model="whisper-1")
        assert too_big.value.status_code == 413
        # Small enough in bytes, too long in time (the header says 3 s).
        short = encode(int16(clip("ldc93s1.wav")), 16000, "ogg", "libopus")
        with pytest.raises(openai.BadRequestError, match="longer than") as too_long:
            await call(api.audio.transcriptions.create, file=("a.ogg", short), model="whisper-1")
        assert too_long.value.body["code"] == "audio_too_long"


@pytest.mark.parametrize(
    ("body", "extra", "status", "message"),
    [
        (form(("model", b"whisper-1", None)), "", 400, "no 'file' part"),
        (form(("file", b"", "empty.wav")), "", 400, "the file is empty"),
        (form(("file", b"this is not audio\n" * 100, "notes.wav")), "", 400, "not audio"),
        (form(("file", b"\x00" * 5000, "zeros.wav")), "", 400, "not audio"),
        (b"--" + BOUNDARY + b"\r\nno headers here", "", 400, "multipart"),
        (b"garbage", "", 400, "no multipart boundary"),
        (form(("file", b"x", "a.wav"), ("response_format", b"xml", None)), "", 400, "xml|one of"),
    ],
    ids=["no file", "empty", "text", "zeros", "no part head", "no boundary", "bad format"],
)
async def test_bad_requests_get_a_clear_400_and_the_server_goes_on(
    running_server, body, extra, status, message
) -> None:
    port = running_server.server.port
    with trio.fail_after(DEADLINE):
        got, _, answer = await http_request(port, request_bytes(body, extra=extra))
        assert got == status
        assert re.search(message, error_of(answer)["message"])
        assert (await http_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200


async def test_framing_errors(running_server) -> None:
    port = running_server.server.port
    head = f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\n"
    multipart = f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\n"
    cases = [
        (head + multipart + "\r\n", 411, "Content-Length"),
        (head + "Content-Type: audio/wav\r\nContent-Length: 3\r\n\r\nabc", 415, "multipart"),
        (head + multipart + "Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "malformed"),
        (f"GET {ROUTE} HTTP/1.1\r\nHost: x\r\n\r\n", 405, "POST"),
    ]
    with trio.fail_after(DEADLINE):
        for raw, status, message in cases:
            got, _, body = await http_request(port, raw.encode())
            assert got == status, raw
            assert message in error_of(body)["message"]


async def test_a_truncated_body_is_400_and_a_chunked_body_is_transcribed(running_server) -> None:
    port = running_server.server.port
    body = form(("file", (DATA / "ldc93s1.wav").read_bytes(), "ldc.wav"), ("model", b"m", None))
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request_bytes(body)[: -len(body) // 2])
            await stream.send_eof()  # the client stops half-way and says so
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 ")
        chunked = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 7000]), body[i : i + 7000])
            for i in range(0, len(body), 7000)
        )
        raw = (
            (
                f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\n\r\n"
            ).encode()
            + chunked
            + b"0\r\n\r\n"
        )
        status, headers, answer = await http_request(port, raw)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert "suit" in json.loads(answer)["text"]


@pytest.mark.parametrize("server_config", [{"upload_timeout": 1.0}], indirect=True)
async def test_a_slow_body_gets_408_and_the_connection_is_dropped(running_server) -> None:
    """A byte every 0.2 s keeps the connection busy but not alive: the body has a deadline."""
    port = running_server.server.port
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream, trio.open_nursery() as nursery:
            await stream.send_all(request_bytes(b"x" * 1000)[:-990])
            started = trio.current_time()

            async def trickle() -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    while True:
                        await trio.sleep(0.2)
                        await stream.send_all(b"x")

            nursery.start_soon(trickle)
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
            nursery.cancel_scope.cancel()
        assert 1.0 <= trio.current_time() - started < 5.0
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert error_of(answer.partition(b"\r\n\r\n")[2])["code"] == "request_timeout"


async def test_expect_100_continue_is_answered_before_the_body(running_server) -> None:
    port = running_server.server.port
    body = form(("file", (DATA / "ldc93s1.wav").read_bytes(), "ldc.wav"))
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            head, _, rest = request_bytes(body, extra="Expect: 100-continue\r\n").partition(
                b"\r\n\r\n"
            )
            await stream.send_all(head + b"\r\n\r\n")
            assert await stream.receive_some(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            await stream.send_all(rest)
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_tokens_rate_limits_capacity_and_drain(nursery, speech_model, tmp_path) -> None:
    token, tokens_file = make_token(tmp_path)
    server = await start(
        nursery,
        speech_model,
        tokens_file=tokens_file,
        connections_per_minute=4,
        max_uploads=1,
        upload_timeout=30.0,
    )
    port = server.port
    ldc = DATA / "ldc93s1.wav"
    with trio.fail_after(DEADLINE):
        with pytest.raises(openai.AuthenticationError) as wrong:
            await call(client(port, "wrong").audio.transcriptions.create, file=ldc, model="m")
        assert wrong.value.body["code"] == "invalid_api_key"
        result = await call(client(port, token).audio.transcriptions.create, file=ldc, model="m")
        assert "suit" in result.text
        # One upload in progress holds the only place: the next is told to come back later.
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        await slow.send_all(
            request_bytes(b"x" * 100, extra=f"Authorization: Bearer {token}\r\n")[:-50]
        )
        await wait_until(lambda: server._files.active == 1)
        with pytest.raises(openai.InternalServerError) as busy:
            await call(client(port, token).audio.transcriptions.create, file=ldc, model="m")
        assert busy.value.status_code == 503
        assert busy.value.response.headers["retry-after"] == "5"
        await slow.aclose()
        await wait_until(lambda: server._files.active == 0)
        # The fifth connection this minute from this address.
        with pytest.raises(openai.RateLimitError) as limited:
            await call(client(port, token).audio.transcriptions.create, file=ldc, model="m")
        assert int(limited.value.response.headers["retry-after"]) >= 1
        assert limited.value.body["code"] == "rate_limit_exceeded"


async def test_a_draining_server_refuses_files_with_503(running_server) -> None:
    running_server.server.start_draining()
    with trio.fail_after(DEADLINE):
        status, headers, body = await http_request(
            running_server.server.port, request_bytes(form(("file", b"x", "a.wav")))
        )
    assert status == 503 and headers["Retry-After"] == "5"
    assert "draining" in error_of(body)["message"]


async def test_a_client_that_hangs_up_stops_its_transcription(running_server) -> None:
    server = running_server.server
    engine = server.pool.devices[0].engine
    before = engine.statistics().uploads_done
    body = form(("file", (DATA / "lucier.wav").read_bytes(), "lucier.wav"))
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(request_bytes(body))
        await wait_until(lambda: engine.statistics().uploads_done > before)
        await stream.aclose()
        await wait_until(lambda: server._files.active == 0)
        await wait_until(lambda: engine.statistics().busy == 0)
    assert engine.statistics().uploads_done - before < 4  # the four chunks were not all done


async def test_metrics_count_file_requests(running_server) -> None:
    port = running_server.server.port
    with trio.fail_after(DEADLINE):
        await call(client(port).audio.transcriptions.create, file=DATA / "ldc93s1.wav", model="m")
        await http_request(port, request_bytes(b"garbage"))
        _, _, metrics = await http_request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    text = metrics.decode()
    assert 'stt_file_requests_total{endpoint="transcriptions",status="200"} 1.0' in text
    assert 'stt_file_requests_total{endpoint="transcriptions",status="400"} 1.0' in text
    assert re.search(r"stt_file_audio_seconds_total 2\.9\d", text)
    assert 'stt_engine_queue_wait_seconds_count{kind="upload"} 1.0' in text
    assert "stt_file_requests_active 0.0" in text


# -- the README's examples --------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## OpenAI-compatible file API"


def readme_blocks(language: str) -> list[str]:
    found = re.search(rf"^{SECTION}\n(.*?)(?=^## |\Z)", README.read_text(), flags=re.M | re.S)
    if found is None:
        pytest.skip(f"README has no {SECTION!r} section yet")
    section = found.group(1)
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


async def test_the_readme_examples_run_as_written(running_server, tmp_path) -> None:
    """The curl and openai-python examples, with this server's address and a clip for the
    file they name."""
    port = running_server.server.port
    shell, python = readme_blocks("sh"), readme_blocks("python")
    assert shell and python
    shutil.copy(DATA / "jfk.wav", tmp_path / "speech.wav")

    def localize(code: str) -> str:
        return code.replace("localhost:8012", f"127.0.0.1:{port}")

    env = {"PATH": "/usr/bin:/bin", "STT_TOKEN": "unused", "HOME": str(tmp_path)}
    with trio.fail_after(DEADLINE):
        for code in shell:
            done = await trio.run_process(
                ["bash", "-euo", "pipefail", "-c", localize(code)],
                cwd=tmp_path,
                env=env,
                capture_stdout=True,
                capture_stderr=True,
            )
            assert "country" in done.stdout.decode(), done.stderr.decode()
        for code in python:
            done = await trio.run_process(
                [sys.executable, "-c", localize(code)],
                cwd=tmp_path,
                env=env,
                capture_stdout=True,
                capture_stderr=True,
            )
            assert "country" in done.stdout.decode(), done.stderr.decode()


# -- the multilingual model -------------------------------------------------------------------


@translations_deprecated
async def test_translation_and_detection_on_the_multilingual_model(
    nursery, request, tmp_path
) -> None:
    """Whisper base behind the file API: German speech is detected as German and translated
    into English; the server's ``language = ""`` means detect, as for sessions."""
    model = request.getfixturevalue("multilingual_model")
    server = await start(nursery, model, language="")
    api = client(server.port)
    german = tmp_path / "de.ogg"
    german.write_bytes(encode(request.getfixturevalue("spoken")["de"], 16000, "ogg", "libopus"))
    with trio.fail_after(DEADLINE):
        heard = await call(
            api.audio.transcriptions.create,
            file=german,
            model="whisper-1",
            response_format="verbose_json",
        )
        translated = await call(
            api.audio.translations.create,
            file=german,
            model="whisper-1",
            response_format="verbose_json",
        )
    assert heard.language == "german" and heard.task == "transcribe"
    assert heard.text  # base hears espeak's German only roughly: "Café", "Kaffee"...
    assert translated.language == "english" and translated.task == "translate"
    assert SPOKEN["de"][1] <= set(normalize(translated.text).split())


async def test_files_go_to_a_device_whose_breaker_is_closed(nursery, speech_model) -> None:
    """Two simulated GPUs: with one breaker open the file runs on the other; with both open
    the client is told to come back (503, Retry-After)."""
    server = await start(nursery, speech_model, simulate_gpus="24576:2000,24576:2000")
    first, second = server.pool.devices
    first.breaker.trip("test")
    api = client(server.port)
    ldc = DATA / "ldc93s1.wav"
    with trio.fail_after(DEADLINE):
        result = await call(api.audio.transcriptions.create, file=ldc, model="m")
        assert "suit" in result.text
        done = [device.engine.statistics().uploads_done for device in (first, second)]
        assert done == [0, 1]
        second.breaker.trip("test")
        with pytest.raises(openai.InternalServerError, match="no device is available") as busy:
            await call(api.audio.transcriptions.create, file=ldc, model="m")
    assert busy.value.status_code == 503 and busy.value.response.headers["retry-after"] == "5"


class BrokenModel:
    """Fails on every file chunk, as a model or a library failing on some input would."""

    name = "broken"

    def transcribe(self, audio, options):
        if options.upload:
            raise RuntimeError("CUDA error: an illegal memory access /opt/secret/path")
        return ""


async def test_a_model_failure_is_a_500_in_openais_shape_and_the_server_goes_on(nursery) -> None:
    server = await start(nursery, BrokenModel())
    body = form(("file", (DATA / "ldc93s1.wav").read_bytes(), "ldc93s1.wav"), ("model", b"m", None))
    with trio.fail_after(DEADLINE):
        status, _, answer = await http_request(server.port, request_bytes(body))
        assert status == 500
        error = error_of(answer)
        assert error["code"] == "server_error" and error["type"] == "server_error"
        # The model's own words stay in the log.
        assert "secret" not in answer.decode()
        status, _, _ = await http_request(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
