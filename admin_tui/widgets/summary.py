"""The server in a few lines: connection, uptime, load, refusals, draining."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from .format import duration


class Summary(Static):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = "Server"

    def show(self, snap: dict[str, Any]) -> None:
        text = Text()
        sessions, limit = len(snap["sessions"]), snap["max_connections"]
        if snap["draining"]:
            text.append("DRAINING", style="bold yellow")
            text.append(" - new sessions refused\n")
        else:
            text.append("accepting", style="bold green")
            text.append(" new sessions\n")
        text.append(f"uptime {duration(snap['uptime'])}   sessions {sessions}/{limit}\n")
        text.append(f"accepted {snap['accepted']}   kicked {snap['kicked_total']}\n")
        refused = {k: v for k, v in snap["refused"].items() if v}
        text.append(
            "refused "
            + (", ".join(f"{k} {v}" for k, v in sorted(refused.items())) if refused else "0")
        )
        self.update(text)

    def show_disconnected(self, reason: str, retry_in: float) -> None:
        text = Text("DISCONNECTED", style="bold red")
        text.append(f"\n{reason}\nretrying in {retry_in:.0f} s")
        self.update(text)
