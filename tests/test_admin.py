"""The admin console, driven with Textual's pilot against a real server on a real control socket.

Textual runs on asyncio and these tests (like the server) on Trio, so each console scenario runs
in a worker thread with its own asyncio loop while the server and its clients keep running in
Trio: the console sees exactly what an operator's terminal would.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from textual.widgets import Input
from trio_websocket import ConnectionClosed, open_websocket_url

from admin_tui.app import AdminApp
from admin_tui.client import ControlClient
from admin_tui.messages import Disconnected, SnapshotArrived
from admin_tui.screens import ConfirmScreen, HelpScreen, PromptScreen
from admin_tui.widgets.gpus import GpuPanel
from admin_tui.widgets.kicked import KickedList
from admin_tui.widgets.sessions import SessionsTable
from admin_tui.widgets.summary import Summary
from stt_server.breaker import BreakerState
from stt_server.config import Config
from stt_server.server import serve

from .conftest import wait_until

DEADLINE = 90


async def until(predicate: Callable[[], Any], seconds: float = 20.0) -> None:
    """asyncio-side wait for the console to show something (polls, with a deadline)."""
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def summary_text(app: AdminApp) -> str:
    return str(app.query_one(Summary).content)


async def hold_session(url: str, audio, received: list, stop: trio.Event) -> None:
    """A client that streams real speech at real time, then stays connected until told (or
    until the server closes it: the close code is recorded last)."""
    async with open_websocket_url(url) as ws:

        async def listen() -> None:
            try:
                while True:
                    received.append(json.loads(await ws.get_message()))
            except ConnectionClosed as exc:
                received.append({"close": exc.reason.code})
            inner.cancel_scope.cancel()

        async with trio.open_nursery() as inner:
            inner.start_soon(listen)
            for i in range(0, audio.size, 1600):
                try:
                    await ws.send_message(audio[i : i + 1600].tobytes())
                except ConnectionClosed:
                    break
                await trio.sleep(0.1)
            await stop.wait()
            inner.cancel_scope.cancel()


async def test_console_shows_sessions_and_kicks_drains_and_resets_from_the_keyboard(
    nursery, speech_model, clip, tmp_path
) -> None:
    path = tmp_path / "control.sock"
    config = Config(
        host="127.0.0.1",
        port=0,
        control_socket=str(path),
        simulate_gpus="8000:1000,8000:1000",
        shutdown_grace=5.0,
    )
    shutdown, stop = trio.Event(), trio.Event()
    server = await nursery.start(
        functools.partial(serve, config, model=speech_model, shutdown=shutdown)
    )
    url = f"ws://127.0.0.1:{server.port}/"
    received: dict[str, list] = {"a": [], "b": []}
    audio = clip("cats.wav")[: 16000 * 6]
    for name in received:
        nursery.start_soon(hold_session, url, audio, received[name], stop)
    with trio.fail_after(DEADLINE):
        await wait_until(lambda: len(server.sessions) == 2)
    server.pool.devices[1].breaker.trip("injected for the test")

    async def scenario() -> dict[str, Any]:
        app = AdminApp(ControlClient(path), interval=0.2)
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: app.snapshot is not None and len(app.snapshot["sessions"]) == 2)
            table = app.query_one(SessionsTable)
            assert table.row_count == 2 and "Sessions (2)" in str(table.border_title)
            assert "accepting" in summary_text(app) and "sessions 2/15" in summary_text(app)
            assert len(app.query_one(GpuPanel).children) == 2

            # Sort, and the selection follows the session, not the row.
            target = table.selected_session()
            await pilot.press("s")
            assert table.sort_key == "audio"

            # Kick the selected session with a reason, confirmed.
            target = table.selected_session()
            await pilot.press("k")
            await until(lambda: isinstance(app.screen, PromptScreen))
            app.screen.query_one(Input).value = ""
            await pilot.press(*"spam", "enter")
            await until(lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await until(lambda: any(k["session_id"] == target for k in app.snapshot["kicked"]))
            await until(lambda: app.query_one(KickedList).row_count == 1)

            # Reset GPU 1's breaker: the prompt proposes the GPU whose breaker is not closed.
            await until(lambda: app.snapshot["gpus"][1]["breaker"] == "open")
            await pilot.press("r")
            await until(lambda: isinstance(app.screen, PromptScreen))
            assert app.screen.query_one(Input).value == "1"
            await pilot.press("enter")
            await until(lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await until(lambda: app.snapshot["gpus"][1]["breaker"] == "closed")

            # Change max_connections.
            await pilot.press("m")
            await until(lambda: isinstance(app.screen, PromptScreen))
            app.screen.query_one(Input).value = "7"
            await pilot.press("enter")
            await until(lambda: app.snapshot["max_connections"] == 7)

            # Drain, confirmed: the summary flips.
            await pilot.press("d")
            await until(lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await until(lambda: "DRAINING" in summary_text(app))

            await pilot.press("question_mark")
            await until(lambda: isinstance(app.screen, HelpScreen))
            await pilot.press("escape")
            return {"kicked": target}

    with trio.fail_after(DEADLINE):
        outcome = await trio.to_thread.run_sync(asyncio.run, scenario())
        stop.set()
        await wait_until(lambda: not server.sessions)
    kicked = (
        received["a"]
        if any(m.get("session_id") == outcome["kicked"] for m in received["a"])
        else received["b"]
    )
    assert {"type": "error", "code": "kicked", "message": "spam"} in kicked
    assert kicked[-1] == {"close": 4000}
    assert server.pool.devices[1].breaker.state is BreakerState.CLOSED
    assert server.max_connections == 7 and server.draining
    shutdown.set()


async def test_console_waits_for_an_absent_server_and_connects_when_it_appears(
    nursery, speech_model, tmp_path
) -> None:
    path = tmp_path / "control.sock"
    showing_absent = threading.Event()

    async def scenario() -> str:
        app = AdminApp(ControlClient(path), interval=0.2)
        async with app.run_test(size=(80, 24)):
            await until(lambda: "DISCONNECTED" in summary_text(app))
            absent = summary_text(app)
            showing_absent.set()
            await until(lambda: app.connected and app.snapshot is not None, seconds=60)
            assert "accepting" in summary_text(app)
            return absent

    async def start_server_once_absence_is_shown() -> None:
        await wait_until(showing_absent.is_set)
        config = Config(host="127.0.0.1", port=0, control_socket=str(path))
        await nursery.start(functools.partial(serve, config, model=speech_model))

    with trio.fail_after(DEADLINE):
        nursery.start_soon(start_server_once_absence_is_shown)
        absent = await trio.to_thread.run_sync(asyncio.run, scenario())
    assert "does not exist" in absent and "retrying" in absent


# --- snapshots with deterministic data ----------------------------------------------------------

BUSY = {
    "uptime": 5025.0,
    "draining": False,
    "max_connections": 40,
    "accepted": 1312,
    "refused": {"max_connections": 3, "no_gpu_headroom": 17},
    "kicked_total": 1,
    "sessions": [
        {
            "session_id": f"{i:04x}c0ffee{i:04x}",
            "peer": f"10.1.{i}.{20 + i}:{50000 + i}",
            "duration": 30.0 * i + 7,
            "audio_seconds": 29.5 * i + 6.5,
            "last_partial_latency": 0.21 + 0.01 * i,
            "last_final_latency": 0.62 + 0.02 * i,
            "errors": i % 3,
            "device": f"cuda:{i % 2}",
        }
        for i in range(1, 9)
    ],
    "gpus": [
        {
            "device": "cuda:0",
            "index": 0,
            "sessions": 4,
            "memory_used_mb": 14336.0,
            "memory_total_mb": 24576.0,
            "healthy": True,
            "breaker": "closed",
            "breaker_reason": None,
        },
        {
            "device": "cuda:1",
            "index": 1,
            "sessions": 4,
            "memory_used_mb": 21504.0,
            "memory_total_mb": 24576.0,
            "healthy": True,
            "breaker": "open",
            "breaker_reason": "memory 88% over the 85% threshold",
        },
    ],
    "kicked": [
        {
            "session_id": "00ffbadc0de00ff",
            "peer": "203.0.113.9:41234",
            "reason": "abuse report",
            "at": 1764000000.0,
        }
    ],
}


class CannedControl:
    """The Control interface with one fixed snapshot: for pictures that never change."""

    path = Path("/run/stt-server/control.sock")

    async def request(self, **request: Any) -> dict[str, Any]:
        return {"ok": True}

    async def watch(self, interval: float) -> AsyncIterator[dict[str, Any]]:
        yield BUSY
        await asyncio.Event().wait()


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


async def settle(pilot) -> None:
    await until(lambda: pilot.app.snapshot is not None)
    pilot.app.clear_notifications()
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_main_screen_snapshot(snap_compare, utc, size) -> None:
    app = AdminApp(CannedControl(), clock=False)
    assert snap_compare(app, terminal_size=size, run_before=settle)


class BrokenControl(CannedControl):
    """A server that answers with snapshots of a shape the console does not know."""

    async def watch(self, interval: float) -> AsyncIterator[dict[str, Any]]:
        yield {"sessions": "not a list"}
        await asyncio.Event().wait()


async def test_an_unexpected_snapshot_is_reported_not_a_crash() -> None:
    async def scenario() -> list[str]:
        app = AdminApp(BrokenControl(), clock=False)
        async with app.run_test() as pilot:
            await until(lambda: app._notifications)
            await pilot.pause()
            assert app.is_running and not app.connected
            return [n.message for n in app._notifications]

    notes = await trio.to_thread.run_sync(asyncio.run, scenario())
    assert any("unexpected snapshot" in n for n in notes)


async def test_a_snapshot_or_disconnect_that_arrives_while_the_console_closes_is_dropped() -> None:
    """The watch posts a snapshot every interval; one can be handled after the console has
    begun to close and its widgets are gone (seen in CI). It is dropped, not a crash."""

    async def scenario() -> bool:
        app = AdminApp(CannedControl(), clock=False)
        async with app.run_test() as pilot:
            await until(lambda: app.snapshot is not None)
            await app.query_one(Summary).remove()
            await pilot.pause()
            app.on_snapshot_arrived(SnapshotArrived(BUSY))
            app.on_disconnected(Disconnected("the server closed the connection", 1.0))
            await pilot.pause()
            return app.is_running

    assert await trio.to_thread.run_sync(asyncio.run, scenario())
