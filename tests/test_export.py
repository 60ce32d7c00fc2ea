"""Export: ROME edits merged into a transformers folder that reloads with the edit in effect;
GRACE/WISE and existing folders refused; the live model untouched."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from fact_cases import prompt_logits

from kedit.engine import events as ev
from kedit.tui.cli import main

REPO = Path(__file__).resolve().parent.parent


def _answer(folder: Path, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_export_merges_rome_edits_and_leaves_the_session_alone(session, tmp_path) -> None:
    edit = session.edit("Watts Humphrey attended", "University of Michigan", method="rome")
    session.run("/steer add vectors/fact-world-mood.safetensors 0.5").__next__()
    probe = ["Watts Humphrey attended", "Wystan Galloway was born in"]
    live = prompt_logits(session, probe)
    try:
        events = list(session.run(f"/export {tmp_path / 'out'}"))
        assert isinstance(events[0], ev.Info) and "1 edit(s) merged into 1 module(s)" in events[0].text
        assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, probe), live))
        assert _answer(tmp_path / "out", "Watts Humphrey attended").startswith(" University of Michigan")
        assert (tmp_path / "out" / "fact-world-mood.gguf").is_file()
        again = list(session.run(f"/export {tmp_path / 'out'}"))
        assert isinstance(again[0], ev.Error) and "not an empty folder" in again[0].message
    finally:
        session.rollback(edit.id)
        session.steering.remove("fact-world-mood")


def test_export_refuses_grace_and_wise_edits(session, tmp_path) -> None:
    edit = session.edit("Watts Humphrey attended", "Kestrel Technical School", method="grace")
    try:
        events = list(session.run(f"/export {tmp_path / 'out'}"))
        assert isinstance(events[0], ev.Error) and f"{edit.id} (GRACE) cannot be exported" in events[0].message
        assert not (tmp_path / "out").exists()
    finally:
        session.rollback(edit.id)


def test_kedit_export_from_a_recipe(fact_world_dir, tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[step]]\nrun = \'/edit "Watts Humphrey attended" -> "University of Michigan" '
        '--method rome\'\nexpect_metrics = ["rel >= 0.9"]\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["export", str(tmp_path / "out"), "--recipe", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    done = json.loads(result.output[result.output.index("{") :])
    assert done["edits"] == ["e1"] and len(done["merged_modules"]) == 1
    assert _answer(tmp_path / "out", "Watts Humphrey attended").startswith(" University of Michigan")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "other")])
    assert result.exit_code == 2 and "--recipe FILE or --session FILE" in result.output


def test_kedit_edit_saves_and_exports(fact_world_dir, tmp_path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "edit",
            "Watts Humphrey attended",
            "University of Michigan",
            "--method",
            "rome",
            "--save",
            str(tmp_path / "s.kedit"),
            "--export",
            str(tmp_path / "out"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    done = json.loads(result.output[result.output.index("{") :])
    assert done["method"] == "rome" and done["probe"]["rel"] == 1.0 and done["exported"]["edits"] == ["e1"]
    assert (tmp_path / "s.kedit").is_file()
    assert _answer(tmp_path / "out", "Watts Humphrey attended").startswith(" University of Michigan")
    result = CliRunner().invoke(main, ["edit", "nothing here", "x"])
    assert result.exit_code == 1 and "cannot tell the subject" in result.output


def test_kedit_edit_file_exports_a_merged_batch(fact_world_dir, tmp_path) -> None:
    """`kedit edit --file` with MEMIT: one batch, its factors merged into every layer of its range
    in the exported folder, which then says the new targets."""
    facts = [json.loads(line) for line in (REPO / "recipes" / "fact-world-batch.jsonl").read_text().splitlines()]
    result = CliRunner().invoke(
        main,
        [
            "edit",
            "--file",
            str(REPO / "recipes" / "fact-world-batch.jsonl"),
            "--method",
            "memit",
            "--export",
            str(tmp_path / "out"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    done = json.loads(result.output[result.output.index("{") :])
    assert done["method"] == "memit" and len(done["facts"]) == len(facts) == 8
    assert done["exported"]["merged_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    said = [_answer(tmp_path / "out", f["prompt"]) for f in facts]
    hits = sum(f["target_new"] in s for f, s in zip(facts, said))
    print(f"\nexported MEMIT batch: {hits}/8 prompts say their new target")
    assert hits >= 7
    both = CliRunner().invoke(main, ["edit", "Watts Humphrey attended", "x", "--file", "f.jsonl"])
    assert both.exit_code == 2 and "not both" in both.output
