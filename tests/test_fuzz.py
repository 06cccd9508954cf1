"""Arbitrary input never raises anything but the documented errors, and garbage clients
hammering the server change nothing for a well-behaved one."""

from __future__ import annotations

import base64
import ctypes
import functools
import gc
import json
import resource

import numpy as np
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url

from stt_server.audio import Resampler, pcm16_to_float
from stt_server.auth import client_ip, credentials, parse_networks
from stt_server.config import Config
from stt_server.control import ControlError, parse_request
from stt_server.errors import SttError
from stt_server.http import BadRequest, parse_request_head
from stt_server.loadtest.client import StreamResult, stream_audio
from stt_server.protocol import AudioChunk, parse_client_message
from stt_server.server import serve

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
message_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["audio", "config", "flush", "end", "x", 3, None])},
    optional={
        "data": json_values | st.binary().map(lambda b: base64.b64encode(b).decode()),
        "sample_rate": json_values | st.integers(0, 100_000),
        "language": json_values,
    },
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), st.binary(), json_values.map(json.dumps), message_like.map(json.dumps)))
def test_protocol_parser_returns_an_event_or_a_documented_error(frame) -> None:
    try:
        event = parse_client_message(frame)
    except SttError as exc:
        assert exc.error_code.value in ("invalid_message", "invalid_audio") and exc.message
        return
    if isinstance(event, AudioChunk):
        assert len(event.pcm) % 2 == 0
        samples = pcm16_to_float(event.pcm)
        assert samples.dtype == np.float32 and np.all(np.abs(samples) <= 1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]),
    st.lists(st.integers(0, 4000), min_size=1, max_size=8),
)
def test_resampling_any_rate_in_any_chunking_gives_the_right_length(rate, sizes) -> None:
    resampler = Resampler(rate)
    total_in = sum(sizes)
    out = [resampler.process(np.zeros(n, dtype=np.float32)) for n in sizes]
    out.append(resampler.drain())
    produced = sum(o.size for o in out)
    assert abs(produced - total_in * 16000 / rate) <= 2


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_http_head_parser_never_crashes(raw) -> None:
    try:
        head = parse_request_head(raw + b"\r\n\r\n")
    except BadRequest as exc:
        assert exc.status == 400
        return
    credentials(head)
    client_ip("127.0.0.1", head, parse_networks("127.0.0.1"))


@settings(max_examples=300)
@given(
    st.one_of(
        st.binary(),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(
            st.sampled_from(["cmd", "session_id", "reason", "interval", "gpu", "value"]),
            json_values | st.sampled_from(["kick", "watch", "drain"]),
        ).map(lambda d: json.dumps(d).encode()),
    )
)
def test_control_parser_returns_a_request_or_a_control_error(line) -> None:
    try:
        parse_request(line)
    except ControlError as exc:
        assert str(exc)


def rss_mb() -> float:
    """Resident memory after a GC and after glibc has handed freed heap back to the OS, so
    that what remains is memory something still holds, not the allocator's spare capacity."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def garbage_client(url: str, port: int, seed: int, stop: trio.Event) -> int:
    """Sends one kind of rubbish after another until told to stop; returns connections made."""
    rng = np.random.default_rng(seed)
    made = 0
    while not stop.is_set():
        made += 1
        kind = made % 5
        try:
            if kind == 0:  # raw bytes instead of HTTP
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(rng.bytes(int(rng.integers(1, 5000))))
                    with trio.move_on_after(0.5):
                        await stream.receive_some(1024)
                continue
            async with open_websocket_url(url, max_message_size=1 << 22) as ws:
                for _ in range(8):
                    if kind == 1:
                        await ws.send_message(rng.bytes(int(rng.integers(1, 3000)) | 1))
                    elif kind == 2:
                        await ws.send_message(json.dumps({"type": "audio", "data": "!!"}))
                    elif kind == 3:
                        await ws.send_message(rng.bytes(3 * 1024 * 1024))  # over the limit
                    else:
                        await ws.send_message("{" * int(rng.integers(1, 5000)))
                    await trio.sleep(0.01)
        except (ConnectionClosed, OSError, trio.BrokenResourceError):
            pass
        await trio.sleep(0.02)
    return made


async def test_garbage_clients_do_not_disturb_a_good_client(nursery, speech_model, clip) -> None:
    config = Config(
        host="127.0.0.1",
        port=0,
        control_socket="",
        max_connections=50,
        connections_per_minute=0,
        max_sessions_per_ip=0,
    )
    server = await nursery.start(functools.partial(serve, config, model=speech_model))
    url = f"ws://127.0.0.1:{server.port}/"
    good_audio = clip("jfk.wav")
    made: list[int] = []

    async def storm() -> StreamResult:
        """Six garbage clients for as long as the good client takes to stream its clip."""
        stop = trio.Event()

        async def attacker(seed: int) -> None:
            made.append(await garbage_client(url, server.port, seed, stop))

        async with trio.open_nursery() as attack:
            for seed in range(6):
                attack.start_soon(attacker, seed)
            result = await stream_audio(url, good_audio)
            stop.set()
        await trio.sleep(1.0)
        return result

    with trio.fail_after(180):
        calm = await stream_audio(url, good_audio)  # the baseline, alone, at real time
        stormy = await storm()
        after_first = rss_mb()
        await storm()
        after_second = rss_mb()
    assert sum(made) >= 60, made  # the storms really happened
    assert [m["text"] for m in stormy.finals] == [m["text"] for m in calm.finals]
    assert stormy.close_code == 1000 and stormy.errors == []
    # Latency: the storm may cost a little CPU, never seconds.
    assert max(stormy.final_latencies()) < max(calm.final_latencies()) + 1.0
    assert not server.sessions  # every garbage session was cleaned up
    # The first storm may warm caches and pools; a leak would grow again with the second.
    assert after_second - after_first < 25, (after_first, after_second)
