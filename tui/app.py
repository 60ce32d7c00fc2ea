"""``kedit tui``: the Textual app. A chat on the left; Edits, Steering and Probes on the right.

Everything the app does to the model is a command line of the engine's registry run by
``Session.run``, the same path the REPL and recipes take: the panels build lines such as
``/edit "..." -> "..." --method grace`` or ``/steer set mood 1.5`` and show the events.
Every engine call goes through ``App.engine``: a thread worker that hands each event to
the UI thread; a failure becomes a notification, never a crash.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import (Button, Checkbox, DataTable, Footer, Header, Input, Label, Markdown, ProgressBar,
                             Select, Sparkline, Static, Switch, TabbedContent, TabPane, TextArea)
from textual.worker import Worker, WorkerState, get_current_worker

from kedit.engine import events as ev
from kedit.engine.commands import quote
from kedit.engine.errors import KeditError
from kedit.engine.paths import data_dir
from kedit.tui.slider import Slider

STRENGTH_RANGE = (-8.0, 8.0, 0.25)  # slider minimum, maximum and step
METHODS = ("rome", "grace", "wise")
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


class EditsPanel(Vertical):
    """The ledger as a table, its actions, and a form for a new edit."""

    def compose(self) -> ComposeResult:
        table = DataTable(id="edits-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("id", "method", "prompt → target", "gen Rel", "gen Loc", "tf Rel", "tf Loc")
        yield table
        with Horizontal(classes="buttons"):
            yield Button("Roll back", id="rollback", variant="warning")
            yield Button("Undo", id="undo")
            yield Button("Re-probe", id="reprobe")
        with VerticalScroll(id="edit-form"):
            yield Input(placeholder="prompt, e.g. Watts Humphrey attended", id="edit-prompt")
            yield Input(placeholder="subject (blank: inferred)", id="edit-subject")
            yield Input(placeholder="new target", id="edit-target")
            with Horizontal(classes="buttons"):
                yield Select([(m.upper(), m) for m in METHODS], prompt="method", id="edit-method")
                yield Button("Edit", id="edit-apply", variant="primary")

    def show(self, edits: Iterable) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for e in edits:  # gen: by greedy generation; tf: teacher-forced
            m = e.probe.metrics() if e.probe else {}
            table.add_row(e.id, e.method, f"{e.prompt} →{e.target}",
                          *("—" if m.get(k) is None else f"{m[k]:.2f}" for k in ("gen_rel", "gen_loc", "tf_rel", "tf_loc")),
                          key=e.id)

    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def edit_line(self) -> str | None:
        prompt = self.query_one("#edit-prompt", Input).value.strip()
        target = self.query_one("#edit-target", Input).value.strip()
        if not prompt or not target:
            self.app.notify("an edit needs a prompt and a target", severity="warning")
            return None
        line = f"/edit {quote(prompt)} -> {quote(target)}"
        subject = self.query_one("#edit-subject", Input).value.strip()
        if subject:
            line += f" --subject {quote(subject)}"
        method = self.query_one("#edit-method", Select).value
        if isinstance(method, str):
            line += f" --method {method}"
        return line


class SteerRow(Vertical):
    """One racked vector: select box and name, on/off switch, strength slider."""

    def __init__(self, name: str, on: bool, strength: float) -> None:
        super().__init__(classes="steer-row")
        self.vector_name, self._on, self._strength = name, on, strength

    def compose(self) -> ComposeResult:
        with Horizontal(classes="steer-head"):
            yield Checkbox(self.vector_name, classes="steer-select")
            yield Switch(self._on, classes="steer-on")
        lo, hi, step = STRENGTH_RANGE
        yield Slider(self._strength, minimum=min(lo, self._strength), maximum=max(hi, self._strength), step=step,
                     classes="steer-strength")


class SteeringPanel(Vertical):
    """One row per racked vector; load, merge, save and sweep; the sweep drawn as sparklines."""

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="steer-rows")
        yield Input(placeholder="vector file to load, path to save, or pairs for a sweep", id="steer-path")
        with Horizontal(classes="buttons"):
            yield Button("Load", id="steer-load")
            yield Button("Merge", id="steer-merge")
            yield Button("Save", id="steer-save")
            yield Button("Sweep", id="steer-sweep")
        yield Label("", id="sweep-caption")
        yield Sparkline([], id="sweep-margin")
        yield Sparkline([], id="sweep-ppl")

    def rows(self) -> list[SteerRow]:
        return list(self.query(SteerRow))

    def selected(self) -> list[str]:
        return [r.vector_name for r in self.rows() if r.query_one(Checkbox).value]

    async def show(self, slots: dict[str, Any]) -> None:
        box = self.query_one("#steer-rows", VerticalScroll)
        shown = {r.vector_name: r for r in self.rows()}
        if list(shown) == list(slots):  # same vectors: only values moved
            for name, slot in slots.items():
                row = shown[name]
                row.query_one(Switch).set_reactive(Switch.value, slot.on)
                row.query_one(Switch).refresh()
                row.query_one(Slider).value = slot.strength
            return
        await box.remove_children()
        await box.mount_all([SteerRow(name, slot.on, slot.strength) for name, slot in slots.items()])
        if not slots:
            await box.mount(Static("no vectors: load a file below, or /steer train", classes="hint"))

    def show_sweep(self, table: ev.Table) -> None:
        margins = [float(r[1]) for r in table.rows]
        ppl = [float(r[2]) for r in table.rows]
        self.query_one("#sweep-margin", Sparkline).data = margins
        self.query_one("#sweep-ppl", Sparkline).data = ppl
        strengths = ", ".join(r[0] for r in table.rows)
        self.query_one("#sweep-caption", Label).update(
            f"strength {strengths}\nmargin {margins[0]:+.2f} → {margins[-1]:+.2f} (upper) · "
            f"perplexity {ppl[0]:.2f} → {ppl[-1]:.2f} (lower)")


class ProbesPanel(Vertical):
    """The locality probe (each prompt's top token unedited and now) or an eval file (each
    case's first token now and whether the target holds), under the summary."""

    def compose(self) -> ComposeResult:
        with Horizontal(classes="buttons"):
            yield Button("Locality probe", id="probe-run", variant="primary")
            yield Button("Eval file", id="eval-run")
        yield Input(placeholder="EasyEdit/KnowEdit JSON file for Eval", id="eval-path")
        yield Label("run the probe to compare the model now with the unedited one", id="probe-summary")
        yield DataTable(id="probe-table", zebra_stripes=True)

    def show(self, table: ev.Table) -> None:
        self.query_one("#probe-summary", Label).update(table.title)
        grid = self.query_one("#probe-table", DataTable)
        grid.clear(columns=True)
        grid.add_columns(*table.columns)
        for row in table.rows:
            grid.add_row(*row)


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

    def __init__(self, session=None, opener: Callable[[], Any] | None = None,
                 history_file: Path | None = None) -> None:
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
                yield ChatInput(self._history_file, id="chat-input",
                                placeholder="chat, or /command · ctrl+j sends · tab completes")
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

    def engine(self, job: Callable[[Callable[[ev.Event], None]], Any],
               done: Callable[[], Any] | None = None) -> Worker:
        """Run ``job(emit)`` in a thread worker; ``emit`` shows an event on the UI thread.
        ``done`` runs on the UI thread afterwards, whether the job worked or not. Jobs run
        one at a time in the order they were asked for, so two slider moves land in order."""
        ticket = self._tickets
        self._tickets += 1
        return self._engine_worker(job, done, ticket)

    @work(thread=True, exit_on_error=False, group="engine")
    def _engine_worker(self, job: Callable[[Callable[[ev.Event], None]], Any],
                       done: Callable[[], Any] | None, ticket: int) -> Any:
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

    def run_line(self, line: str, on_event: Callable[[ev.Event], None] | None = None,
                 done: Callable[[], Any] | None = None) -> Worker:
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
            self.notify("the model is still loading" if loading else "no model is loaded: see the error above, "
                        "then restart with --model", severity="warning")
            return
        self.log_line(("" if text.startswith("/") else "**you:** ") + text.replace("\n", "  \n"),
                      classes="user")
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
        self.push_screen(HelpScreen(
            f"# kedit\n\n## Keys\n\n{keys}\n- **ctrl+j / alt+enter**: send · **tab**: complete · "
            f"**up/down**: history\n\n## Commands\n\n{commands}\n\nEsc closes this help."))

    def action_panel(self, name: str) -> None:
        self.query_one(TabbedContent).active = name

    # -- panels ------------------------------------------------------------------------------

    @on(Button.Pressed, "#edit-apply")
    def _edit_apply(self) -> None:
        line = self.query_one(EditsPanel).edit_line()
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
            self.run_line(f"/steer sweep {quote(name)} --pairs {quote(path)}",
                          on_event=lambda e: panel.show_sweep(e) if isinstance(e, ev.Table) else None)

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
