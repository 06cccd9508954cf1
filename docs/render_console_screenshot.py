"""Take the README's console screenshot on a busy server (SVG exported by Textual).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/render_console_screenshot.py docs/img/admin-console.svg

Runs a server on two simulated GPUs, 8 clients streaming the shipped clips at real time, kicks
one of them, and saves what stt-admin shows at 120x32 after 20 s.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from pathlib import Path

import trio

from admin_tui.app import AdminApp
from admin_tui.client import ControlClient
from stt_server.config import Config
from stt_server.loadtest.client import read_wav, stream_audio
from stt_server.loadtest.clips import CLIPS_DIR
from stt_server.server import serve

DATA = CLIPS_DIR


async def main(out: Path) -> None:
    socket_path = Path("/tmp/stt-console-shot.sock")
    config = Config(
        host="127.0.0.1",
        port=0,
        control_socket=str(socket_path),
        simulate_gpus="24576:6000,24576:11000",
        max_connections=40,
        max_sessions_per_ip=0,  # eight clients from 127.0.0.1
        log_level="warning",
    )
    clips = [read_wav(DATA / n) for n in ("cats.wav", "lucier.wav", "jfk.wav")]
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve, config))
        url = f"ws://127.0.0.1:{server.port}/"
        for i in range(8):
            nursery.start_soon(functools.partial(stream_audio, url, clips[i % 3]))
            await trio.sleep(0.7)
        await trio.sleep(8)
        server.kick(next(iter(server.sessions)), "abuse report")

        async def shoot() -> None:
            app = AdminApp(ControlClient(socket_path))
            async with app.run_test(size=(120, 32)) as pilot:
                await asyncio.sleep(3)
                app.clear_notifications()
                await pilot.pause()
                app.save_screenshot(filename=out.name, path=str(out.parent))

        await trio.to_thread.run_sync(asyncio.run, shoot())
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img/admin-console.svg")
    trio.run(main, target)
    print(f"wrote {target}")
