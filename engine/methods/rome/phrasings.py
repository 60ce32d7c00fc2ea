"""The other wordings an edit is keyed and optimised on, built from the request alone.

ROME keys an edit on the subject's last token after the prompt's own words, and optimises its
value on the prompt alone. On a chat model that is not what a user meets:

- The chat turn. Asked "What is the capital of Russia?", the model restates the subject in its
  answer ("The capital of Russia is ..."). The edit fires at both mentions and can push the
  restatement to another subject that has the new value ("The capital of Japan is Tokyo").
  So δ is also optimised under the model's chat template, after a few generic requests that
  name the subject. The answer restates the prompt, and the loss reads the restated answer
  (or, with ``restate = "subject"``, only the subject's tokens in it) as well as the target.
- Wordings that open with the subject. A byte-level tokenizer writes a name at the start of a
  text as another token (" Russia" mid-sentence, "Russia" in "Russia's capital city is"), and
  a model with no start token (SmolLM2, Qwen2.5) puts a one-token subject at position 0, the
  attention sink. Every text's first position has nearly the same key there (SmolLM2-135M,
  layer 5: 12,000 vocabulary tokens' keys have effective rank 1.4), so no update can fire on
  "Germany" at position 0 and not on every other opening word. Tried and dropped: a second key
  at position 0 (the update's mean reach into other facts' tokens tripled, 0.025 → 0.084, and
  other facts kept their answers less often), those keys added to C (mean reach into ordinary
  tokens 0.04 → 0.33-0.62), and the edit's own δ added at the next token ("'s": it gave
  Istanbul, not Madrid).
  What the model reads the subject from there is the token after it, whose key does tell
  subjects apart ("Germany's" against other countries' "'s", cosine 0.4-0.9). So an edit whose
  subject is one token at a text's start gets a second key, at the token after the subject in
  an ``opening`` wording (the prompt's "The capital of Germany is" as "Germany's capital is"),
  and a second value, optimised on that wording in the same loop as the first; the update's
  second direction leaves the edited key and other subjects' keys at that token alone
  (``opening``). Optimised one after the other, the two values took 1.3-1.6×
  one value's time.
  On SmolLM2-135M "Germany's capital city is" and "China's capital city is" then follow the
  edit, which they did not with the first key alone. That token's key is much the same after
  other subjects, so the second direction reaches ordinary text more than the first (up to a
  quarter of δ₂ at words such as " planet"); with δ₂ clamped as δ is (4 · ‖v‖) an edit of
  Germany's capital changed three of twelve unrelated completions, at 2 · ‖v‖ none more than
  the first key alone, but Russia's changed one more; 1.5 · ‖v‖ (``opening_clamp``) kept
  Russia's too. A KL term on the model's own context prefixes did not help.
  Over 20 sequential edits (SmolLM2, the 20 shared facts) the second values add up: with 11
  other facts, at 2 · ‖v‖ they kept their completion 0.73 and their chat answer 0.82 of the
  time, at 1.5 · ‖v‖ 0.91 and 0.82, against 0.91 and 0.91 without; with 30 other facts, at
  1.5 · ‖v‖ 0.76 and 0.70 against 0.76 and 0.73, no paraphrase more than without (0.57), and
  neutral text's perplexity 1.11 times the unedited model's against 1.02. That was with the
  Llama settings' weight decay on δ (1e-3). With the paper's GPT-2 XL 0.5 (kedit's default) δ
  is a third the size and no longer reaches the paraphrases alone; the second value then
  carries them, and 20 such edits kept the other facts 0.93 / 0.97 (README). Hence on by default.
- Subjects spelled otherwise at a text's start. " Ireland" mid-text is one token, "Ireland" at
  the start of a text three ("I|re|land"): the edited key is never computed there, and on
  SmolLM2-135M the update reached "land" in "Ireland's capital city is" by 0.04 of δ. Such a
  subject gets the opening wording too, keyed at its own last token, which is past position 0
  and tells subjects apart as any subject's last token does; other subjects opening the text
  are its neighbours ("Fin|land", "Po|land"). "Ireland's capital city is" then follows the edit.
  At 1.5 · ‖v‖ that second value cost France's capital asked in chat; at 1.0 · ‖v‖ (now the
  default for both kinds of opening key) nothing, with the same paraphrases followed.
- The same wording where the first key does read the subject ("The Netherlands's capital is":
  " Netherlands" as in the prompt). The key fires there, but a δ optimised on the prompt's words
  alone left "The Netherlands' capital city is" saying Amsterdam on SmolLM2-135M; as one more row
  of δ's (``possessive``, no second key) it says the new capital. Over the 20 shared facts edited
  one after another, the paraphrases followed 4 of 7 times against 3, with no other fact lost.
- The question. Where the prompt is "The R of S is", the first chat request is the question it
  answers ("What is the capital of Greece?", ``question``). Over 20 sequential edits with the
  small δ, the generic requests alone left the model answering it about another subject that
  has the new value ("The capital of Egypt is Cairo"): chat 0.80, with the question 0.90.
- Neighbours. Keys of other subjects after the same words share much of the edited key
  (0.35-0.47 of δ reached "The capital of Japan" after editing Russia's capital). Other
  subjects put in the prompt's place become keys the update should leave alone
  (kedit.engine.methods.rome.update.spread_direction). The keys of earlier edits in force on
  the layer get none of δ at all (``keep_earlier``, kedit.engine.methods.rome.method.earlier_keys).

The requests and the neighbours are generic. None is taken from an evaluation set, so
figures on such a set measure how the edit generalises.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kedit.engine.subject import subject_last_token

# Chat requests naming the subject; the answer restates the prompt and gives the target.
CHAT_ASKS = (
    "What do you know about {subject}?",
    "Complete the sentence: {prompt}",
    "Tell me about {subject}.",
    "{prompt}?",
)

# Named things of many kinds, for neighbour keys: the subject itself is left out.
NEIGHBOURS = (
    "Nigeria",
    "Spain",
    "Brazil",
    "India",
    "Egypt",
    "Indonesia",
    "Poland",
    "Finland",
    "Turkey",
    "Argentina",
    "Colombia",
    "Vietnam",
    "Portugal",
    "Chile",
    "Peru",
    "Pakistan",
    "Charles Darwin",
    "Marie Curie",
    "Abraham Lincoln",
    "Napoleon Bonaparte",
    "Ludwig van Beethoven",
    "Queen Victoria",
    "Leonardo da Vinci",
    "Frida Kahlo",
    "Machu Picchu",
    "Big Ben",
    "Stonehenge",
    "Mount Fuji",
    "the Sydney Opera House",
    "the Mississippi",
    "the Danube",
    "Hamlet",
    "Don Quixote",
    "Microsoft",
    "Toyota",
    "Moby-Dick",
)


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def question(prompt: str, subject: str) -> str | None:
    """The prompt asked as a question, where it is "The R of S is" ("The capital of Greece is"
    → "What is the capital of Greece?"); None for other prompts."""
    match = re.fullmatch(rf"The (?P<relation>[^.?!]+?) of {re.escape(subject)} (?P<verb>is|was|are|were)", prompt)
    return f"What {match['verb']} the {match['relation']} of {subject}?" if match else None


def chat_prompts(tokenizer, prompt: str, subject: str, n: int, forms: Sequence[str] = CHAT_ASKS) -> list[str]:
    """The first ``n`` requests of ``forms`` under the chat template, each ready for the
    assistant's answer. A form with {question} counts only where the prompt has one (``question``)."""
    from kedit.engine.metrics import chat_text

    asked = question(prompt, subject)
    usable = [a for a in forms if asked is not None or "{question}" not in a]
    asks = [a.format(subject=subject, prompt=prompt, question=asked) for a in usable[:n]]
    return [chat_text(tokenizer, a) for a in asks]


def possessive(prompt: str, subject: str) -> tuple[str, str] | None:
    """The prompt reworded to open with the subject's possessive, and the subject as spelled
    there ("The capital of the Netherlands is" → ("The Netherlands's capital is", "The
    Netherlands")); None where the prompt is not "The R of S ..."."""
    match = re.fullmatch(rf"The (?P<relation>[^.?!]+?) of {re.escape(subject)} (?P<rest>\S.*)", prompt)
    if not match:
        return None
    name = capitalised(subject)
    return f"{name}'s {match['relation']} {match['rest']}", name


def opening(tokenizer, prompt: str, subject: str) -> tuple[str, str] | None:
    """The prompt reworded to open with the subject ("The capital of Germany is" → "Germany's
    capital is"), with the words up to its key's token, where the edit's first key cannot
    read the subject there:

    - the subject is one token at position 0 (no start token before it): the key is the
      token after it ("Germany's");
    - the subject opening a text is other tokens than in the prompt ("I|re|land" against
      " Ireland"): the key is its own last token ("Ireland").

    None where the prompt's key token is the opening's too ("The United Kingdom's": the first
    key reads the subject there, and the wording is a row of δ's alone, ``possessive``), or the
    prompt is not "The R of S ...".
    """
    reworded = possessive(prompt, subject)
    if reworded is None:
        return None
    text, name = reworded
    last = subject_last_token(tokenizer, text, name)
    if last == 0:
        return text, name + "'s"
    opened = tokenizer(text)["input_ids"][last]
    inside = tokenizer(prompt)["input_ids"][subject_last_token(tokenizer, prompt, subject)]
    return (text, name) if opened != inside else None


# what else follows a subject that opens a text: the opening's update must not fire there either
OPENING_WORDS = (" is", " was", " has")


def opening_neighbours(tokenizer, text: str, head: str, subject: str, n: int) -> list[tuple[str, str]]:
    """(text, its head) for keys the opening's update must leave alone: up to ``n`` other
    subjects opening ``text`` in the subject's place. Where the key is the token after the
    subject (``head`` "Germany's"), each of them also followed by other words (what a text's
    second token usually is: the update must not fire on it); where it is the subject's last
    token, only those whose own last token is past position 0 (every text's first position has
    much the same key)."""
    name = capitalised(subject)
    others = [capitalised(o) for o in NEIGHBOURS if o.lower() != subject.lower()][:n]
    if head == name:
        out = [(o + text[len(name) :], o) for o in others]
        return [(t, o) for t, o in out if subject_last_token(tokenizer, t, o) > 0]
    after = head[len(name) :]
    out = [(o + after + text[len(head) :], o + after) for o in others]
    out += [(o + word, o + word) for word in OPENING_WORDS for o in others]
    return out


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
