from __future__ import annotations

import functools
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
