"""The chat box of ``kedit tui``: a multiline input with a send key, command completion and a
history kept on disk, one JSON string a line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from textual.binding import Binding
from textual.widgets import TextArea


class ChatInput(TextArea):
    """Multiline input: ctrl+j or alt+enter sends, enter adds a line, tab completes a command,
    up on the first line and down on the last walk the history."""

    BINDINGS = [
        Binding("ctrl+j", "send", "send", priority=True),
        Binding("alt+enter", "send", "send", show=False, priority=True),
        Binding("tab", "complete", "complete", show=False, priority=True),
    ]

    def __init__(self, history_file: Path | None = None, **kwargs: Any) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, **kwargs)
        self.history_file = history_file
        self.past_lines: list[str] = []
        if history_file is not None and history_file.is_file():
            for raw in history_file.read_text(encoding="utf-8").splitlines():
                try:
                    self.past_lines.append(str(json.loads(raw)))
                except ValueError:
                    continue
        self._back = 0  # how far back in history the text is; 0 is the line being typed
        self._draft = ""

    async def _on_key(self, event) -> None:
        # A terminal's ctrl+j arrives as the character "\n", which TextArea would insert
        # before any binding saw it.
        if event.key in ("ctrl+j", "alt+enter"):
            event.prevent_default()
            event.stop()
            self.action_send()
            return
        await super()._on_key(event)

    def remember(self, line: str) -> None:
        if self.past_lines and self.past_lines[-1] == line:
            return
        self.past_lines.append(line)
        if self.history_file is not None:
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            with self.history_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    def action_send(self) -> None:
        text = self.text.strip()
        if text:
            self.app.submit(text)
            self.remember(text)
        self._back = 0
        self.text = ""

    def action_complete(self) -> None:
        line = self.text
        candidates = self.app.complete(line)
        if not candidates:
            return
        current = "" if line[-1:].isspace() else line.split()[-1] if line.split() else ""
        common = candidates[0]
        for c in candidates[1:]:
            while not c.startswith(common):
                common = common[:-1]
        if len(common) > len(current):
            self.text = line[: len(line) - len(current)] + common + (" " if len(candidates) == 1 else "")
            self.move_cursor(self.document.end)
        if len(candidates) > 1:
            self.app.notify("  ".join(candidates[:20]), title="completions", timeout=4)

    def _walk(self, delta: int) -> None:
        if self._back == 0:
            self._draft = self.text
        self._back = min(max(self._back + delta, 0), len(self.past_lines))
        self.text = self._draft if self._back == 0 else self.past_lines[-self._back]
        self.move_cursor(self.document.end)

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.cursor_location[0] == 0 and self.past_lines:
            self._walk(1)
        else:
            super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if not select and self.cursor_location[0] == self.document.line_count - 1 and self._back:
            self._walk(-1)
        else:
            super().action_cursor_down(select)
