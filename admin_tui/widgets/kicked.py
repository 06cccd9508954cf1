"""Clients an operator kicked recently, newest first."""

from __future__ import annotations

import time
from typing import Any

from textual.widgets import DataTable


class KickedList(DataTable):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="none", **kwargs)

    def on_mount(self) -> None:
        self.add_columns("When", "Session", "Peer", "Reason")
        self.border_title = "Kicked clients"

    def show(self, kicked: list[dict[str, Any]]) -> None:
        self.clear()
        for k in reversed(kicked):
            when = time.strftime("%H:%M:%S", time.localtime(k["at"]))
            self.add_row(when, k["session_id"], k["peer"], k["reason"])
        self.border_title = f"Kicked clients ({len(kicked)})"
