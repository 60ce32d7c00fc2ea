"""The side panels of ``kedit tui``: Edits (the ledger and a form for a new edit), Steering (the
racked vectors, each with a switch and a strength slider) and Probes (locality probe, eval file).

A panel only builds command lines and shows tables; the app runs the lines and wires the buttons.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Checkbox, DataTable, Input, Label, Select, Sparkline, Static, Switch

from kedit.engine import events as ev
from kedit.engine.commands import quote
from kedit.engine.methods.table import METHODS
from kedit.tui.slider import Slider

STRENGTH_RANGE = (-8.0, 8.0, 0.25)  # slider minimum, maximum and step


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
            yield Input(placeholder="facts file (JSON/JSONL) for a batch edit", id="edit-file")
            yield Button("Edit from file", id="edit-from-file")

    def show(self, edits: Iterable) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for e in edits:  # gen: by greedy generation; tf: teacher-forced
            m = e.probe.metrics() if e.probe else {}
            table.add_row(
                e.id,
                e.method,
                e.title,
                *("—" if m.get(k) is None else f"{m[k]:.2f}" for k in ("gen_rel", "gen_loc", "tf_rel", "tf_loc")),
                key=e.id,
            )

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
        return line + self._method()

    def _method(self) -> str:
        method = self.query_one("#edit-method", Select).value
        return f" --method {method}" if isinstance(method, str) else ""

    def file_line(self) -> str | None:
        """/edit --file for the facts file typed in, with the chosen method."""
        path = self.query_one("#edit-file", Input).value.strip()
        if not path:
            self.app.notify("type the path of a facts file first", severity="warning")
            return None
        return f"/edit --file {quote(path)}" + self._method()


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
        yield Slider(
            self._strength,
            minimum=min(lo, self._strength),
            maximum=max(hi, self._strength),
            step=step,
            classes="steer-strength",
        )


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
            f"perplexity {ppl[0]:.2f} → {ppl[-1]:.2f} (lower)"
        )


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
