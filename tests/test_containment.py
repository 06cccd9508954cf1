"""A failure inside one connection ends that connection only.

Faults are injected at every stage of serving a client (the HTTP answer, the handshake, PCM
decoding, resampling, VAD, the engine call, the emitter, trio-websocket's reader task, the
control socket) while a good client streams speech. Each faulty client gets a generic answer
(HTTP 500, or ``internal_error`` and a 1011 close) that gives nothing of the fault away; the
server logs each fault once, with its traceback, and counts it; the good client's finals equal
those of a calm run. Faults are aimed at one client by its request path or by a marker value in
its audio, so the code under test is the real code path, made to raise at one point.
"""

from __future__ import annotations

import functools
import json
import logging
import socket

import numpy as np
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from stt_server import control, server, session
from stt_server.audio import Resampler
from stt_server.config import Config
from stt_server.engine import Engine
from stt_server.loadtest.client import StreamResult, stream_audio
from stt_server.vad import VadStream
from stt_server.websocket import MeteredConnection

from . import hostile
from .conftest import receive_until_closed

#: Text that must never reach a client: it stands for paths, library internals, secrets.
SECRET = "/srv/secret/path token=abc123"

#: Marker samples that make the decode, resampling and VAD stages fail for this audio only.
MARK_DECODE, MARK_RESAMPLE, MARK_VAD = 11111, 22222, -23456

#: Makes that session's resampler fail from then on, its final drain included.
MARK_STUCK = 13579


class InjectedFault(RuntimeError):
    pass


def fault() -> InjectedFault:
    return InjectedFault(f"injected fault at {SECRET}")


def raise_fault() -> None:
    raise fault()


def has_mark(samples: np.ndarray, mark: int) -> bool:
    """Four equal samples of the marker value in a row: real speech never holds them."""
    hits = np.isclose(samples, mark / 32768, rtol=0, atol=1e-7).astype(np.int8)
    return bool(np.any(np.convolve(hits, np.ones(4, dtype=np.int8), "valid") == 4))


@pytest.fixture
def inject(monkeypatch) -> None:
    """Every stage raises for the clients (or inputs) marked for it, and behaves otherwise."""

    def wrap(owner, name, make):
        monkeypatch.setattr(owner, name, make(getattr(owner, name)))

    wrap(
        server,
        "respond",
        lambda f: lambda head, routes: raise_fault() if head.path == "/inject" else f(head, routes),
    )
    wrap(
        server,
        "credentials",
        lambda f: lambda head: raise_fault() if "inject=handshake" in head.query else f(head),
    )

    def decode(f):
        def patched(pcm):
            samples = f(pcm)
            if has_mark(samples, MARK_DECODE):
                raise fault()
            return samples

        return patched

    wrap(session, "pcm16_to_float", decode)

    def resample(f):
        def patched(self, samples):
            if has_mark(samples, MARK_RESAMPLE):
                raise fault()
            if has_mark(samples, MARK_STUCK):
                self.stuck = True
            if getattr(self, "stuck", False):
                raise fault()
            return f(self, samples)

        return patched

    def drain(f):
        def patched(self):
            if getattr(self, "stuck", False):
                raise fault()
            return f(self)

        return patched

    wrap(Resampler, "process", resample)
    wrap(Resampler, "drain", drain)

    def vad(f):
        def patched(self, samples):
            if has_mark(samples, MARK_VAD):
                raise fault()
            return f(self, samples)

        return patched

    wrap(VadStream, "process", vad)

    def engine(f):
        async def patched(self, audio, options, *, owner):
            if "inject=engine" in (owner._ws.path or ""):
                raise fault()
            return await f(self, audio, options, owner=owner)

        return patched

    wrap(Engine, "transcribe", engine)
    failed_once: set[int] = set()

    def emitter(f):
        async def patched(self, message):
            if "inject=emitter" in (self.path or "") and id(self) not in failed_once:
                failed_once.add(id(self))
                raise fault()
            return await f(self, message)

        return patched

    wrap(MeteredConnection, "send_message", emitter)

    def reader(f):
        async def patched(self, event):
            if "inject=reader" in (self.path or ""):
                raise fault()
            return await f(self, event)

        return patched

    wrap(MeteredConnection, "_handle_ping_event", reader)
    wrap(control, "snapshot", lambda f: lambda stats: raise_fault())


def marked(mark: int) -> bytes:
    """A tenth of a second of silence that carries the marker."""
    chunk = np.zeros(1600, dtype="<i2")
    chunk[100:104] = mark
    return chunk.tobytes()


async def faulty_audio_client(url: str, speech: np.ndarray, mark: int) -> tuple[list, int]:
    """Speech in one message, then the marked chunk in the next: the fault comes mid-utterance."""
    async with open_websocket_url(url) as ws:
        await ws.get_message()
        await ws.send_message(speech.tobytes())
        await ws.send_message(marked(mark))
        return await receive_until_closed(ws)


async def test_a_fault_at_any_stage_ends_only_its_own_connection(
    nursery, speech_model, clip, tmp_path, caplog, inject
) -> None:
    caplog.set_level(logging.INFO)
    control_path = tmp_path / "control.sock"
    config = Config(
        host="127.0.0.1",
        port=0,
        control_socket=str(control_path),
        connections_per_minute=0,
        max_sessions_per_ip=0,
        # The faulty clients send a few seconds of speech at once.
        max_realtime_factor=0.0,
    )
    srv = await nursery.start(functools.partial(serve_with, config, speech_model))
    url = f"ws://127.0.0.1:{srv.port}/"
    good = clip("jfk.wav")
    speech = clip("ldc93s1.wav")  # "She had your dark suit in greasy wash water all year."
    outcomes: dict[str, object] = {}

    async def http_stage() -> None:
        reply = await hostile.exchange(srv.port, b"GET /inject HTTP/1.1\r\nHost: x\r\n\r\n")
        outcomes["http"] = reply

    async def handshake_stage() -> None:
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(f"{url}?inject=handshake"):
                pass
        outcomes["handshake"] = (rejected.value.status_code, rejected.value.body)

    async def audio_stage(name: str, mark: int) -> None:
        outcomes[name] = await faulty_audio_client(url, speech, mark)

    async def engine_stage() -> None:
        async with open_websocket_url(f"{url}?inject=engine") as ws:
            await ws.get_message()
            await ws.send_message(speech.tobytes())
            await ws.send_message('{"type":"end"}')
            outcomes["engine"] = await receive_until_closed(ws)

    async def emitter_stage() -> None:
        async with open_websocket_url(f"{url}?inject=emitter") as ws:
            outcomes["emitter"] = await receive_until_closed(ws)

    async def reader_stage() -> None:
        async with open_websocket_url(f"{url}?inject=reader") as ws:
            await ws.get_message()
            with trio.move_on_after(1):
                await ws.ping(b"x")
            outcomes["reader"] = await receive_until_closed(ws)

    async def control_stage() -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(str(control_path))
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(b'{"cmd":"snapshot"}\n')
            outcomes["control"] = json.loads(await stream.receive_some(65536))

    with trio.fail_after(120):
        calm = await stream_audio(url, good)
        stormy: list[StreamResult] = []

        async def good_client() -> None:
            stormy.append(await stream_audio(url, good))

        async with trio.open_nursery() as clients:
            clients.start_soon(good_client)
            await trio.sleep(1.0)  # the good client is mid-utterance when the faults begin
            for stage in (http_stage, handshake_stage, engine_stage, emitter_stage, reader_stage):
                clients.start_soon(stage)
            for name, mark in (
                ("decode", MARK_DECODE),
                ("resample", MARK_RESAMPLE),
                ("vad", MARK_VAD),
                ("stuck", MARK_STUCK),
            ):
                clients.start_soon(audio_stage, name, mark)
            clients.start_soon(control_stage)
        assert await hostile.health_status(srv.port) == 200

    # The good client saw nothing of it.
    assert [m["text"] for m in stormy[0].finals] == [m["text"] for m in calm.finals]
    assert stormy[0].close_code == 1000 and stormy[0].errors == []

    # Before the upgrade: HTTP 500 with a generic body.
    assert outcomes["http"].startswith(b"HTTP/1.1 500 ")
    status, body = outcomes["handshake"]
    assert status == 500 and json.loads(body)["error"] == "internal_error"

    # In a session: the speech sent before the fault still gets its final, then internal_error
    # and 1011.
    for name in ("decode", "resample", "vad", "stuck"):
        messages, code = outcomes[name]
        assert code == 1011, (name, messages)
        finals = " ".join(m["text"] for m in messages if m["type"] == "completed").lower()
        assert "greasy wash" in finals, (name, messages)
        assert messages[-1]["type"] == "error" and messages[-1]["code"] == "internal_error"
    for name in ("emitter", "reader"):
        messages, code = outcomes[name]
        assert code == 1011, (name, messages)

    # A failing engine call is that utterance's failure, not the session's.
    messages, code = outcomes["engine"]
    assert code == 1000
    assert [m["code"] for m in messages if m["type"] == "error"] == ["transcription_failed"]

    # The control socket answers the operator's request with an error and keeps serving.
    assert outcomes["control"] == {"ok": False, "error": "internal error"}

    # Nothing of the fault reached anyone.
    everything = repr(outcomes)
    assert SECRET not in everything and "InjectedFault" not in everything
    assert "Traceback" not in everything

    # Logged once each, with the traceback, and counted.
    formatter = logging.Formatter()
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is not None]
    assert all("InjectedFault" in formatter.formatException(r.exc_info) for r in logged)
    # 4 intake, 1 flush of the stuck session, 4 firewall, 1 engine call, 1 control socket
    assert len(logged) == 11, [r.getMessage() for r in logged]
    intake = [r for r in logged if "internal error in intake" in r.getMessage()]
    assert len(intake) == 4 and all(r.session_id in r.getMessage() for r in intake)
    firewall = [r for r in logged if "internal error serving" in r.getMessage()]
    assert len(firewall) == 4, [
        r.getMessage() for r in firewall
    ]  # http, handshake, emitter, reader
    assert sum("session " in r.getMessage() for r in firewall) == 2  # emitter and reader
    metrics = await hostile.exchange(srv.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b'stt_errors_total{code="internal_error"} 8.0' in metrics
    assert not srv.sessions


async def serve_with(config, model, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    await server.serve(config, model=model, task_status=task_status)
