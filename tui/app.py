"""``kedit tui``: the Textual app. A chat on the left; Edits, Steering and Probes on the right.

Everything the app does to the model is a command line of the engine's registry run by
``Session.run``, the same path the REPL and recipes take: the panels build lines such as
``/edit "..." -> "..." --method grace`` or ``/steer set mood 1.5`` and show the events.
Every engine call goes through ``App.engine``: a thread worker that hands each event to
the UI thread; a failure becomes a notification, never a crash.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Header, Input, Label, Markdown, ProgressBar, Switch, TabbedContent, TabPane
from textual.worker import Worker, WorkerState, get_current_worker

from kedit.engine import events as ev
from kedit.engine.commands import quote
from kedit.engine.errors import KeditError
from kedit.engine.paths import data_dir
from kedit.tui.chat_input import ChatInput
from kedit.tui.panels import EditsPanel, ProbesPanel, SteeringPanel, SteerRow
from kedit.tui.slider import Slider

TOKEN_BATCH_S = 0.05  # streamed tokens reach the UI at most this often


def memory_in_use(session) -> str:
    """The model's weights and buffers, plus what CUDA holds beyond them when on a GPU."""
    import torch

    model = session.model
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    text = f"{held / 2**20:,.0f} MiB weights"
    if torch.cuda.is_available() and str(session.handle.device).startswith("cuda"):
        text += f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB CUDA"
    return text


def header_line(session) -> str:
    h = session.handle
    quant = f" {h.quant}" if h.quant else ""
    return f"{h.name} · {str(h.dtype).removeprefix('torch.')}{quant} · {h.device} · {memory_in_use(session)}"


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Markdown(self.text)


class KeditApp(App[None]):
    """The workbench. Give it a Session, or a function that opens one (run in a worker)."""

    CSS_PATH = "kedit.tcss"
    TITLE = "kedit"
    BINDINGS = [
        Binding("escape", "stop", "stop reply"),
        Binding("f5", "copy_reply", "copy reply"),
        Binding("f1", "help", "help"),
        Binding("f2", "panel('edits')", "edits"),
        Binding("f3", "panel('steering')", "steering"),
        Binding("f4", "panel('probes')", "probes"),
        Binding("ctrl+q", "quit", "quit", priority=True),
    ]

    def __init__(self, session=None, opener: Callable[[], Any] | None = None, history_file: Path | None = None) -> None:
        super().__init__()
        if session is None and opener is None:
            raise ValueError("KeditApp needs a session or an opener")
        self.session, self._opener = session, opener
        self._history_file = history_file if history_file is not None else data_dir() / "tui-history"
        self.last_reply = ""
        self._reply_box: Markdown | None = None
        self._stream: Any = None
        self._turns = threading.Condition()
        self._tickets = self._turn = 0

    # -- layout --------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                yield VerticalScroll(id="chat-log")
                with Horizontal(id="progress"):
                    yield Label("", id="progress-label")
                    yield ProgressBar(show_eta=False)
                yield ChatInput(
                    self._history_file, id="chat-input", placeholder="chat, or /command · ctrl+j sends · tab completes"
                )
            with TabbedContent(id="panels", initial="edits"):
                with TabPane("Edits", id="edits"):
                    yield EditsPanel(id="edits-panel")
                with TabPane("Steering", id="steering"):
                    yield SteeringPanel(id="steering-panel")
                with TabPane("Probes", id="probes"):
                    yield ProbesPanel(id="probes-panel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#chat-log", VerticalScroll).anchor()
        self.query_one("#progress").display = False
        self.query_one(ChatInput).focus()
        if self.session is None:
            self.sub_title = "loading the model …"
            self._show_progress("loading the model", None, None)
            self.engine(self._open, done=self._on_loaded)
        else:
            self._on_loaded()
            self.call_later(self.refresh_panels)

    def _open(self, emit: Callable[[ev.Event], None]) -> None:
        self.session = self._opener()

    def _on_loaded(self) -> None:
        if self.session is None:  # loading failed: the notification says why
            self.sub_title = "no model loaded"
            return
        self._hide_progress()
        self.sub_title = header_line(self.session)
        self.log_line(f"{self.session.handle.describe()}\n\nType to chat, /help for commands, F1 for keys.")

    # -- the one pattern for engine work ---------------------------------------------------

    def engine(self, job: Callable[[Callable[[ev.Event], None]], Any], done: Callable[[], Any] | None = None) -> Worker:
        """Run ``job(emit)`` in a thread worker; ``emit`` shows an event on the UI thread.
        ``done`` runs on the UI thread afterwards, whether the job worked or not. Jobs run
        one at a time in the order they were asked for, so two slider moves land in order."""
        ticket = self._tickets
        self._tickets += 1
        return self._engine_worker(job, done, ticket)

    @work(thread=True, exit_on_error=False, group="engine")
    def _engine_worker(
        self, job: Callable[[Callable[[ev.Event], None]], Any], done: Callable[[], Any] | None, ticket: int
    ) -> Any:
        worker = get_current_worker()
        with self._turns:
            while self._turn != ticket:
                if worker.is_cancelled:
                    return None
                self._turns.wait(0.1)
        try:
            return job(lambda event: self.call_from_thread(self.show_event, event))
        finally:
            with self._turns:
                self._turn += 1
                self._turns.notify_all()
            if not worker.is_cancelled:
                try:
                    if done is not None:
                        self.call_from_thread(done)
                    if self.session is not None:
                        self.call_from_thread(self.refresh_panels)
                except RuntimeError:  # the app closed meanwhile
                    pass

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group == "engine" and event.state == WorkerState.ERROR:
            error = event.worker.error
            text = error.message if isinstance(error, KeditError) else f"{type(error).__name__}: {error}"
            self.notify(text, title="the engine failed", severity="error", timeout=10)
            self._hide_progress()

    def run_line(
        self, line: str, on_event: Callable[[ev.Event], None] | None = None, done: Callable[[], Any] | None = None
    ) -> Worker:
        """Run one chat line or slash command through ``Session.run`` in the engine worker."""

        def job(emit: Callable[[ev.Event], None]) -> None:
            pending: list[str] = []  # tokens gathered since the last hand-over
            last = time.monotonic()
            for event in self.session.run(line):
                if isinstance(event, ev.Token):
                    # At hundreds of tokens a second, one UI update per token would starve
                    # the keyboard: hand them over in batches, at most TOKEN_BATCH_S apart.
                    pending.append(event.text)
                    if time.monotonic() - last < TOKEN_BATCH_S:
                        continue
                    event = ev.Token("".join(pending))
                elif pending:
                    emit(ev.Token("".join(pending)))
                pending.clear()
                last = time.monotonic()
                if on_event is not None and isinstance(event, ev.Table):
                    emit(ev.Info(event.title))  # the panel shows the rows; the chat log, what happened
                    self.call_from_thread(on_event, event)
                    continue
                emit(event)
            if pending:
                emit(ev.Token("".join(pending)))

        return self.engine(job, done)

    # -- showing events -----------------------------------------------------------------

    def log_line(self, text: str, classes: str = "note") -> Markdown:
        box = Markdown(text, classes=classes)
        self.query_one("#chat-log", VerticalScroll).mount(box)
        return box

    async def show_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.Progress):
            self._show_progress(event.label, event.done, event.total)
            return
        self._hide_progress()
        if isinstance(event, ev.Token):
            if self._reply_box is None:
                self._reply_box = self.log_line("", classes="assistant")
                self._stream = Markdown.get_stream(self._reply_box)
            await self._stream.write(event.text)
        elif isinstance(event, ev.Reply):
            if self._stream is not None:
                await self._stream.stop()
            if self._reply_box is None:
                self.log_line(event.text, classes="assistant")
            elif event.stopped:
                self.log_line("*[stopped]*")
            self.last_reply = event.text
            self._reply_box = self._stream = None
        elif isinstance(event, ev.Error):
            self.log_line(f"**error:** {event.message}", classes="error")
            self.notify(event.message, severity="error", timeout=8)
        elif isinstance(event, ev.Quit):
            self.exit()
        else:
            text = ev.event_text(event)
            if text is not None:
                # tables and charts keep their columns; one-line messages read as prose
                self.log_line(f"```\n{text}\n```" if "\n" in text else text)

    def _show_progress(self, label: str, done: int | None, total: int | None) -> None:
        self.query_one("#progress").display = True
        self.query_one("#progress-label", Label).update(label)
        self.query_one("#progress ProgressBar", ProgressBar).update(total=total, progress=done or 0)

    def _hide_progress(self) -> None:
        self.query_one("#progress").display = False

    async def refresh_panels(self) -> None:
        self.query_one(EditsPanel).show(self.session.edits)
        await self.query_one(SteeringPanel).show(dict(self.session.steering.slots))

    # -- input ----------------------------------------------------------------------------

    def submit(self, text: str) -> None:
        if self.session is None:
            loading = self.sub_title.startswith("loading")
            self.notify(
                "the model is still loading"
                if loading
                else "no model is loaded: see the error above, then restart with --model",
                severity="warning",
            )
            return
        self.log_line(("" if text.startswith("/") else "**you:** ") + text.replace("\n", "  \n"), classes="user")
        self.run_line(text)

    def complete(self, line: str) -> list[str]:
        if self.session is None:
            return []
        return self.session.registry.complete(line, self.session)

    # -- actions -----------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.session is not None and self.session.generating:
            self.session.stop()

    def action_copy_reply(self) -> None:
        if not self.last_reply:
            self.notify("no reply to copy yet", severity="warning")
            return
        self.copy_to_clipboard(self.last_reply)
        self.notify("copied the last reply")

    def action_help(self) -> None:
        keys = "\n".join(f"- **{b.key_display or b.key}**: {b.description}" for b in self.BINDINGS)
        rows = self.session.registry.help_rows() if self.session is not None else []
        commands = "\n".join(f"- `{usage}`: {summary}" for usage, summary in rows)
        self.push_screen(
            HelpScreen(
                f"# kedit\n\n## Keys\n\n{keys}\n- **ctrl+j / alt+enter**: send · **tab**: complete · "
                f"**up/down**: history\n\n## Commands\n\n{commands}\n\nEsc closes this help."
            )
        )

    def action_panel(self, name: str) -> None:
        self.query_one(TabbedContent).active = name

    # -- panels ------------------------------------------------------------------------------

    @on(Button.Pressed, "#edit-apply")
    def _edit_apply(self) -> None:
        line = self.query_one(EditsPanel).edit_line()
        if line is not None:
            self.log_line(line, classes="user")
            self.run_line(line)

    @on(Button.Pressed, "#edit-from-file")
    def _edit_from_file(self) -> None:
        line = self.query_one(EditsPanel).file_line()
        if line is not None:
            self.log_line(line, classes="user")
            self.run_line(line)

    def _on_selected_edit(self, command: str, doing: str) -> None:
        chosen = self.query_one(EditsPanel).selected()
        if chosen is None:
            self.notify(f"no edit to {doing}", severity="warning")
            return
        self.run_line(f"{command} {chosen}")

    @on(Button.Pressed, "#rollback")
    def _rollback(self) -> None:
        self._on_selected_edit("/rollback", "roll back")

    @on(Button.Pressed, "#undo")
    def _undo(self) -> None:
        self.run_line("/undo")

    @on(Button.Pressed, "#reprobe")
    def _reprobe(self) -> None:
        self._on_selected_edit("/probe", "probe")

    @on(Switch.Changed, ".steer-on")
    def _toggle(self, event: Switch.Changed) -> None:
        row = event.switch.parent.parent
        if isinstance(row, SteerRow):
            self.run_line(f"/steer {'on' if event.value else 'off'} {quote(row.vector_name)}")

    @on(Slider.Changed, ".steer-strength")
    def _strength(self, event: Slider.Changed) -> None:
        row = event.slider.parent
        if isinstance(row, SteerRow):
            self.run_line(f"/steer set {quote(row.vector_name)} {event.value:g}")

    def _path(self, box: str = "#steer-path", what: str = "a file path") -> str | None:
        path = self.query_one(box, Input).value.strip()
        if not path:
            self.notify(f"type {what} in the box first", severity="warning")
            return None
        return path

    @on(Button.Pressed, "#steer-load")
    def _steer_load(self) -> None:
        path = self._path()
        if path:
            self.run_line(f"/steer add {quote(path)}")

    @on(Button.Pressed, "#steer-merge")
    def _steer_merge(self) -> None:
        names = self.query_one(SteeringPanel).selected()
        if len(names) < 2:
            self.notify("tick two or more vectors to merge", severity="warning")
            return
        self.run_line(f"/steer merge {' '.join(quote(n) for n in names)} -> {quote('+'.join(names))}")

    def _one_selected(self) -> str | None:
        names = self.query_one(SteeringPanel).selected()
        if len(names) != 1:
            self.notify("tick exactly one vector", severity="warning")
            return None
        return names[0]

    @on(Button.Pressed, "#steer-save")
    def _steer_save(self) -> None:
        name, path = self._one_selected(), self._path()
        if name and path:
            self.run_line(f"/steer save {quote(name)} {quote(path)}")

    @on(Button.Pressed, "#steer-sweep")
    def _steer_sweep(self) -> None:
        name, path = self._one_selected(), self._path()
        if name and path:
            panel = self.query_one(SteeringPanel)
            self.run_line(
                f"/steer sweep {quote(name)} --pairs {quote(path)}",
                on_event=lambda e: panel.show_sweep(e) if isinstance(e, ev.Table) else None,
            )

    @on(Button.Pressed, "#probe-run")
    def _probe(self) -> None:
        panel = self.query_one(ProbesPanel)
        self.run_line("/probe", on_event=lambda e: panel.show(e) if isinstance(e, ev.Table) else None)

    @on(Button.Pressed, "#eval-run")
    def _eval(self) -> None:
        path = self._path("#eval-path", "the eval file's path")
        if path is None:
            return
        panel = self.query_one(ProbesPanel)
        self.run_line(f"/eval {quote(path)}", on_event=lambda e: panel.show(e) if isinstance(e, ev.Table) else None)


def main(opener: Callable[[], Any]) -> int:
    KeditApp(opener=opener).run()
    return 0
