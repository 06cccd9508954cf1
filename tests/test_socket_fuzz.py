"""The live socket, fuzzed: generated HTTP heads, raw WebSocket frames, JSON messages (native, and
OpenAI Realtime events on /v1/realtime) and file-API POSTs go to a real server on 127.0.0.1
while a good client streams speech.

After every case the server must still answer ``/health`` with 200; at the end the good
client's finals must equal those of a calm run, no internal error may have been logged (each
one would be an input that reached a code path nobody planned for), and memory must be back
near where it started. Cases come from a fixed seed, so a failure names a reproducible case.
"""

from __future__ import annotations

import functools
import logging
import random

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from stt_server.config import Config
from stt_server.loadtest.client import StreamResult, stream_audio
from stt_server.server import serve

from . import hostile
from .test_fuzz import rss_mb

#: Cases per kind; the five kinds run interleaved. Bounded in count and, below, in time.
CASES = 40

#: Seconds one case may take, its replies included (real ones take well under one).
CASE_DEADLINE = 5.0
SEED = 20261125


async def one_json_case(url: str, rng: random.Random, message=hostile.json_message) -> None:
    try:
        async with open_websocket_url(url, max_message_size=1 << 22) as ws:
            await ws.get_message()  # the session greeting
            for _ in range(rng.randrange(1, 4)):
                await ws.send_message(message(rng))
            with trio.move_on_after(0.2):
                while True:
                    await ws.get_message()
    except ConnectionClosed:
        pass


async def one_frames_case(port: int, rng: random.Random) -> None:
    await hostile.exchange(port, hostile.upgrade_request() + hostile.frames(rng), linger=0.2)


async def one_head_case(port: int, rng: random.Random) -> None:
    await hostile.exchange(port, hostile.http_head(rng), linger=0.2)


async def one_file_case(port: int, rng: random.Random) -> None:
    await hostile.exchange(port, hostile.file_request(rng), linger=0.2)


def native_or_config(rng: random.Random) -> str:
    return hostile.native_config(rng) if rng.random() < 0.3 else hostile.json_message(rng)


async def test_fuzzing_the_live_socket_changes_nothing_for_a_good_client(
    nursery, speech_model, clip, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    config = Config(
        host="127.0.0.1",
        port=0,
        control_socket="",
        max_connections=50,
        connections_per_minute=0,
        max_sessions_per_ip=0,
        handshake_timeout=2.0,
    )
    server = await nursery.start(functools.partial(serve, config, model=speech_model))
    url = f"ws://127.0.0.1:{server.port}/"
    realtime = f"{url}v1/realtime?intent=transcription"
    realtime_event = hostile.realtime_event
    speech = clip("jfk.wav")
    rng = random.Random(SEED)
    cases: list[str] = []

    async def fuzz() -> None:
        for i in range(CASES):
            for kind, run in (
                ("head", functools.partial(one_head_case, server.port)),
                ("frames", functools.partial(one_frames_case, server.port)),
                ("json", functools.partial(one_json_case, url, message=native_or_config)),
                ("realtime", functools.partial(one_json_case, realtime, message=realtime_event)),
                ("file", functools.partial(one_file_case, server.port)),
            ):
                case_seed = rng.randrange(1 << 32)
                cases.append(f"{kind}#{i} seed={case_seed}")
                # The client shares the server's event loop: a case that stalls the loop shows
                # up here as a case that took too long.
                with trio.fail_after(CASE_DEADLINE):
                    await run(random.Random(case_seed))
                status = await hostile.health_status(server.port)
                assert status == 200, f"/health answered {status} after {cases[-1]}"

    with trio.fail_after(240):
        calm = await stream_audio(url, speech)
        baseline = rss_mb()
        stormy: list[StreamResult] = []

        async def good_client() -> None:
            stormy.append(await stream_audio(url, speech))

        async with trio.open_nursery() as both:
            both.start_soon(good_client)
            both.start_soon(fuzz)
        await trio.sleep(0.5)
        after = rss_mb()
    assert len(cases) == 5 * CASES
    internal = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert not internal, internal[0].getMessage()
    assert [m["text"] for m in stormy[0].finals] == [m["text"] for m in calm.finals]
    assert stormy[0].close_code == 1000 and stormy[0].errors == []
    assert not server.sessions  # every fuzzed session was cleaned up
    assert after - baseline < 40, (baseline, after)
