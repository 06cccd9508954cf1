"""Modal screens: confirmation for destructive actions, a one-line prompt, and help."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question)
            yield Label("[b]y[/b] yes    [b]n[/b] no", classes="hint")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class PromptScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, default: str = "") -> None:
        super().__init__()
        self.question = question
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question)
            yield Input(value=self.default, id="answer")
            yield Label("[b]enter[/b] ok    [b]escape[/b] cancel", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)


HELP = """\
[b]stt-admin[/b]: live view of a stt-server, over its control socket

  [b]up/down[/b]  select a session
  [b]k[/b]        kick the selected session (asks a reason, then confirmation)
  [b]d[/b]        drain: refuse new sessions, let open ones finish (confirmation)
  [b]u[/b]        undrain: accept new sessions again
  [b]r[/b]        reset a GPU's circuit breaker (confirmation)
  [b]m[/b]        change max_connections
  [b]s[/b]        sort sessions by the next column
  [b]?[/b]        this help
  [b]q[/b]        quit

Updates arrive every second; when the server goes away the console says so and
reconnects by itself.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help"):
            yield Static(HELP)
