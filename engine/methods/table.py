"""The editing methods kedit knows, by name: the engine, the CLI's and the TUI's choices and the
bench all read this table. A new method is a package under ``kedit.engine.methods`` with an
``EditMethod`` and one line here."""

from __future__ import annotations

from kedit.engine.errors import KeditError
from kedit.engine.methods.base import EditMethod
from kedit.engine.methods.grace.method import METHOD as GRACE
from kedit.engine.methods.memit.method import ALPHAEDIT, MEMIT
from kedit.engine.methods.rome.method import METHOD as ROME
from kedit.engine.methods.wise.method import METHOD as WISE

METHODS: dict[str, EditMethod] = {m.name: m for m in (ROME, GRACE, WISE, MEMIT, ALPHAEDIT)}


def method_named(name: str) -> EditMethod:
    """The method called ``name``, or an error that lists the ones there are."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeditError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


def method_state(model) -> list[str]:
    """Each method's lines on its live state on the model (codebooks, side memories)."""
    return [line for method in METHODS.values() for line in method.state(model)]
