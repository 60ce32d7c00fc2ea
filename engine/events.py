"""Typed results of ``Session.run``: the fronts render these and nothing else; and their plain
text, the one rendering the REPL, the CLI, the TUI's log and recipes share."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    """Base class of everything ``Session.run`` yields."""


@dataclass(frozen=True)
class Token(Event):
    """A piece of a reply as it streams."""

    text: str


@dataclass(frozen=True)
class Reply(Event):
    """The end of a chat turn: the whole reply and how it went."""

    text: str
    tokens: int
    seconds: float
    stopped: bool = False  # ended by stop() rather than by EOS or the token limit


@dataclass(frozen=True)
class Info(Event):
    """A message for the user."""

    text: str


@dataclass(frozen=True)
class Table(Event):
    """Rows for the user, with column headings."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Error(Event):
    """Something the user asked for could not be done; the message says why and what to do."""

    message: str


@dataclass(frozen=True)
class Quit(Event):
    """The user asked to leave."""


@dataclass(frozen=True)
class Progress(Event):
    """Long work under way: ``done`` of ``total`` steps of ``label``."""

    label: str
    done: int
    total: int


def table_text(table: Table) -> str:
    """Columns padded to their widest cell, under a title and a rule."""
    cells = [table.columns, *table.rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(table.columns))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()

    out = [table.title, line(table.columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in table.rows]
    return "\n".join(out)


def event_text(event: Event) -> str | None:
    """The text a terminal shows for a non-streaming event (None for tokens and quit)."""
    if isinstance(event, Info):
        return event.text
    if isinstance(event, Table):
        return table_text(event)
    if isinstance(event, Error):
        return f"error: {event.message}"
    return None
