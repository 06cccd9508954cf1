"""Per-device memory gauges with sessions placed and the breaker state, coloured."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.containers import Vertical
from textual.widgets import ProgressBar, Static

from .format import BREAKER_STYLE


class DeviceRow(Vertical):
    def __init__(self, device: str) -> None:
        super().__init__(classes="device-row")
        self.device = device

    def compose(self):
        yield Static(id="device-label")
        yield ProgressBar(total=100, show_eta=False, show_percentage=True, id="device-memory")

    def show(self, gpu: dict[str, Any]) -> None:
        label = Text(f"{gpu['device']}  ", style="bold")
        state = gpu["breaker"]
        label.append(f"{state or 'no breaker'}", style=BREAKER_STYLE.get(state, "dim"))
        label.append(f"  {gpu['sessions']} session(s)")
        total, used = gpu["memory_total_mb"], gpu["memory_used_mb"]
        if total:
            label.append(f"  {used / 1024:.1f}/{total / 1024:.1f} GiB")
        if not gpu["healthy"]:
            label.append("  NOT ANSWERING", style="bold red")
        if state == "open" and gpu.get("breaker_reason"):
            label.append(f"\n  {gpu['breaker_reason']}", style="red")
        self.query_one("#device-label", Static).update(label)
        bar = self.query_one("#device-memory", ProgressBar)
        bar.display = bool(total)
        if total:
            bar.update(progress=100.0 * used / total)


class GpuPanel(Vertical):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = "Devices"

    def show(self, gpus: list[dict[str, Any]]) -> None:
        rows = {row.device: row for row in self.query(DeviceRow)}
        if list(rows) != [g["device"] for g in gpus]:
            self.remove_children()
            rows = {g["device"]: DeviceRow(g["device"]) for g in gpus}
            self.mount(*rows.values())
            self.call_after_refresh(self._fill, gpus)
        else:
            self._fill(gpus)

    def _fill(self, gpus: list[dict[str, Any]]) -> None:
        for row in self.query(DeviceRow):
            for gpu in gpus:
                if gpu["device"] == row.device:
                    row.show(gpu)
