"""The console: a watch worker feeds snapshots to the widgets; keys send operator actions."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.widgets import Footer, Header
from textual.worker import Worker, WorkerState

from .client import Control, ControlUnavailable
from .messages import ActionDone, Disconnected, SnapshotArrived
from .screens import ConfirmScreen, HelpScreen, PromptScreen
from .widgets.gpus import GpuPanel
from .widgets.kicked import KickedList
from .widgets.sessions import SessionsTable
from .widgets.summary import Summary

#: Reconnection backoff: first retry after this long, doubling up to the cap.
RETRY_FIRST = 0.5
RETRY_MAX = 10.0


class AdminApp(App[None]):
    CSS_PATH = "admin.tcss"
    TITLE = "stt-admin"
    BINDINGS = [
        Binding("k", "kick", "Kick"),
        Binding("d", "drain", "Drain"),
        Binding("u", "undrain", "Undrain"),
        Binding("r", "reset_breaker", "Reset breaker"),
        Binding("m", "max_connections", "Max conns"),
        Binding("s", "sort", "Sort"),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, control: Control, *, interval: float = 1.0, clock: bool = True) -> None:
        super().__init__()
        self.control = control
        self.interval = interval
        self.show_clock = clock
        self.snapshot: dict[str, Any] | None = None
        self.connected = False

    def compose(self) -> ComposeResult:
        yield Header(show_clock=self.show_clock)
        with Horizontal(id="top"):
            yield Summary(id="summary")
            yield GpuPanel(id="gpus")
        yield SessionsTable(id="sessions")
        yield KickedList(id="kicked")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = str(self.control.path)
        self.watch_server()

    # -- the one long-lived subscription -----------------------------------------------------
    @work(exclusive=True, group="watch", exit_on_error=False)
    async def watch_server(self) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                async for snap in self.control.watch(self.interval):
                    self.post_message(SnapshotArrived(snap))
                    delay = RETRY_FIRST
                reason = "the server closed the connection"
            except ControlUnavailable as exc:
                reason = str(exc)
            self.post_message(Disconnected(reason, delay))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place worker failures land: shown, never a traceback; the watch restarts."""
        if event.state is not WorkerState.ERROR:
            return
        self.notify(f"{event.worker.name} failed: {event.worker.error}", severity="error")
        if event.worker.group == "watch":
            self.set_timer(RETRY_MAX, self.watch_server)

    def on_snapshot_arrived(self, message: SnapshotArrived) -> None:
        snap = message.snapshot
        try:
            summary, gpus = self.query_one(Summary), self.query_one(GpuPanel)
            sessions, kicked = self.query_one(SessionsTable), self.query_one(KickedList)
        except NoMatches:
            return  # the console is closing: its widgets are gone, a late snapshot is not
        try:
            summary.show(snap)
            gpus.show(snap["gpus"])
            sessions.show(snap["sessions"])
            kicked.show(snap["kicked"])
        except (KeyError, TypeError, ValueError) as exc:
            # A server of another version: say so rather than crash the console.
            self.notify(f"unexpected snapshot from the server ({exc!r})", severity="error")
            return
        if not self.connected:
            self.notify("connected", timeout=2)
        self.connected = True
        self.snapshot = snap

    def on_disconnected(self, message: Disconnected) -> None:
        if self.connected:
            self.notify(f"lost the server: {message.reason}", severity="error", timeout=4)
        self.connected = False
        try:
            summary = self.query_one(Summary)
        except NoMatches:
            return  # the console is closing
        summary.show_disconnected(message.reason, message.retry_in)

    def on_action_done(self, message: ActionDone) -> None:
        self.notify(message.text, severity="information" if message.ok else "error", timeout=4)

    # -- actions -----------------------------------------------------------------------------
    @work(group="action")
    async def send(self, request: dict[str, Any], done: str) -> None:
        try:
            reply = await self.control.request(**request)
        except ControlUnavailable as exc:
            self.post_message(ActionDone(f"{request['cmd']} failed: {exc}", ok=False))
            return
        if reply.get("ok"):
            self.post_message(ActionDone(done, ok=True))
        else:
            self.post_message(
                ActionDone(f"{request['cmd']} failed: {reply.get('error')}", ok=False)
            )

    def action_kick(self) -> None:
        session = self.query_one(SessionsTable).selected_session()
        if session is None:
            self.notify("no session selected", severity="warning")
            return

        def confirmed(yes: bool | None, reason: str) -> None:
            if yes:
                self.send(
                    {"cmd": "kick", "session_id": session, "reason": reason}, f"kicked {session}"
                )

        def got_reason(reason: str | None) -> None:
            if reason is None:
                return
            reason = reason or "kicked by operator"
            self.push_screen(
                ConfirmScreen(f"Kick session {session} ({reason})?"),
                lambda yes: confirmed(yes, reason),
            )

        self.push_screen(
            PromptScreen(f"Reason for kicking {session}:", "kicked by operator"), got_reason
        )

    def action_drain(self) -> None:
        self.push_screen(
            ConfirmScreen("Drain? New sessions are refused; open ones finish and close."),
            lambda yes: yes and self.send({"cmd": "drain"}, "draining"),
        )

    def action_undrain(self) -> None:
        self.send({"cmd": "undrain"}, "accepting sessions again")

    def action_reset_breaker(self) -> None:
        gpus = [g for g in (self.snapshot or {}).get("gpus", []) if g["breaker"] is not None]
        if not gpus:
            self.notify("no GPU with a circuit breaker", severity="warning")
            return

        def reset(index: int) -> None:
            self.push_screen(
                ConfirmScreen(f"Reset the circuit breaker of GPU {index}?"),
                lambda yes: (
                    yes
                    and self.send(
                        {"cmd": "reset_breaker", "gpu": index}, f"breaker of GPU {index} reset"
                    )
                ),
            )

        if len(gpus) == 1:
            reset(gpus[0]["index"])
            return
        default = next((g for g in gpus if g["breaker"] != "closed"), gpus[0])["index"]

        def chosen(answer: str | None) -> None:
            if answer is None:
                return
            if not answer.isdigit():
                self.notify(f"not a GPU index: {answer!r}", severity="error")
                return
            reset(int(answer))

        self.push_screen(
            PromptScreen("Reset the breaker of which GPU (index)?", str(default)), chosen
        )

    def action_max_connections(self) -> None:
        current = str((self.snapshot or {}).get("max_connections", ""))

        def chosen(answer: str | None) -> None:
            if answer is None:
                return
            if not answer.isdigit() or int(answer) <= 0:
                self.notify(
                    f"max_connections must be a positive number, not {answer!r}", severity="error"
                )
                return
            self.send(
                {"cmd": "set_max_connections", "value": int(answer)},
                f"max_connections is now {answer}",
            )

        self.push_screen(PromptScreen("New max_connections:", current), chosen)

    def action_sort(self) -> None:
        key = self.query_one(SessionsTable).next_sort()
        self.notify(f"sorted by {key}", timeout=1.5)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())


def default_socket() -> Path:
    from stt_server.control import DEFAULT_SOCKET, resolve_socket_path

    return resolve_socket_path(DEFAULT_SOCKET)
