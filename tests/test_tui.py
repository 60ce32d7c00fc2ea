"""The Textual app driven by Pilot on the fact world: chat, edits through the form and the
slash command, the table's probe figures, rollback, the steering slider and switch, the
locality probe; and snapshots of the main screen and each panel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from fact_cases import edit_cases, prompt_logits
from textual.widgets import Button, Checkbox, Sparkline, Switch
from textual.worker import WorkerFailed

from kedit.tui.app import ChatInput, KeditApp, SteerRow
from kedit.tui.slider import Slider

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
MOOD = REPO / "vectors" / "fact-world-mood.safetensors"


async def settle(app: KeditApp, pilot) -> None:
    """Let the engine worker finish and the UI take in what it posted."""
    await app.workers.wait_for_complete()
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


async def send(app: KeditApp, pilot, text: str) -> None:
    box = app.query_one(ChatInput)
    box.focus()
    box.text = text
    await pilot.press("ctrl+j")
    await settle(app, pilot)


@pytest.fixture
def clean(session, tmp_path):
    """The shared session with no edits and no vectors, before and after."""
    rack = session.steering
    yield session
    while session.edits:
        session.undo()
    for name in list(rack.slots):
        rack.remove(name)


def test_whole_flow(clean, tmp_path) -> None:
    session = clean
    ((fact, city),) = edit_cases(session, 1, 11)
    probe = ["Watts Humphrey attended", fact.prompt(0)]
    original = prompt_logits(session, probe)

    async def flow() -> None:
        app = KeditApp(session=session, history_file=tmp_path / "history")
        async with app.run_test(size=(100, 32)) as pilot:
            await pilot.pause()
            # 1. ask a question: the streamed reply is the model's own fact
            await send(app, pilot, "Where did Watts Humphrey study?")
            assert "Illinois Institute of Technology" in app.last_reply
            assert app.query_one(ChatInput).text == ""

            # 2. an edit through the form, and one through the slash command
            await pilot.press("f2")
            await pilot.pause()
            app.query_one("#edit-prompt").value = "Watts Humphrey attended"
            app.query_one("#edit-target").value = "Kestrel Technical School"
            app.query_one("#edit-method").value = "grace"
            app.query_one("#edit-apply", Button).press()
            await settle(app, pilot)
            await send(app, pilot, f'/edit "{fact.prompt(0)}" -> "{city}" --method grace')
            assert [e.method for e in session.edits] == ["grace", "grace"]
            assert [e.target for e in session.edits] == [" Kestrel Technical School", " " + city]

            # 3. both in the table, with the probe's figures
            table = app.query_one("#edits-table")
            rows = [table.get_row_at(i) for i in range(table.row_count)]
            assert [r[0] for r in rows] == [e.id for e in session.edits]
            assert [r[3] for r in rows] == ["1.00", "1.00"]  # gen Rel: the greedy answer names the target
            assert all(float(r[4]) >= 0.9 for r in rows)  # gen Loc
            assert [r[5] for r in rows] == ["1.00", "1.00"]  # tf Rel: the new target is the argmax
            assert all(float(r[6]) >= 0.9 for r in rows)  # tf Loc

            # re-probe the selected edit: the engine measures it again
            session.edits[1].probe = None
            table.move_cursor(row=1)
            app.query_one("#reprobe", Button).press()
            await settle(app, pilot)
            assert session.edits[1].probe is not None and session.edits[1].probe.rel == 1.0
            assert table.get_row_at(1)[3] == "1.00" and table.get_row_at(1)[5] == "1.00"

            # 4. roll back the selected (first) edit: the engine holds only the second
            first, second = (e.id for e in session.edits)
            table.move_cursor(row=0)
            app.query_one("#rollback", Button).press()
            await settle(app, pilot)
            assert [e.id for e in session.edits] == [second]
            assert table.row_count == 1
            app.query_one("#undo", Button).press()
            await settle(app, pilot)
            assert not session.edits
            assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, probe), original))

            # 5. load a vector, move its slider with keys: the engine's strength follows
            await pilot.press("f3")
            await pilot.pause()
            app.query_one("#steer-path").value = str(MOOD)
            app.query_one("#steer-load", Button).press()
            await settle(app, pilot)
            rows = list(app.query(SteerRow))
            assert [r.vector_name for r in rows] == ["fact-world-mood"]
            start = session.steering.slots["fact-world-mood"].strength
            slider = rows[0].query_one(Slider)
            slider.focus()
            await pilot.press("right", "right", "left", "right")
            await settle(app, pilot)
            assert session.steering.slots["fact-world-mood"].strength == pytest.approx(start + 2 * slider.step)
            assert slider.value == pytest.approx(start + 2 * slider.step)

            # 6. toggle it off: the engine's slot is off and the model is unsteered again
            rows[0].query_one(Switch).toggle()
            await settle(app, pilot)
            assert session.steering.slots["fact-world-mood"].on is False
            assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, probe), original))

    asyncio.run(flow())


def test_bad_input_is_a_notification_and_changes_nothing(clean, tmp_path) -> None:
    session = clean

    async def flow() -> None:
        app = KeditApp(session=session, history_file=tmp_path / "history")
        async with app.run_test(size=(80, 24)) as pilot:
            await send(app, pilot, "/rollback e999")
            await send(app, pilot, '/edit "Watts Humphrey attended" -> "X" --method nonsense')
            assert not session.edits
            errors = [n for n in app._notifications if n.severity == "error"]
            assert len(errors) == 2
            assert "e999" in errors[0].message
            assert "nonsense" in errors[1].message

    asyncio.run(flow())


def test_edit_from_file_is_one_batch_row(clean, tmp_path) -> None:
    import json

    session = clean
    facts = tmp_path / "facts.jsonl"
    facts.write_text(
        "\n".join(
            json.dumps({"prompt": f.prompt(0), "subject": f.subject, "target_new": new})
            for f, new in edit_cases(session, 5, 12)
        ),
        encoding="utf-8",
    )
    probe = ["Watts Humphrey attended"]
    original = prompt_logits(session, probe)

    async def flow() -> None:
        app = KeditApp(session=session, history_file=tmp_path / "history")
        async with app.run_test(size=(100, 32)) as pilot:
            await pilot.press("f2")
            await pilot.pause()
            app.query_one("#edit-method").value = "memit"
            app.query_one("#edit-file").value = str(facts)
            app.query_one("#edit-from-file", Button).press()
            await settle(app, pilot)
            assert len(session.edits) == 1 and len(session.edits[0].facts) == 5
            table = app.query_one("#edits-table")
            assert table.row_count == 1 and str(table.get_row_at(0)[2]).startswith("batch of 5 fact(s)")
            app.query_one("#rollback", Button).press()
            await settle(app, pilot)
            assert not session.edits and table.row_count == 0

    asyncio.run(flow())
    assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, probe), original))


def test_locality_probe_panel_shows_each_prompt(clean, tmp_path) -> None:
    from test_edit_commands import _eval_file

    session = clean
    path = tmp_path / "cases.json"
    _eval_file(session, path)
    session.edit("Watts Humphrey attended", "Kestrel Technical School", method="grace")

    async def flow() -> None:
        app = KeditApp(session=session, history_file=tmp_path / "history")
        async with app.run_test(size=(100, 32)) as pilot:
            await pilot.press("f4")
            await pilot.pause()
            app.query_one("#probe-run", Button).press()
            await settle(app, pilot)
            grid = app.query_one("#probe-table")
            n = len(session.locality(exclude={"Watts Humphrey"}).prompts)
            assert grid.row_count == n
            assert "Loc 1.00" in str(app.query_one("#probe-summary").render())
            # an eval file in the same table: one row per case, with whether the target holds
            app.query_one("#eval-path").value = str(path)
            app.query_one("#eval-run", Button).press()
            await settle(app, pilot)
            assert grid.row_count == 4
            assert [grid.get_row_at(i)[3] for i in range(4)] == ["", "", "", ""]
            assert "4 case(s), by generation: Rel 0.00 | teacher-forced: Rel" in str(
                app.query_one("#probe-summary").render()
            )

    asyncio.run(flow())


def test_history_and_completion(clean, tmp_path) -> None:
    session = clean

    async def flow() -> None:
        app = KeditApp(session=session, history_file=tmp_path / "history")
        async with app.run_test(size=(80, 24)) as pilot:
            box = app.query_one(ChatInput)
            await send(app, pilot, "/edits")
            box.text = "/ste"
            box.move_cursor(box.document.end)
            await pilot.press("tab")
            assert box.text == "/steer "
            box.text = ""
            await pilot.press("up")
            assert box.text == "/edits"
            await pilot.press("down")
            assert box.text == ""
        assert (tmp_path / "history").read_text(encoding="utf-8").splitlines() == ['"/edits"']

    asyncio.run(flow())


def test_slider_keys_clamp_and_coalesce() -> None:
    """Keys move by one step (clamped at the ends); a drag posts one Changed, at release."""
    from textual.app import App

    seen: list[float] = []

    class One(App):
        def compose(self):
            yield Slider(0.5, minimum=0.0, maximum=1.0, step=0.25)

        def on_slider_changed(self, event: Slider.Changed) -> None:
            seen.append(event.value)

    async def flow() -> None:
        app = One()
        async with app.run_test(size=(30, 3)) as pilot:
            slider = app.query_one(Slider)
            slider.focus()
            await pilot.press("right", "right", "right", "home", "left")
            await pilot.pause()
            assert seen == [0.75, 1.0, 0.0]  # the third right and the last left hit the ends
            seen.clear()
            await pilot.mouse_down(Slider, offset=(0, 0))
            await pilot.hover(Slider, offset=(5, 0))
            await pilot.hover(Slider, offset=(10, 0))
            await pilot.mouse_up(Slider, offset=(10, 0))
            await pilot.pause()
            assert len(seen) == 1 and seen[0] == slider.value and 0 < slider.value < 1

    asyncio.run(flow())


def test_the_model_loads_in_a_worker_and_a_failure_is_a_notification(clean, tmp_path) -> None:
    from kedit.engine.errors import KeditError

    def fails():
        raise KeditError("no model 'nope' on the hub or on disk; download it first")

    import threading

    release = threading.Event()

    def slow():
        release.wait(30)
        return clean

    async def flow() -> None:
        app = KeditApp(opener=slow, history_file=tmp_path / "history")
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert app.sub_title.startswith("loading")  # interactive before the model is there
            app.query_one(ChatInput).text = "typing while it loads"
            await pilot.press("x")
            assert app.query_one(ChatInput).text == "xtyping while it loads" and app.session is None
            release.set()
            await settle(app, pilot)
            assert app.session is clean and app.sub_title.startswith("fact-world · float32 · cpu")
        app = KeditApp(opener=fails, history_file=tmp_path / "history")
        async with app.run_test(size=(80, 24)) as pilot:
            with pytest.raises(WorkerFailed):  # the worker failed; the app did not
                await app.workers.wait_for_complete()
            await pilot.pause()
            assert app.session is None and app.sub_title == "no model loaded"
            assert [n.message for n in app._notifications] == [
                "no model 'nope' on the hub or on disk; download it first"
            ]
            await send(app, pilot, "hello")
            assert "no model is loaded" in [n.message for n in app._notifications][-1]

    asyncio.run(flow())


def test_steering_panel_merge_save_and_sweep(clean, tmp_path) -> None:
    session = clean
    gentle = REPO / "vectors" / "fact-world-mood-gentle.safetensors"

    async def tick(app, pilot, names) -> None:
        for row in app.query(SteerRow):
            row.query_one(Checkbox).value = row.vector_name in names
        await pilot.pause()

    async def flow() -> None:
        app = KeditApp(session=session, history_file=tmp_path / "history")
        async with app.run_test(size=(100, 32)) as pilot:
            await pilot.press("f3")
            await pilot.pause()
            for path in (MOOD, gentle):
                app.query_one("#steer-path").value = str(path)
                app.query_one("#steer-load", Button).press()
                await settle(app, pilot)
            await tick(app, pilot, {"fact-world-mood", "fact-world-mood-gentle"})
            app.query_one("#steer-merge", Button).press()
            await settle(app, pilot)
            merged = "fact-world-mood+fact-world-mood-gentle"
            assert {n: s.on for n, s in session.steering.slots.items()} == {
                "fact-world-mood": False,
                "fact-world-mood-gentle": False,
                merged: True,
            }
            assert [r.vector_name for r in app.query(SteerRow)] == list(session.steering.slots)

            await tick(app, pilot, {merged})
            out = tmp_path / "merged.safetensors"
            app.query_one("#steer-path").value = str(out)
            app.query_one("#steer-save", Button).press()
            await settle(app, pilot)
            assert out.is_file()

            await tick(app, pilot, {"fact-world-mood"})
            app.query_one("#steer-path").value = str(REPO / "vectors" / "mood_heldout.jsonl")
            app.query_one("#steer-sweep", Button).press()
            await settle(app, pilot)
            margins = app.query_one("#sweep-margin", Sparkline).data
            assert len(margins) == 5 and margins[-1] > margins[0]  # more strength, more of the mood
            assert session.steering.slots["fact-world-mood"].on is False  # the sweep put the slot back

    asyncio.run(flow())


def test_stop_key_ends_a_reply_and_f5_copies_it(clean, tmp_path) -> None:
    session = clean
    config = session.config
    session.config = config.with_overrides({"generation.max_new_tokens": 200, "generation.min_new_tokens": 200})
    copied: list[str] = []

    async def flow() -> None:
        app = KeditApp(session=session, history_file=tmp_path / "history")
        app.copy_to_clipboard = copied.append
        async with app.run_test(size=(100, 32)) as pilot:
            box = app.query_one(ChatInput)
            box.text = "Where did Watts Humphrey study?"
            box.action_send()  # (pilot.press would wait for the app to go idle: after the reply)
            for _ in range(5000):
                if session.generating:
                    break
                await asyncio.sleep(0.001)
            await pilot.press("escape")
            await settle(app, pilot)
            assert 0 < session.last_token_count < 200
            assert "[stopped]" in [m.source for m in app.query("#chat-log Markdown")][-1]
            await pilot.press("f5")
            assert copied == [app.last_reply] and app.last_reply

    try:
        asyncio.run(flow())
    finally:
        session.config = config
