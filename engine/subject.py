"""The subject of an edit: named in brackets, given explicitly, or inferred by a documented rule.

Rule for inferring it (when neither ``[brackets]`` nor ``--subject`` name it): split the
prompt into runs of consecutive capitalised words (a word counts if it starts with an
upper-case letter or a digit; "of", "de", "van", "von", "the", "and" may join two such
words inside a run); drop a sentence-opening function word ("The", "In", "A", ...) from the
start of a run; the subject is the longest run, the earliest on a tie. A prompt with no
such run cannot hold a subject, and the edit is refused with a message saying how to name it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kedit.engine.errors import KeditError

_JOINERS = {"of", "de", "van", "von", "the", "and", "la", "le", "da", "di", "der", "del"}
_OPENERS = {
    "The",
    "A",
    "An",
    "In",
    "On",
    "At",
    "As",
    "By",
    "For",
    "From",
    "To",
    "Of",
    "It",
    "This",
    "That",
    "These",
    "Those",
    "What",
    "Which",
    "Who",
    "Where",
    "When",
    "How",
    "Why",
    "Is",
    "Are",
    "Was",
    "Were",
    "Records",
    "Today",
    "Yesterday",
    "My",
    "Our",
    "His",
    "Her",
}
_WORD = re.compile(r"[^\s,.;:!?()\"]+")


@dataclass(frozen=True)
class Subject:
    """The subject string and how it was found."""

    text: str
    how: str  # "brackets" | "given" | "inferred"


def _capitalised(word: str) -> bool:
    return word[:1].isupper() or word[:1].isdigit()


def infer_subject(prompt: str) -> str | None:
    """Apply the module's rule; None when the prompt has no capitalised run."""
    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(prompt)]
    runs: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    for i, w in enumerate(words):
        nxt = words[i + 1][0] if i + 1 < len(words) else ""
        if _capitalised(w[0].strip("'’")) or (current and w[0] in _JOINERS and _capitalised(nxt)):
            current.append(w)
        else:
            if current:
                runs.append(current)
            current = []
    if current:
        runs.append(current)
    cleaned = []
    for run in runs:
        while run and run[0][0] in _OPENERS:
            run = run[1:]
        while run and run[-1][0] in _JOINERS:
            run = run[:-1]
        if run:
            cleaned.append(run)
    if not cleaned:
        return None
    best = max(cleaned, key=len)  # max keeps the first of equal lengths
    text = prompt[best[0][1] : best[-1][2]]
    return re.sub(r"'s$|’s$", "", text)


def resolve_subject(prompt: str, subject: str | None = None) -> tuple[str, Subject]:
    """Return the prompt without brackets and the subject, or raise a KeditError saying why not."""
    bracketed = re.findall(r"\[([^\[\]]+)\]", prompt)
    if len(bracketed) > 1:
        raise KeditError("name one subject: the prompt has more than one [bracketed] part")
    if bracketed:
        clean = prompt.replace(f"[{bracketed[0]}]", bracketed[0])
        if subject and subject != bracketed[0]:
            raise KeditError(f"the prompt brackets [{bracketed[0]}] but --subject says {subject!r}")
        if not bracketed[0].strip():
            raise KeditError("the brackets are empty: put the subject's words inside, as in [Watts Humphrey]")
        return clean, Subject(bracketed[0].strip(), "brackets")
    if "[" in prompt or "]" in prompt:
        raise KeditError("unbalanced brackets in the prompt: mark the subject as [Watts Humphrey]")
    if subject is not None:
        return prompt, Subject(given_subject(prompt, subject), "given")
    found = infer_subject(prompt)
    if found is None:
        raise KeditError(
            f"cannot tell the subject of {prompt!r}: it has no capitalised name. Mark it in the "
            f'prompt, as in "[Watts Humphrey] attended", or pass --subject "Watts Humphrey".'
        )
    return prompt, Subject(found, "inferred")


def given_subject(prompt: str, subject: str) -> str:
    """The subject as the prompt writes it: ``--subject "the Eiffel Tower"`` on "The Eiffel Tower
    is ..." is "The Eiffel Tower". Exact matches win; otherwise case is ignored, and the last
    occurrence is taken, as the key is (``subject_last_token``)."""
    wanted = subject.strip()
    if not wanted:
        raise KeditError("the subject is empty: name the words of the prompt the fact is about")
    if wanted in prompt:
        return wanted
    at = prompt.lower().rfind(wanted.lower())
    if at < 0 or prompt[at : at + len(wanted)].lower() != wanted.lower():
        raise KeditError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    return prompt[at : at + len(wanted)]


def subject_last_token(tokenizer, text: str, subject: str, special: bool = True) -> int:
    """Index of the subject's last token in ``tokenizer(text)`` (its last occurrence).

    Tokenizes the text up to the end of the subject, as ROME does; the prefix's length
    is the position just after the subject.
    """
    end = text.rindex(subject) + len(subject)
    n = len(tokenizer(text[:end], add_special_tokens=special)["input_ids"])
    return n - 1


def subject_token_span(tokenizer, text: str, subject: str, special: bool = True) -> tuple[int, int]:
    """[start, end) token indices covering the subject's last occurrence in ``text``.

    Byte-level and sentencepiece tokenizers glue a space to the word after it, so the
    subject starts where the text before its leading space ends.
    """
    start_char = text.rindex(subject)
    head = text[: start_char - 1] if start_char > 0 and text[start_char - 1] == " " else text[:start_char]
    start = len(tokenizer(head, add_special_tokens=special)["input_ids"])
    end = subject_last_token(tokenizer, text, subject, special) + 1
    return min(start, end - 1), end
