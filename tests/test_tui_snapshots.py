"""Snapshots of the Textual app at 80x24 on the fact world: the main screen and each panel.

Regenerate after a deliberate change of the layout with
``pytest tests/test_tui_snapshots.py --snapshot-update`` and review the SVGs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Button, Input

from kedit.tui.app import ChatInput, KeditApp

pytestmark = pytest.mark.slow
MOOD = Path(__file__).resolve().parent.parent / "vectors" / "fact-world-mood.safetensors"
SIZE = (80, 24)


@pytest.fixture
def clean(session, tmp_path):
    """The shared session with a fresh ledger, so edit ids start at e1 whatever ran before."""
    from kedit.engine.ledger import Ledger

    assert not session.edits
    kept, session.ledger = session.ledger, Ledger()
    yield session
    while session.edits:
        session.undo()
    session.ledger = kept
    for name in list(session.steering.slots):
        session.steering.remove(name)


def _app(session, tmp_path) -> KeditApp:
    return KeditApp(session=session, history_file=tmp_path / "history")


async def _still(app: KeditApp, pilot) -> None:
    """No blinking cursors, every worker done, every message handled."""
    for box in app.query(ChatInput):
        box.cursor_blink = False
    for box in app.query(Input):
        box.cursor_blink = False
    await app.workers.wait_for_complete()
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def test_main_screen(clean, tmp_path, snap_compare) -> None:
    async def before(pilot) -> None:
        await _still(pilot.app, pilot)

    assert snap_compare(_app(clean, tmp_path), terminal_size=SIZE, run_before=before)


def test_edits_panel_with_an_edit(clean, tmp_path, snap_compare) -> None:
    clean.edit("Watts Humphrey attended", "Kestrel Technical School", method="grace")

    async def before(pilot) -> None:
        await pilot.press("f2")
        await _still(pilot.app, pilot)

    assert snap_compare(_app(clean, tmp_path), terminal_size=SIZE, run_before=before)


def test_steering_panel_with_a_vector(clean, tmp_path, snap_compare) -> None:
    async def before(pilot) -> None:
        app = pilot.app
        await pilot.press("f3")
        await pilot.pause()
        app.query_one("#steer-path", Input).value = "vectors/fact-world-mood.safetensors"
        app.query_one("#steer-load", Button).press()
        await _still(app, pilot)

    assert snap_compare(_app(clean, tmp_path), terminal_size=SIZE, run_before=before)


def test_probes_panel_after_a_probe(clean, tmp_path, snap_compare) -> None:
    clean.edit("Watts Humphrey attended", "Kestrel Technical School", method="grace")

    async def before(pilot) -> None:
        await pilot.press("f4")
        await pilot.pause()
        pilot.app.query_one("#probe-run", Button).press()
        await _still(pilot.app, pilot)

    assert snap_compare(_app(clean, tmp_path), terminal_size=SIZE, run_before=before)


def test_help_screen(clean, tmp_path, snap_compare) -> None:
    async def before(pilot) -> None:
        await pilot.press("f1")
        await _still(pilot.app, pilot)

    assert snap_compare(_app(clean, tmp_path), terminal_size=SIZE, run_before=before)
