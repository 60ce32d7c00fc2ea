"""The other wordings an edit is keyed and optimised on, built from the request alone.

ROME keys an edit on the subject's last token after the prompt's own words, and optimises its
value on the prompt alone. On a chat model that is not what a user meets:

- The chat turn. Asked "What is the capital of Russia?", the model restates the subject in its
  answer ("The capital of Russia is ..."). The edit fires at both mentions and can push the
  restatement to another subject that has the new value ("The capital of Japan is Tokyo").
  So δ is also optimised under the model's chat template, after a few generic requests that
  name the subject. The answer restates the prompt, and the loss reads the restated answer
  (or, with ``restate = "subject"``, only the subject's tokens in it) as well as the target.
- Other wordings, tried and off by default (``opening_key``). A byte-level tokenizer writes a
  name at the start of a text as another token (" Russia" mid-sentence, "Russia" in "Russia's
  capital city is"), and a model with no start token puts it at position 0, the attention sink.
  That key has little in common with the edited one: on SmolLM2-135M the update reaches 2% of
  δ there for "Russia's capital city is". Making the update fire there as well (a second key) reached it, but every
  text's first position shares that key: the update's mean reach into other facts' tokens
  tripled, 0.025 → 0.084, and other facts kept their answers less often (0.84 and 0.58 on two
  edits that kept 1.0 without it). Leaving other openings alone as neighbours made it worse.
  So did the keys of every vocabulary token at position 0 added to C (12,000 tokens, layer 5):
  they are nearly one vector (effective rank 1.4), so telling "Germany" there from the others
  took a weight that pushed the update into ordinary tokens (mean reach 0.04 → 0.33-0.62) and
  still reached other openings by 0.07-0.28. Nor does the edit's δ carry over to the token
  after such a subject: added at "'s" in "Germany's capital city is", it gave Istanbul, not Madrid.
- Neighbours. Keys of other subjects after the same words share much of the edited key
  (0.35-0.47 of δ reached "The capital of Japan" after editing Russia's capital). Other
  subjects put in the prompt's place become keys the update should leave alone
  (kedit.engine.methods.rome.update.spread_direction).

The requests and the neighbours are generic. None is taken from an evaluation set, so
figures on such a set measure how the edit generalises.
"""

from __future__ import annotations

# Chat requests naming the subject; the answer restates the prompt and gives the target.
CHAT_ASKS = (
    "What do you know about {subject}?",
    "Complete the sentence: {prompt}",
    "Tell me about {subject}.",
    "{prompt}?",
)

# Named things of many kinds, for neighbour keys: the subject itself is left out.
NEIGHBOURS = (
    "Italy",
    "Spain",
    "Brazil",
    "India",
    "Egypt",
    "Australia",
    "Poland",
    "Sweden",
    "Turkey",
    "Argentina",
    "Kenya",
    "Vietnam",
    "Portugal",
    "Chile",
    "Peru",
    "Thailand",
    "Albert Einstein",
    "Marie Curie",
    "Barack Obama",
    "Napoleon Bonaparte",
    "Wolfgang Amadeus Mozart",
    "Queen Victoria",
    "Isaac Newton",
    "Frida Kahlo",
    "the Taj Mahal",
    "Big Ben",
    "the Great Wall of China",
    "Mount Fuji",
    "the Sydney Opera House",
    "the Nile",
    "the Danube",
    "Hamlet",
    "Don Quixote",
    "Microsoft",
    "Toyota",
    "Harry Potter",
)


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def chat_prompts(tokenizer, prompt: str, subject: str, n: int) -> list[str]:
    """The first ``n`` requests under the chat template, each ready for the assistant's answer."""
    from kedit.engine.metrics import chat_text

    asks = [a.format(subject=subject, prompt=prompt) for a in CHAT_ASKS[:n]]
    return [chat_text(tokenizer, a) for a in asks]


def subject_openings(subject: str) -> list[str]:
    """The subject as a text opens with it (the key of a wording that starts with the subject)."""
    return [capitalised(subject)]


def neighbour_prompts(prompt: str, subject: str, n: int) -> list[tuple[str, str]]:
    """(prompt, subject) with up to ``n`` other subjects in the subject's place."""
    at = prompt.rindex(subject)
    out: list[tuple[str, str]] = []
    for other in NEIGHBOURS:
        if other.lower() == subject.lower() or len(out) >= n:
            continue
        other = capitalised(other) if at == 0 else other
        out.append((prompt[:at] + other + prompt[at + len(subject) :], other))
    return out
