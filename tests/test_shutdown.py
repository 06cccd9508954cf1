"""SIGTERM against the real ``stt-server`` process, with a client in the middle of a sentence."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import trio
from trio_websocket import ConnectionClosed, open_websocket_url


async def wait_for_port(port: int, proc: trio.Process) -> None:
    with trio.fail_after(90):  # model load included
        while True:
            assert proc.returncode is None, "server exited during start-up"
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.2)
                continue
            await stream.aclose()
            return


async def test_sigterm_flushes_the_open_utterance_then_closes_1001_and_exits_0(
    clip, free_port
) -> None:
    cmd = [
        sys.executable,
        "-m",
        "stt_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port),
        "--shutdown-grace",
        "20",
    ]
    proc = await trio.lowlevel.open_process(cmd, stderr=subprocess.PIPE)
    try:
        await wait_for_port(free_port, proc)
        audio = clip("cats.wav")
        messages = []
        async with open_websocket_url(f"ws://127.0.0.1:{free_port}/") as ws:
            # 4 s of a sentence at real time, then stop sending: the utterance is still open
            # (the reading goes on without a pause there), and no endpoint has been seen.
            for i in range(0, 4 * 16000, 1600):
                await ws.send_message(audio[i : i + 1600].tobytes())
                await trio.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                try:
                    while True:
                        messages.append(json.loads(await ws.get_message()))
                except ConnectionClosed as exc:
                    close_code = exc.reason.code
        with trio.fail_after(30):
            returncode = await proc.wait()
        stderr = (await proc.stderr.receive_some(1 << 20)).decode() if proc.stderr else ""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    finals = [m for m in messages if m["type"] == "completed"]
    assert finals, messages
    assert "caravan" in " ".join(f["text"] for f in finals).lower()
    assert messages[-1] == {
        "type": "error",
        "code": "going_away",
        "message": "server shutting down",
    }
    assert close_code == 1001
    assert returncode == 0
    assert "SIGTERM" in stderr and "session" in stderr
