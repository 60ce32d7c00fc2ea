"""Plain-text rendering of engine events, shared by the REPL and the click CLI."""

from __future__ import annotations

from kedit.engine import events as ev


def table_text(table: ev.Table) -> str:
    """Columns padded to their widest cell, under a title and a rule."""
    cells = [table.columns, *table.rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(table.columns))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()

    out = [table.title, line(table.columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in table.rows]
    return "\n".join(out)


def event_text(event: ev.Event) -> str | None:
    """The text a terminal shows for a non-streaming event (None for tokens and quit)."""
    if isinstance(event, ev.Info):
        return event.text
    if isinstance(event, ev.Table):
        return table_text(event)
    if isinstance(event, ev.Error):
        return f"error: {event.message}"
    return None
