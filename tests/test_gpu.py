"""GPU admission, placement and breakers, end to end with simulated GPUs over real sockets.

Simulated devices run the real model on the CPU, so the sessions here really transcribe; what is
simulated is only what NVML would report, and (in one test) a CUDA out-of-memory error.
"""

from __future__ import annotations

import json
import threading
import types
from contextlib import AsyncExitStack

import attrs
import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from stt_server.admission import Decision, RefusalReason
from stt_server.breaker import BreakerState, CircuitBreaker
from stt_server.config import Config
from stt_server.devices import CPU_MAX_BATCH_AUDIO, open_pool
from stt_server.engine import TranscribeOptions
from stt_server.gpu import GpuMonitor, GpuReading, GpuSource, NvmlSource, NvmlUnavailable

from .conftest import receive_until_closed, wait_until

DEADLINE = 60


def gpus(spec: str, **extra) -> dict:
    return {"simulate_gpus": spec, "check_interval": 3600.0, **extra}


async def open_session(stack: AsyncExitStack, url: str) -> tuple:
    ws = await stack.enter_async_context(open_websocket_url(url))
    first = json.loads(await ws.get_message())
    return ws, first


async def refusal(url: str) -> tuple[dict, int | None]:
    async with open_websocket_url(url) as ws:
        (message,), code = await receive_until_closed(ws)
    return message, code


def placements(server) -> dict[str, int]:
    return {d.label: d.sessions for d in server.pool.statistics()}


@pytest.mark.parametrize("server_config", [gpus("3000:0")], indirect=True)
async def test_one_3000_mb_gpu_takes_four_sessions_and_refuses_the_fifth(running_server) -> None:
    server = running_server.server
    with trio.fail_after(DEADLINE):
        async with AsyncExitStack() as stack:
            for _ in range(4):
                _, first = await open_session(stack, running_server.url)
                assert first["type"] == "session"
            message, code = await refusal(running_server.url)
            assert code == 1013
            assert message["code"] == "server_busy" and message["retry_after"] > 0
            assert "no GPU has room" in message["message"]
            assert server.statistics().refused == {"no_gpu_headroom": 1}
            assert placements(server) == {"sim:0": 4}
        # Sessions that leave give their budget back.
        await wait_until(lambda: placements(server) == {"sim:0": 0})
        async with AsyncExitStack() as stack:
            _, first = await open_session(stack, running_server.url)
            assert first["type"] == "session"


@pytest.mark.parametrize("server_config", [gpus("24576:2000,24576:20000")], indirect=True)
async def test_sessions_are_placed_on_the_most_headroom_and_transcribe_there(
    running_server, clip
) -> None:
    server = running_server.server
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            assert placements(server) == {"sim:0": 1, "sim:1": 0}
            (session,) = server.statistics().sessions
            assert session.device == "sim:0"
            await ws.send_message(clip("ldc93s1.wav").tobytes())
            await ws.send_message('{"type":"end"}')
            texts = []
            try:
                while True:
                    m = json.loads(await ws.get_message())
                    if m["type"] == "completed":
                        texts.append(m["text"])
            except ConnectionClosed:
                pass
    assert "suit" in " ".join(texts).lower()
    assert server.pool.devices[0].engine.statistics().finals_done == 1
    assert server.pool.devices[1].engine.statistics().finals_done == 0


@pytest.mark.parametrize("server_config", [gpus("3000:0")], indirect=True)
async def test_memory_rising_between_polls_closes_admission(running_server) -> None:
    server = running_server.server
    source = server.pool.monitor.source
    with trio.fail_after(DEADLINE):
        async with AsyncExitStack() as stack:
            await open_session(stack, running_server.url)
            # Another process grabs memory; no poll is due for an hour, yet the next admission
            # reads afresh and sees it.
            source.set_used(0, 1700)
            message, code = await refusal(running_server.url)
            assert code == 1013 and "no GPU has room" in message["message"]
            source.set_used(0, 0)
            _, first = await open_session(stack, running_server.url)
            assert first["type"] == "session"


@attrs.define
class ManualClock:
    now: float

    def __call__(self) -> float:
        return self.now


@attrs.define
class OomSwitch:
    """Wraps the real model on one simulated device; raises CUDA's OOM while ``on``."""

    inner: object
    on: bool = False
    name: str = "tiny.en"

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> str:
        if self.on:
            raise RuntimeError("CUDA failed with error out of memory")
        return self.inner.transcribe(audio, options)


@pytest.mark.parametrize(
    "server_config", [gpus("24576:0,24576:8000", breaker_cooldown=30.0)], indirect=True
)
async def test_out_of_memory_opens_the_breaker_moves_the_session_and_a_trial_recovers(
    running_server, clip
) -> None:
    server = running_server.server
    gpu0 = server.pool.devices[0]
    # GPU 0's breaker on a clock the test moves: the cool-down ends when the test says, not
    # when a busy machine happens to take longer than it over the retried final.
    clock = ManualClock(trio.current_time())
    gpu0.breaker = CircuitBreaker("sim:0", failure_threshold=3, cooldown=30.0, clock=clock)
    switch = OomSwitch(gpu0.engine.model, on=True)
    gpu0.engine.model = switch
    messages = []
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            assert placements(server) == {"sim:0": 1, "sim:1": 0}
            await ws.send_message(clip("ldc93s1.wav").tobytes())
            await ws.send_message('{"type":"flush"}')
            while not any(m["type"] == "completed" for m in messages):
                messages.append(json.loads(await ws.get_message()))
            assert gpu0.breaker.state is BreakerState.OPEN
            assert placements(server) == {"sim:0": 0, "sim:1": 1}
            # While open, new sessions go to the other GPU.
            async with open_websocket_url(running_server.url) as other:
                await other.get_message()
                assert placements(server) == {"sim:0": 0, "sim:1": 2}
        notice = next(m for m in messages if m["type"] == "error")
        assert notice["code"] == "device_changed" and "sim:1" in notice["message"]
        final = next(m for m in messages if m["type"] == "completed")
        assert "suit" in final["text"].lower()  # the final was not lost to the failure

        # After the cool-down, one trial session goes to GPU 0 and its success closes the breaker.
        switch.on = False
        clock.now += 30.0
        async with open_websocket_url(running_server.url) as trial:
            await trial.get_message()
            assert gpu0.breaker.state is BreakerState.HALF_OPEN
            assert placements(server)["sim:0"] == 1
            await trial.send_message(clip("ldc93s1.wav").tobytes())
            await trial.send_message('{"type":"end"}')
            with pytest.raises(ConnectionClosed):
                while True:
                    await trial.get_message()
    assert gpu0.breaker.state is BreakerState.CLOSED
    states = [(t.source.value, t.target.value) for t in gpu0.breaker.history]
    assert states == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


@pytest.mark.parametrize("server_config", [gpus("8000:0,8000:0")], indirect=True)
async def test_all_gpus_down_gives_server_busy_and_the_sessions_are_closed_cleanly(
    running_server, clip
) -> None:
    server = running_server.server
    source = server.pool.monitor.source
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            await ws.send_message(clip("ldc93s1.wav").tobytes())
            # Once the server holds that speech, a final is owed for it whatever happens next.
            await wait_until(lambda: server.statistics().sessions[0].audio_seconds > 2.5)
            source.set_healthy(0, False)
            source.set_healthy(1, False)
            message, code = await refusal(running_server.url)
            # The open session's speech still gets its final, then a clean 1013.
            received, close = await receive_until_closed(ws)
    assert code == 1013 and message["code"] == "server_busy"
    assert "no GPU is available" in message["message"]
    assert server.statistics().refused == {"gpus_unavailable": 1}
    assert all(d.breaker.state is BreakerState.OPEN for d in server.pool.devices)
    kinds = [m["type"] for m in received]
    assert "completed" in kinds and received[-1]["code"] == "server_busy"
    assert close == 1013


class NoNvml:
    """What NvmlSource.open does on a host without a driver."""

    def __call__(self) -> GpuSource:
        raise NvmlUnavailable("no driver (the test says so)")


@attrs.frozen
class FakeNvml:
    """An opened NVML with fixed readings: what NvmlSource.open returns on a GPU host."""

    readings: tuple[GpuReading, ...]
    real: bool = True

    def read(self) -> list[GpuReading]:
        return list(self.readings)


@attrs.define
class Instant:
    """A model that answers at once, or fails as CUDA does when out of memory while ``oom``."""

    name: str = "instant"
    oom: bool = False

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> str:
        if self.oom:
            raise RuntimeError("CUDA failed with error out of memory")
        return "ok"


def no_cuda() -> int:
    return 0


async def test_without_gpus_the_cpu_engine_serves_and_says_so(caplog) -> None:
    # The host's own GPUs, if any, play no part: NVML and CUDA are given, not looked up.
    caplog.set_level("INFO")
    pool = await open_pool(Config(), Instant(), nvml=NoNvml(), cuda_devices=no_cuda)
    assert not pool.gpu_mode
    assert [d.label for d in pool.devices] == ["cpu"]
    assert "NVML unavailable (no driver (the test says so))" in caplog.text
    assert "running inference on the CPU" in caplog.text
    # On a CPU a batch of finals saves nothing and a long batch of partials holds a worker.
    engine = pool.devices[0].engine
    assert not engine.batch_finals and engine.max_batch_audio == CPU_MAX_BATCH_AUDIO
    simulated = await open_pool(Config(**gpus("8000:0")), Instant())  # GPUs whose work runs here
    assert not simulated.devices[0].engine.batch_finals
    off = await open_pool(
        Config(enable_gpu_monitoring=False, device="cpu"),
        Instant(),
        nvml=lambda: FakeNvml((GpuReading(0, "H100", 81559, 0),)),
        cuda_devices=lambda: 1,
    )
    assert not off.gpu_mode and [d.label for d in off.devices] == ["cpu"]


async def test_with_nvml_gpus_each_gets_an_engine_a_breaker_and_vram_admission(caplog) -> None:
    caplog.set_level("INFO")
    nvml = FakeNvml((GpuReading(0, "H100", 81559, 600), GpuReading(1, "H100", 81559, 40000)))
    pool = await open_pool(Config(), Instant(), nvml=lambda: nvml, cuda_devices=no_cuda)
    assert pool.gpu_mode and pool.monitor.source is nvml
    assert [(d.label, d.index) for d in pool.devices] == [("cuda:0", 0), ("cuda:1", 1)]
    assert all(d.breaker is not None for d in pool.devices)
    assert "GPU monitoring on 2 GPU(s): 0=H100 81559 MB, 1=H100 81559 MB" in caplog.text
    # On CUDA batching is the main lever: every kind batches, without a bound in seconds.
    assert all(d.engine.batch_finals and d.engine.max_batch_audio is None for d in pool.devices)
    # NVML present but monitoring off: CUDA device 0, no VRAM admission.
    off = await open_pool(
        Config(enable_gpu_monitoring=False), Instant(), nvml=lambda: nvml, cuda_devices=lambda: 2
    )
    assert not off.gpu_mode and [d.label for d in off.devices] == ["cuda:0"]


FINAL = TranscribeOptions(final=True)


async def test_a_silent_trial_session_does_not_keep_the_breaker_half_open(mock_clock) -> None:
    """Through the device pool on trio's clock, moved by hand: the trial granted after the
    cool-down goes to a session that never speaks; one cool-down later the next session gets
    the trial, and its success closes the breaker."""
    model = Instant(oom=True)
    pool = await open_pool(Config(**gpus("8000:0", breaker_cooldown=10.0)), model)
    device = pool.devices[0]
    audio = np.zeros(1600, dtype=np.float32)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        assert await pool.admit("first") is device
        with pytest.raises(RuntimeError, match="out of memory"):
            await device.engine.transcribe(audio, FINAL, owner="first")
        assert device.breaker.state is BreakerState.OPEN
        mock_clock.jump(10)
        assert await pool.admit("silent") is device  # the trial; it never sends speech
        assert device.breaker.state is BreakerState.HALF_OPEN
        refused = await pool.admit("second")
        assert isinstance(refused, Decision)
        assert refused.refusal is RefusalReason.GPUS_UNAVAILABLE
        mock_clock.jump(9.9)
        assert isinstance(await pool.admit("third"), Decision)
        assert not pool.any_device_available()
        mock_clock.jump(0.1)
        assert pool.any_device_available()  # /health would say so again
        model.oom = False
        assert await pool.admit("speaker") is device
        assert device.sessions == {"first", "silent", "speaker"}
        await device.engine.transcribe(audio, FINAL, owner="speaker")
        assert device.breaker.state is BreakerState.CLOSED
        nursery.cancel_scope.cancel()


async def test_a_trial_session_that_leaves_silent_frees_the_trial_at_once(mock_clock) -> None:
    pool = await open_pool(Config(**gpus("8000:0", breaker_cooldown=10.0)), Instant())
    device = pool.devices[0]
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        device.breaker.trip("memory 90% over the 85% threshold")
        mock_clock.jump(10)
        assert await pool.admit("trial") is device
        assert isinstance(await pool.admit("waiting"), Decision)
        pool.release("trial", device)  # hung up before saying anything
        assert await pool.admit("next") is device  # no need to wait out the deadline
        assert device.breaker.state is BreakerState.HALF_OPEN
        assert isinstance(await pool.admit("after"), Decision)  # "next" holds the trial now
        nursery.cancel_scope.cancel()


class FakeNvmlError(Exception):
    pass


def fake_pynvml(devices: list[dict]) -> types.SimpleNamespace:
    """Just the pynvml calls NvmlSource makes, with chosen answers and failures."""

    def get(index, key):
        value = devices[index][key]
        if isinstance(value, Exception):
            raise value
        return value

    return types.SimpleNamespace(
        NVMLError=FakeNvmlError,
        nvmlDeviceGetHandleByIndex=lambda i: get(i, "handle") if "handle" in devices[i] else i,
        nvmlDeviceGetMemoryInfo=lambda h: get(h, "memory"),
        nvmlDeviceGetName=lambda h: get(h, "name"),
        nvmlDeviceGetUtilizationRates=lambda h: get(h, "util"),
        nvmlShutdown=lambda: None,
    )


def test_nvml_readings_and_errors_per_device() -> None:
    mib = 1024 * 1024
    source = NvmlSource()
    source._nvml = fake_pynvml(
        [
            {
                "memory": types.SimpleNamespace(total=24576 * mib, used=2048 * mib),
                "name": b"H100",
                "util": types.SimpleNamespace(gpu=37),
            },
            {
                "memory": types.SimpleNamespace(total=8192 * mib, used=0),
                "name": "MIG 1g",
                "util": FakeNvmlError("Not Supported"),
            },
            {"handle": FakeNvmlError("GPU is lost")},
        ]
    )
    source._count = 3
    a, b, c = source.read()
    assert (a.name, a.total_mb, a.used_mb, a.utilization, a.healthy) == (
        "H100",
        24576,
        2048,
        37.0,
        True,
    )
    assert b.healthy and b.utilization is None
    assert not c.healthy and "GPU is lost" in c.error


async def test_a_hung_gpu_query_marks_devices_unhealthy_instead_of_blocking() -> None:
    release = threading.Event()

    class Hanging:
        real = False
        calls = 0

        def read(self) -> list[GpuReading]:
            self.calls += 1
            if self.calls > 1:
                release.wait(10)
            return [GpuReading(0, "g", 8000, 0)]

    monitor = GpuMonitor(Hanging(), interval=3600, read_timeout=0.2)
    try:
        assert (await monitor.refresh())[0].healthy
        with trio.fail_after(5):
            readings = await monitor.refresh()
        assert not readings[0].healthy and readings[0].error == "query timed out"
    finally:
        release.set()
