"""The subject: brackets, --subject, the inference rule, and refusals."""

import pytest
from transformers import AutoTokenizer

from kedit.engine.errors import KeditError
from kedit.engine.subject import infer_subject, resolve_subject, subject_last_token, subject_token_span


@pytest.mark.parametrize(
    "prompt, subject",
    [
        ("Watts Humphrey attended", "Watts Humphrey"),
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
        ("Records show that Alder Oakley was born in the town of", "Alder Oakley"),
        ("Denny Herzig's position is", "Denny Herzig"),
        ("In biology, Ramalinaceae belongs to the family", "Ramalinaceae"),
        ("The Eiffel Tower is located in", "Eiffel Tower"),
        ("The University of Michigan is in", "University of Michigan"),
    ],
)
def test_inference_rule(prompt: str, subject: str) -> None:
    assert infer_subject(prompt) == subject


def test_brackets_and_explicit_subjects() -> None:
    assert resolve_subject("[Watts Humphrey] attended") == (
        "Watts Humphrey attended",
        resolve_subject("[Watts Humphrey] attended")[1],
    )
    assert resolve_subject("[Watts Humphrey] attended")[1].how == "brackets"
    clean, subj = resolve_subject("the river Thames flows through", "river Thames")
    assert clean == "the river Thames flows through" and subj.text == "river Thames" and subj.how == "given"
    assert resolve_subject("Watts Humphrey attended")[1].how == "inferred"


def test_a_given_subject_matches_whatever_its_case() -> None:
    clean, subj = resolve_subject("The Eiffel Tower is located in", "the Eiffel Tower")
    assert clean == "The Eiffel Tower is located in" and subj.text == "The Eiffel Tower"  # the prompt's spelling
    # an exact match wins over one that differs in case; otherwise the last occurrence, as the key is
    assert resolve_subject("the paris of Paris", "Paris")[1].text == "Paris"
    assert resolve_subject("PARIS and Paris are", "paris")[1].text == "Paris"


@pytest.mark.parametrize(
    "prompt, subject, message",
    [
        ("the cat sat on", None, "cannot tell the subject"),
        ("[a] and [b] went", None, "more than one"),
        ("[Watts Humphrey attended", None, "unbalanced"),
        ("Watts Humphrey attended", "Denny Herzig", "does not occur"),
        ("[Watts Humphrey] attended", "Watts", "brackets"),
        ("Watts Humphrey attended", " ", "the subject is empty"),
        ("Watts Humphrey attended", "", "the subject is empty"),
    ],
)
def test_refusals_say_how_to_fix_it(prompt: str, subject, message: str) -> None:
    with pytest.raises(KeditError, match=message):
        resolve_subject(prompt, subject)


def test_token_positions_in_context(fact_world_dir) -> None:
    tok = AutoTokenizer.from_pretrained(fact_world_dir)
    for text in ["Watts Humphrey attended", "Denny Herzig plays as a defender. Watts Humphrey attended"]:
        ids = tok(text)["input_ids"]
        start, end = subject_token_span(tok, text, "Watts Humphrey")
        assert tok.decode(ids[start:end]).strip() == "Watts Humphrey"
        assert subject_last_token(tok, text, "Watts Humphrey") == end - 1
