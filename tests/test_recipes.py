"""Recipes: every shipped one replays green; a false expectation exits 1; a malformed recipe
exits 2 naming the file and line; replay leaves the model as loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fact_cases import prompt_logits

from kedit.engine.recipes import RecipeError, load_recipe, replay
from kedit.tui.cli import main

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "recipes").glob("*.toml"))


def test_every_shipped_recipe_replays_green(fact_world_dir) -> None:
    assert {p.name for p in SHIPPED} >= {"watts-humphrey.toml", "grace.toml", "wise.toml", "steering.toml"}
    result = CliRunner().invoke(main, ["replay", *map(str, SHIPPED), "--json"])
    report = json.loads(result.output)
    failed = [(r["recipe"], s) for r in report for s in r["steps"] if not s["ok"]]
    assert result.exit_code == 0 and not failed, failed
    assert [Path(r["recipe"]).name for r in report] == [p.name for p in SHIPPED]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_false_expectation_exits_1_and_says_which(fact_world_dir, tmp_path) -> None:
    path = _write(tmp_path, '[[step]]\nrun = "Watts Humphrey attended"\nexpect_contains = "Narnia"\n')
    result = CliRunner().invoke(main, ["replay", str(path)])
    assert result.exit_code == 1
    assert "FAIL line 1: Watts Humphrey attended" in result.output  # the step's [[step]] line
    assert "✗ contains 'Narnia'" in result.output and "Illinois Institute of Technology" in result.output


@pytest.mark.parametrize(
    "text, where, words",
    [
        (
            '[[step]]\nrun = "hi"\n\n[[step]]\nrun = "hi"\nexpct_contains = "x"\n',
            ":4: step 2",
            "unknown key(s) expct_contains",
        ),
        ('[[step]]\nrun = "hi\n', "", "not valid TOML"),
        ('[[step]]\nrun = "/nonsense now"\n', ":1: step 1", "/nonsense"),
        (
            '[[step]]\nrun = "/edit \\"a b\\" -> \\"c\\""\nexpect_metrics = ["rel >> 1"]\n',
            ":1: step 1",
            "not a metric check",
        ),
        ('[[step]]\nrun = "hello"\nexpect_metrics = ["rel >= 1"]\n', ":1: step 1", "reads the probe of an /edit step"),
        ('[model]\nname = "fact-world"\n', "", "no steps"),
    ],
)
def test_a_malformed_recipe_exits_2_with_file_and_line(tmp_path, text, where, words) -> None:
    path = _write(tmp_path, text)
    result = CliRunner().invoke(main, ["replay", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}{where}" in result.output and words in result.output, result.output
    if "TOML" in words:
        assert "line 2" in result.output  # tomllib names the line of the broken string


def test_replay_starts_and_ends_with_the_model_as_loaded(session) -> None:
    from kedit.engine.session import Session

    probe = ["Watts Humphrey attended", "Wystan Galloway feels"]
    original = prompt_logits(session, probe)
    session.edit("Watts Humphrey attended", "Kestrel Technical School", method="grace")  # cleared first
    recipe = load_recipe(REPO / "recipes" / "steering.toml", Session.registry)
    seen = []
    results = replay(session, recipe, seen.append)
    assert all(r.ok for r in results) and seen == results
    assert not session.edits and not session.steering.slots and not session.chat
    assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, probe), original))


def test_load_recipe_refuses_a_missing_file(tmp_path) -> None:
    from kedit.engine.session import Session

    with pytest.raises(RecipeError, match="cannot read it"):
        load_recipe(tmp_path / "none.toml", Session.registry)


def test_a_recorded_session_replays_to_the_same_model(session, tmp_path) -> None:
    """/record writes what worked; replaying it from a clean model gives the same edits,
    the same vectors and logits equal with torch.equal."""
    from kedit.engine import events as ev
    from kedit.engine.recipes import clear
    from kedit.engine.session import Session

    path = tmp_path / "recorded.toml"
    lines = [
        "/record start " + str(path),
        '/edit "Watts Humphrey attended" -> "University of Michigan" --method rome',
        "/rollback e999",  # fails: not recorded
        '/edit "Wystan Galloway was born in" -> "Harrowgate" --method grace',
        "Where did Watts Humphrey study?",
        "/steer add vectors/fact-world-mood.safetensors 0.5",
        "/record stop",
    ]
    for line in lines:
        events = list(session.run(line))
        assert any(isinstance(e, ev.Error) for e in events) == (line == "/rollback e999"), (line, events)
    probe = ["Watts Humphrey attended", "Wystan Galloway was born in", "Wystan Galloway feels"]
    live = prompt_logits(session, probe)
    edits = [(e.method, e.prompt, e.target) for e in session.edits]
    try:
        recipe = load_recipe(path, Session.registry)
        assert [s.run for s in recipe.steps] == lines[1:2] + lines[3:6]
        assert recipe.steps[-2].contains and "University of Michigan" in recipe.steps[-2].contains[0]
        results = replay(session, recipe, keep=True)
        assert all(r.ok for r in results), [(r.step.run, r.checks) for r in results]
        assert [(e.method, e.prompt, e.target) for e in session.edits] == edits
        assert list(session.steering.slots) == ["fact-world-mood"]
        assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, probe), live))
    finally:
        clear(session)


def test_record_refuses_to_start_on_an_edited_model_or_stop_when_idle(session, tmp_path) -> None:
    from kedit.engine import events as ev

    assert "not recording" in list(session.run("/record stop"))[0].message
    edit = session.edit("Watts Humphrey attended", "Kestrel Technical School", method="grace")
    try:
        out = list(session.run(f"/record start {tmp_path / 'r.toml'}"))
        assert isinstance(out[0], ev.Error) and "starts from the model as loaded" in out[0].message
        assert session.recorder is None
    finally:
        session.rollback(edit.id)


def test_here_is_the_recipe_folder(tmp_path: Path) -> None:
    from kedit.engine.command_table import registry
    from kedit.engine.recipes import load_recipe

    folder = tmp_path / 'a "quoted" folder'
    folder.mkdir()
    path = folder / "r.toml"
    path.write_text("[[step]]\nrun = '/edit --file \"{here}/facts.jsonl\" --method memit'\n", encoding="utf-8")
    (step,) = load_recipe(path, registry()).steps
    parsed = registry().parse(step.run)
    assert parsed.args["file"] == f"{folder.resolve()}/facts.jsonl"
