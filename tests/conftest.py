from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

# Before anything imports huggingface_hub: the tests never reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import attrs
import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed

from stt_server import modelfiles
from stt_server.config import Config
from stt_server.loadtest.client import read_wav
from stt_server.loadtest.clips import CLIPS_DIR
from stt_server.loadtest.clips import references as clip_references
from stt_server.server import Server, serve
from stt_server.whisper import WhisperModel

DATA = CLIPS_DIR

#: Sentences synthesised with espeak-ng for tests that need more, and distinct, speakers.
#: Chosen because tiny.en transcribes them without error offline at 8, 16 and 48 kHz, so a
#: streamed mistake is the server's, not the voice's.
SYNTHETIC = {
    "station": "We should meet at the train station after lunch on Friday.",
    "football": "The children played football in the park until it started to rain.",
}


@pytest.fixture(scope="session")
def references() -> dict[str, str]:
    return clip_references()


@pytest.fixture(scope="session")
def clip() -> functools._lru_cache_wrapper:
    @functools.cache
    def load(name: str) -> np.ndarray:
        return read_wav(DATA / name)

    return load


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is required (Debian package); the test command installs it")
    out = tmp_path_factory.mktemp("speech")
    for name, text in SYNTHETIC.items():
        raw = out / f"{name}.raw.wav"
        subprocess.run(["espeak-ng", "-s", "140", "-w", str(raw), text], check=True)
        for rate in (8000, 16000, 48000):
            subprocess.run(
                [
                    "sox",
                    str(raw),
                    "-r",
                    str(rate),
                    "-c",
                    "1",
                    "-b",
                    "16",
                    str(out / f"{name}.{rate}.wav"),
                ],
                check=True,
            )
    return out


@pytest.fixture(scope="session")
def speech_model() -> WhisperModel:
    """The embedded model, loaded once for the whole run (as a server loads it once)."""
    return WhisperModel.load(Config(), device="cpu")


@attrs.frozen
class RunningServer:
    server: Server
    shutdown: trio.Event

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}/"


@pytest.fixture
def server_config(request: pytest.FixtureRequest) -> Config:
    """Loopback, a free port; tests change settings with ``indirect`` parametrization."""
    settings = {"host": "127.0.0.1", "port": 0, "shutdown_grace": 15.0, "control_socket": ""}
    return Config(**{**settings, **getattr(request, "param", {})})


@pytest.fixture
async def running_server(
    nursery: trio.Nursery, speech_model: WhisperModel, server_config: Config
) -> AsyncIterator[RunningServer]:
    shutdown = trio.Event()
    server = await nursery.start(
        functools.partial(serve, server_config, model=speech_model, shutdown=shutdown)
    )
    yield RunningServer(server, shutdown)
    shutdown.set()


@pytest.fixture
def free_port() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


async def wait_until(predicate) -> None:
    """Wait for outside-observable state (engine counters, the session table): the test has no
    event of its own to wait on, so it polls. Callers put the deadline around it."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.02)


async def receive_until_closed(ws) -> tuple[list[dict], int | None]:
    """Every JSON message a client receives until the server closes, and the close code."""
    messages = []
    try:
        while True:
            messages.append(json.loads(await ws.get_message()))
    except ConnectionClosed as exc:
        return messages, exc.reason.code


async def http_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one raw HTTP request (odd targets reach the server as written) and read the
    response until the server closes: status, headers, body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


# -- the multilingual model (the multilingual extra), loaded once for the run ------------------

#: Sentences in the languages the tests speak, with words a right translation contains. Whisper
#: base hears espeak-ng's robotic voices poorly; these are sentences it gets (measured: detected
#: with probability 0.90 and 0.92, and "coffee" in both translations).
SPOKEN = {
    "fr": ("Bonjour. Je voudrais un café et un croissant, s'il vous plaît.", {"coffee"}),
    "de": ("Ich trinke jeden Morgen eine Tasse Kaffee.", {"coffee"}),
}


def part(name: str) -> Path:
    """The data folder of one of the multilingual model's two packages."""
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"{name} missing: the test extra installs stt-server[multilingual]"
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def joined(model_cache: Path) -> Path:
    return modelfiles.assemble_multilingual(model_cache)


@pytest.fixture(scope="session")
def multilingual_model(joined: Path) -> WhisperModel:
    model = WhisperModel.load(Config(model=str(joined)), device="cpu")
    assert model.is_multilingual
    return model


@pytest.fixture(scope="session")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.fail(
            "espeak-ng and sox are required (Debian packages); the test command installs them"
        )
    out = tmp_path_factory.mktemp("spoken")
    clips = {}
    for language, (text, _) in SPOKEN.items():
        raw, wav = out / f"{language}.raw.wav", out / f"{language}.wav"
        subprocess.run(["espeak-ng", "-v", language, "-s", "140", "-w", str(raw), text], check=True)
        subprocess.run(
            ["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav)], check=True
        )
        clips[language] = read_wav(wav)
    return clips
