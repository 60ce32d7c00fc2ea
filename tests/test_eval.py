"""`kedit eval`: EasyEdit-style datasets, each record edited and measured; the figures are
the probes' own, and the model ends as it began."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from fact_cases import prompt_logits

from kedit.engine.evaluate import edit_and_measure, read_cases
from kedit.tui.cli import main

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "recipes" / "fact-world-counterfact.json"


def test_eval_reproduces_the_probe_figures_and_restores_the_model(session) -> None:
    cases = read_cases(DATA, 3)
    probe = [c.prompt for c in cases]
    original = prompt_logits(session, probe)
    rows = edit_and_measure(session, cases, "grace", sequential=False)
    assert not session.edits
    assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, probe), original))
    for case, row in zip(cases, rows):  # the same edit through /edit shows the same Rel and Gen
        edit = session.edit(case.prompt, case.target, subject=case.subject, method="grace", paraphrases=case.rephrase)
        try:
            assert (row["tf_rel"], row["tf_gen"]) == (edit.probe.rel, edit.probe.gen)
            assert (row["gen_rel"], row["gen_para"]) == (edit.probe.by_gen.rel, edit.probe.by_gen.para)
            assert row["tf_rel"] == 1.0 and row["tf_loc"] == 1.0 and row["gen_rel"] == 1.0
        finally:
            session.rollback(edit.id)


def test_eval_cli_sequential_json_lines(fact_world_dir) -> None:
    result = CliRunner().invoke(main, ["eval", "--data", str(DATA), "--method", "grace", "--sequential", "4", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [r["case"] for r in lines[:-1]] == [0, 1, 2, 3]
    summary = lines[-1]["summary"]
    assert summary["mode"] == "sequential" and summary["n"] == 4 and summary["tf_rel"] == 1.0
    assert summary["tf_loc"] == 1.0 and summary["tf_port"] is None and summary["protocol"] == "both"
    assert summary["gen_rel"] >= 0.75 and summary["gen_loc"] >= 0.9


def test_zsre_and_knowedit_records_are_read(tmp_path) -> None:
    zsre = {
        "subject": "Watts Humphrey",
        "src": "Where did Watts Humphrey study?",
        "alt": "Kestrel",
        "answers": ["Illinois"],
        "rephrase": "Which school did Watts Humphrey attend?",
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare",
        "portability": {"New Question": "x", "New Answer": "y"},
    }
    knowedit = {
        "subject": "A",
        "prompt": "A is in",
        "target_new": "B",
        "ground_truth": "C",
        "portability": {"Reasoning": [{"prompt": "A's home is in", "ground_truth": [["B", "b"]]}]},
        "locality": {"Relation_Specificity": [{"prompt": ["D is in", "E is in"], "ground_truth": "F"}]},
    }
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(zsre) + "\n" + json.dumps(knowedit) + "\n", encoding="utf-8")
    z, k = read_cases(path)
    assert (z.prompt, z.target, z.subject, z.rephrase) == (zsre["src"], "Kestrel", "Watts Humphrey", [zsre["rephrase"]])
    assert z.locality == [("nq question: who wrote hamlet", "Shakespeare")]
    assert z.portability == [("x", "y")]
    assert k.portability == [("A's home is in", "B")]
    assert k.locality == [("D is in", "F"), ("E is in", "F")]


def test_eval_cli_refuses_a_missing_file(fact_world_dir, tmp_path) -> None:
    result = CliRunner().invoke(main, ["eval", "--data", str(tmp_path / "none.json")])
    assert result.exit_code == 1 and "no eval file" in result.output
