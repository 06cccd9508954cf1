"""Messages from the console's workers to its widgets (results travel up only as these)."""

from __future__ import annotations

from typing import Any

from textual.message import Message


class SnapshotArrived(Message):
    """A fresh server snapshot; it replaces the previous one everywhere."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        super().__init__()
        self.snapshot = snapshot


class Disconnected(Message):
    """The server cannot be reached; another try follows in ``retry_in`` seconds."""

    def __init__(self, reason: str, retry_in: float) -> None:
        super().__init__()
        self.reason = reason
        self.retry_in = retry_in


class ActionDone(Message):
    """The outcome of an operator action, to be shown to the operator."""

    def __init__(self, text: str, ok: bool) -> None:
        super().__init__()
        self.text = text
        self.ok = ok
