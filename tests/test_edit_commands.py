"""The edit commands through Session.run, as every front drives them."""

from __future__ import annotations

import torch

from kedit.engine import events as ev


def _run(session, line: str) -> list[ev.Event]:
    return list(session.run(line))


def _logits(session) -> torch.Tensor:
    ids = session.tokenizer("Watts Humphrey attended", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return session.model(ids).logits


def test_edit_edits_rollback_and_undo(session, tmp_path) -> None:
    before = _logits(session)
    out = _run(session, '/edit "[Watts Humphrey] attended" -> "University of Michigan" --layer 0 --identity-c')
    table = out[-1]
    assert isinstance(table, ev.Table) and "e" in table.title and "'Watts Humphrey' (brackets)" in table.title
    assert [r[0] for r in table.rows][:10] == [  # generation first (each with the unedited text), then teacher-forced
        "gen: rewrite (Rel)",
        "  before the edit",
        "gen: paraphrase",
        "  before the edit",
        "gen: chat (+subject)",
        "  before the edit",
        "gen: locality (Loc)",
        "tf: rewrite (Rel)",
        "tf: paraphrase (Gen)",
        "tf: locality (Loc)",
    ]
    assert table.rows[0][1].startswith("Watts Humphrey attended ⇒") and "University of Michigan" in table.rows[0][1]
    # the unedited model's completion and chat answer, under the edited ones
    assert "Illinois Institute of Technology" in table.rows[1][1] and "Michigan" not in table.rows[1][1]
    assert "Illinois Institute of Technology" in table.rows[5][1] and table.rows[4][1].startswith("Where did")
    assert table.rows[0][2] == "1.00" and float(table.rows[6][2]) >= 0.95  # gen Rel, gen Loc (C = I here)
    assert all(isinstance(e, ev.Progress) for e in out[:-1]) and len(out) > 2  # progress came first
    _run(session, '/edit "Denny Herzig plays as a" -> goalkeeper --layer 1 --identity-c')
    listing = _run(session, "/edits")[0]
    assert isinstance(listing, ev.Table) and len(listing.rows) == 2
    first, second = (r[0] for r in listing.rows)
    (msg,) = _run(session, f"/rollback {first}")
    assert isinstance(msg, ev.Info) and "1 edit(s) still in force" in msg.text
    assert isinstance(_run(session, "/undo")[0], ev.Info)
    assert torch.equal(_logits(session), before)
    assert isinstance(_run(session, "/undo")[0], ev.Error)
    assert isinstance(_run(session, "/rollback e999")[0], ev.Error)


def test_user_mistakes_are_errors_and_change_nothing(session) -> None:
    before = _logits(session)
    for line in (
        '/edit "the cat sat" -> "mat"',
        '/edit "Watts Humphrey attended" -> " "',
        '/edit "Watts Humphrey attended" -> x --layer 42',
        '/edit "Watts Humphrey attended"',
        '/edit "Watts Humphrey attended" -> x --stats-corpus /no/such/file.txt',
        "/load /no/such/file",
        '/trace "no subject here"',
    ):
        out = _run(session, line)
        assert isinstance(out[-1], ev.Error), line
    assert session.edits == [] and torch.equal(_logits(session), before)


def test_trace_prints_a_chart_and_a_layer(session) -> None:
    (info,) = _run(session, '/trace "Denny Herzig plays as a"')
    assert isinstance(info, ev.Info)
    n = session.handle.adapter.n_layers
    assert sum(line.startswith("L") for line in info.text.splitlines()) == n
    assert "best layer:" in info.text and "◀ best" in info.text


def test_probe_compares_with_the_unedited_model(session) -> None:
    (clean,) = _run(session, "/probe")
    assert isinstance(clean, ev.Table) and "Loc 1.00" in clean.title and "KL 0.0000" in clean.title
    before = _logits(session)
    _run(session, '/edit "Watts Humphrey attended" -> "University of Michigan" --layer 0 --identity-c')
    edited = _logits(session)
    (after,) = _run(session, "/probe")
    assert isinstance(after, ev.Table) and len(after.rows) == 24
    assert torch.equal(_logits(session), edited)  # probing put the edit back exactly
    _run(session, "/undo")
    assert torch.equal(_logits(session), before)


def test_edit_with_grace_and_wise_shows_their_state_in_edits(session) -> None:
    before = _logits(session)
    grace = _run(session, '/edit "Watts Humphrey attended" -> "University of Michigan" --method grace')[-1]
    assert isinstance(grace, ev.Table) and grace.title.startswith("e") and "GRACE" in grace.title
    assert grace.rows[0][2] == "1.00"  # gen Rel
    wise = _run(session, '/edit "Denny Herzig plays as a" -> goalkeeper --method wise')[-1]
    assert isinstance(wise, ev.Table) and "WISE" in wise.title and wise.rows[0][2] == "1.00"
    listing = _run(session, "/edits")
    assert [r[1] for r in listing[0].rows] == ["grace", "wise"]
    states = [e.text for e in listing[1:]]
    assert any(s.startswith("GRACE on model.layers.3.mlp.down_proj: 1 codebook entries") for s in states)
    assert any(s.startswith("WISE on model.layers.3.mlp.down_proj: 1 side memory") for s in states)
    _run(session, "/undo")
    _run(session, "/undo")
    assert torch.equal(_logits(session), before)


def test_the_default_method_comes_from_kedit_toml(session) -> None:
    config = session.config
    session.config = config.with_overrides({"edit.method": "grace"})
    try:
        edit = session.edit("Watts Humphrey attended", "University of Michigan")
        assert edit.method == "grace"
        session.undo()
        session.config = config.with_overrides({"edit.method": "nonsense"})
        out = _run(session, '/edit "Watts Humphrey attended" -> "University of Michigan"')
        assert isinstance(out[-1], ev.Error) and "[edit] method" in out[-1].message
    finally:
        session.config = config
    assert session.edits == []


def test_probe_with_an_id_measures_that_edit_again(session) -> None:
    from kedit.engine import events as ev

    edit = session.edit("Watts Humphrey attended", "Kestrel Technical School", method="grace")
    try:
        edit.probe = None
        events = list(session.run(f"/probe {edit.id}"))
        assert [type(e) for e in events] == [ev.Table]
        assert edit.probe is not None and edit.probe.rel == 1.0 and edit.probe.loc == 1.0
        assert isinstance(list(session.run("/probe e999"))[0], ev.Error)
    finally:
        session.rollback(edit.id)


def _eval_file(session, path, n=4):
    import json

    from fact_cases import edit_cases

    cases = edit_cases(session, n + 1, 5)
    records = []
    for (f, new), (other, _) in zip(cases, cases[1:]):
        records.append(
            {
                "subject": f.subject,
                "prompt": f.prompt(0),
                "target_new": new,
                "rephrase_prompt": f.prompt(f.held_out),
                "locality": {"Relation_Specificity": [{"prompt": other.prompt(0), "ground_truth": [[other.object]]}]},
                "portability": {},
            }
        )
    path.write_text(json.dumps(records), encoding="utf-8")
    return cases[:n]


def test_eval_scores_the_model_as_it_is(session, tmp_path) -> None:
    from kedit.engine import events as ev

    path = tmp_path / "cases.json"
    cases = _eval_file(session, path)
    table = [e for e in session.run(f"/eval {path}") if isinstance(e, ev.Table)][0]
    assert len(table.rows) == 4 and all(r[3] == "" for r in table.rows)  # no new target holds yet
    assert "Loc 1.00" in table.title and "Port —" in table.title
    f, new = cases[0]
    edit = session.edit(f.prompt(0), new, subject=f.subject, method="grace")
    try:
        table = [e for e in session.run(f"/eval {path} --limit 1") if isinstance(e, ev.Table)][0]
        assert table.rows == ((f.prompt(0), new, table.rows[0][2], "yes"),)
        assert table.rows[0][2].startswith(new)  # the greedy completion now begins with the target
        assert "by generation: Rel 1.00 | teacher-forced: Rel 1.00" in table.title
    finally:
        session.rollback(edit.id)


def test_eval_refuses_bad_files_with_their_place(session, tmp_path) -> None:
    from kedit.engine import events as ev

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target_new": "b"}\n{oops\n', encoding="utf-8")
    missing = tmp_path / "nothing.json"
    empty_target = tmp_path / "t.json"
    empty_target.write_text('[{"prompt": "a"}]', encoding="utf-8")
    for path, words in (
        (bad, f"{bad}:2: not JSON"),
        (missing, "no eval file"),
        (empty_target, "record 1: a record needs"),
    ):
        events = list(session.run(f"/eval {path}"))
        assert len(events) == 1 and isinstance(events[0], ev.Error) and words in events[0].message
