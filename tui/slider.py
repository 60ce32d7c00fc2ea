"""A float slider for Textual: keyboard and mouse, a reactive value, one Changed per gesture.

Keys: left/right move one step, shift+left/right ten steps, home/end jump to the ends.
Mouse: click or drag along the track. While dragging, the value follows the pointer at
once but Changed is posted only when the button is released, so a drag costs the engine
one update rather than one per cell crossed.
"""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget


class Slider(Widget, can_focus=True):
    DEFAULT_CSS = """
    Slider { height: 1; width: 1fr; min-width: 12; }
    Slider:focus { background: $boost; }
    """
    BINDINGS = [
        Binding("left", "step(-1)", "−", show=False),
        Binding("right", "step(1)", "+", show=False),
        Binding("shift+left", "step(-10)", "−−", show=False),
        Binding("shift+right", "step(10)", "++", show=False),
        Binding("home", "jump(0)", "min", show=False),
        Binding("end", "jump(1)", "max", show=False),
    ]

    value: reactive[float] = reactive(0.0)

    class Changed(Message):
        """The value a gesture ended on."""

        def __init__(self, slider: Slider, value: float) -> None:
            super().__init__()
            self.slider, self.value = slider, value

        @property
        def control(self) -> Slider:
            return self.slider

    def __init__(
        self,
        value: float = 0.0,
        *,
        minimum: float = 0.0,
        maximum: float = 1.0,
        step: float = 0.1,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        if not minimum < maximum or step <= 0:
            raise ValueError("a slider needs minimum < maximum and a positive step")
        super().__init__(name=name, id=id, classes=classes)
        self.minimum, self.maximum, self.step = minimum, maximum, step
        self._dragging = False
        self.set_reactive(Slider.value, self._fit(value))

    def _fit(self, value: float) -> float:
        """Clamped to the range and rounded to the step grid (to 6 places, so 0.1·3 is 0.3)."""
        steps = round((min(max(value, self.minimum), self.maximum) - self.minimum) / self.step)
        return round(min(self.minimum + steps * self.step, self.maximum), 6)

    def validate_value(self, value: float) -> float:
        return self._fit(value)

    def _label(self) -> str:
        return f"{self.value:+.2f}"

    def _track_width(self) -> int:
        return max(2, self.size.width - len(self._label()) - 1)

    def render(self) -> str:
        width = self._track_width()
        share = (self.value - self.minimum) / (self.maximum - self.minimum)
        knob = round(share * (width - 1))
        return "━" * knob + "●" + "─" * (width - 1 - knob) + " " + self._label()

    def _emit(self) -> None:
        self.post_message(self.Changed(self, self.value))

    def action_step(self, n: int) -> None:
        before = self.value
        self.value = self.value + n * self.step
        if self.value != before:
            self._emit()

    def action_jump(self, end: int) -> None:
        before = self.value
        self.value = self.maximum if end else self.minimum
        if self.value != before:
            self._emit()

    def _value_at(self, x: int) -> float:
        width = self._track_width()
        return self.minimum + (self.maximum - self.minimum) * min(max(x, 0), width - 1) / (width - 1)

    def on_mouse_down(self, event: events.MouseDown) -> None:
        self._dragging = True
        self.capture_mouse()
        self.focus()
        self.value = self._value_at(event.x)
        event.stop()

    def on_mouse_move(self, event: events.MouseMove) -> None:
        if self._dragging:
            self.value = self._value_at(event.x)
            event.stop()

    def on_mouse_up(self, event: events.MouseUp) -> None:
        if self._dragging:
            self._dragging = False
            self.release_mouse()
            self._emit()
            event.stop()
