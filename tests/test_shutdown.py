"""SIGTERM against the real ``stt-server`` process, with a client in the middle of a sentence."""

from __future__ import annotations

import json
import signal
import subprocess

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from stt_server.loadtest.local import server_command


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


async def test_sigterm_lets_the_speaker_finish_the_sentence_then_closes_1001_and_exits_0(
    clip, free_port, tmp_path
) -> None:
    control = tmp_path / "control.sock"
    cmd = server_command(free_port, "--shutdown-grace", "30", "--control-socket", str(control))
    proc = await trio.lowlevel.open_process(cmd, stderr=subprocess.PIPE)
    messages: list[dict] = []
    close_code = None
    try:
        await wait_for_port(free_port, proc)
        assert control.is_socket()
        audio = clip("cats.wav")
        async with open_websocket_url(f"ws://127.0.0.1:{free_port}/") as ws:

            async def listen() -> None:
                nonlocal close_code
                try:
                    while True:
                        messages.append(json.loads(await ws.get_message()))
                except ConnectionClosed as exc:
                    close_code = exc.reason.code

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(listen)
                    # Real-time speech; SIGTERM 4 s in, in the middle of the first sentence.
                    for i in range(0, audio.size, 1600):
                        if i == 4 * 16000:
                            proc.send_signal(signal.SIGTERM)
                        try:
                            await ws.send_message(audio[i : i + 1600].tobytes())
                        except ConnectionClosed:
                            break
                        await trio.sleep(0.1)
        with trio.fail_after(30):
            returncode = await proc.wait()
        stderr = (await proc.stderr.receive_some(1 << 20)).decode() if proc.stderr else ""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    finals = [m for m in messages if m["type"] == "completed"]
    assert len(finals) == 1, messages  # the sentence under way, and nothing after it
    assert "caravan" in finals[0]["text"].lower()
    assert messages[-1] == {"type": "error", "code": "going_away", "message": "server draining"}
    assert close_code == 1001
    assert returncode == 0
    assert "SIGTERM" in stderr and "session" in stderr
    assert not control.exists()  # the control socket is cleaned up on exit
