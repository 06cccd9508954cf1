"""Live sessions, one row each, sortable; the selected row is the target of a kick."""

from __future__ import annotations

from typing import Any

from textual.widgets import DataTable

from .format import duration, latency

#: (column key, header, value used for sorting)
COLUMNS = [
    ("id", "Session", lambda s: s["session_id"]),
    ("peer", "Peer", lambda s: s["peer"]),
    ("duration", "Duration", lambda s: s["duration"]),
    ("audio", "Audio", lambda s: s["audio_seconds"]),
    ("partial", "Partial", lambda s: s["last_partial_latency"] or 0.0),
    ("final", "Final", lambda s: s["last_final_latency"] or 0.0),
    ("errors", "Errors", lambda s: s["errors"]),
    ("device", "Device", lambda s: s["device"]),
]
SORT_ORDER = [key for key, _, _ in COLUMNS]


class SessionsTable(DataTable):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.sort_key = "duration"
        self._sessions: list[dict[str, Any]] = []

    def on_mount(self) -> None:
        for key, header, _ in COLUMNS:
            self.add_column(header, key=key)
        self.border_title = "Sessions (0)"

    def show(self, sessions: list[dict[str, Any]]) -> None:
        """Replace the rows, keeping the selection on the same session where it still exists."""
        selected = self.selected_session()
        value = dict((k, f) for k, _, f in COLUMNS)[self.sort_key]
        reverse = self.sort_key not in ("id", "peer", "device")
        self._sessions = sorted(sessions, key=value, reverse=reverse)
        self.clear()
        for s in self._sessions:
            self.add_row(
                s["session_id"],
                s["peer"],
                duration(s["duration"]),
                f"{s['audio_seconds']:.1f} s",
                latency(s["last_partial_latency"]),
                latency(s["last_final_latency"]),
                str(s["errors"]),
                s["device"],
                key=s["session_id"],
            )
        self.border_title = f"Sessions ({len(sessions)}) - sorted by {self.sort_key}"
        ids = [s["session_id"] for s in self._sessions]
        if selected in ids:
            self.move_cursor(row=ids.index(selected), animate=False)

    def selected_session(self) -> str | None:
        if not self._sessions or self.cursor_row < 0 or self.cursor_row >= len(self._sessions):
            return None
        return self._sessions[self.cursor_row]["session_id"]

    def next_sort(self) -> str:
        self.sort_key = SORT_ORDER[(SORT_ORDER.index(self.sort_key) + 1) % len(SORT_ORDER)]
        self.show(self._sessions)
        return self.sort_key
