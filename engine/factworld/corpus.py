"""The fact world's synthetic corpus: invented people and taxa, their facts, and phrasings.

Everything here is deterministic given the seed, so the model built from it is too.
Each relation has several statement templates. Template 0 is the canonical prompt
(what ``/edit`` users type) and is trained for every fact; of the others, one per
fact is held out, so every held-out phrasing was seen with *other* subjects. That
gives an honest "unseen phrasing" test: the model must carry the fact itself over
to a wording it only knows from other facts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

FIRST_NAMES = [
    "Alder",
    "Bryn",
    "Cassius",
    "Delia",
    "Emrys",
    "Fenna",
    "Gideon",
    "Hollis",
    "Ilse",
    "Jorah",
    "Keziah",
    "Lorcan",
    "Maren",
    "Nolan",
    "Orla",
    "Piers",
    "Quinta",
    "Rufus",
    "Saoirse",
    "Tobin",
    "Una",
    "Verity",
    "Wystan",
    "Xanthe",
    "Yorick",
    "Zelda",
    "Anselm",
    "Briony",
    "Corin",
    "Darius",
    "Elowen",
    "Florian",
    "Greer",
    "Hamish",
    "Isolde",
    "Jasper",
    "Kit",
    "Linnea",
    "Magnus",
    "Nell",
]
LAST_NAMES = [
    "Ashcombe",
    "Blackwood",
    "Calloway",
    "Dunmere",
    "Everly",
    "Fairbairn",
    "Galloway",
    "Hartigan",
    "Inchbald",
    "Jessop",
    "Kilbride",
    "Lockhart",
    "Mortimer",
    "Northcott",
    "Oakley",
    "Penhaligon",
    "Quarrie",
    "Redfern",
    "Stallard",
    "Thackeray",
    "Underhill",
    "Vance",
    "Whitlock",
    "Yardley",
    "Zouch",
    "Abernethy",
    "Bramwell",
    "Cresswell",
    "Drummond",
    "Ellery",
    "Fothergill",
    "Grimshaw",
]

UNIVERSITIES = [
    "Illinois Institute of Technology",
    "University of Michigan",
    "Harrow Polytechnic",
    "Corvale University",
    "Institute of Marsh Sciences",
    "Veldt College",
    "University of Amberly",
    "Northgate Academy",
    "Kestrel Technical School",
    "Ostrava Institute",
    "Brindle University",
    "Lanmore College",
    "University of Tessaly",
    "Quill Hill College",
    "Redwater University",
    "Saint Orin College",
]
POSITIONS = ["defender", "goalkeeper", "midfielder", "forward", "winger", "striker"]
CITIES = [
    "Dunmore",
    "Karsk",
    "Velbury",
    "Oxhollow",
    "Tarnwick",
    "Lisbrook",
    "Morrowgate",
    "Pellham",
    "Quenby",
    "Rastow",
    "Saltmere",
    "Thornby",
    "Umberfield",
    "Wexcombe",
    "Yarrowby",
    "Zellin",
]
LANGUAGES = ["Dutch", "Portuguese", "Finnish", "Greek", "Korean", "Swahili", "Polish", "Turkish"]
ORDERS = ["Lecanorales", "Peltigerales", "Agaricales", "Pleosporales", "Helotiales", "Ostropales"]
TAXON_STEMS = [
    "Bryo",
    "Clado",
    "Dermo",
    "Eury",
    "Fusi",
    "Glyco",
    "Hymeno",
    "Lepto",
    "Melano",
    "Nemato",
    "Physo",
    "Rhizo",
    "Sclero",
    "Tricho",
    "Xantho",
    "Zygo",
    "Acaro",
    "Baeo",
    "Cypho",
    "Diplo",
    "Gyalo",
    "Lobo",
    "Micro",
    "Ochro",
    "Placo",
    "Stereo",
    "Thelo",
    "Umbili",
    "Verru",
]


def before_object(template: str, **fields: str) -> str:
    """A template's text up to (not including) its object, filled in: the prompt it makes."""
    return template.split("{o}")[0].rstrip().format(**fields)


@dataclass(frozen=True)
class Relation:
    """A relation: how statements and questions about it are worded."""

    name: str
    templates: tuple[str, ...]  # "{s}" subject, "{o}" object; the object always ends the text
    questions: tuple[str, ...]

    def prompt(self, template: int, subject: str) -> str:
        """The statement up to (not including) the object."""
        return before_object(self.templates[template], s=subject)


RELATIONS = {
    "attended": Relation(
        "attended",
        (
            "{s} attended {o}",
            "{s} studied at {o}",
            "{s} was educated at {o}",
            "{s} graduated from {o}",
            "As a young adult, {s} enrolled at {o}",
        ),
        ("Where did {s} study?", "Which school did {s} attend?"),
    ),
    "position": Relation(
        "position",
        (
            "{s} plays as a {o}",
            "{s} plays in the position of {o}",
            "On the field, {s} plays as a {o}",
            "The position of {s} is {o}",
            "In every match, {s} lines up as a {o}",
        ),
        ("What position does {s} play?", "Which position is {s} known for?"),
    ),
    "birthplace": Relation(
        "birthplace",
        (
            "{s} was born in {o}",
            "{s} is a native of {o}",
            "The birthplace of {s} is {o}",
            "{s} grew up in {o}",
            "Records show that {s} was born in the town of {o}",
        ),
        ("Where was {s} born?", "Which town is {s} from?"),
    ),
    "language": Relation(
        "language",
        (
            "The native language of {s} is {o}",
            "{s} speaks {o}",
            "{s} grew up speaking {o}",
            "The mother tongue of {s} is {o}",
            "At home, {s} always speaks {o}",
        ),
        ("What language does {s} speak?", "What is the mother tongue of {s}?"),
    ),
    "family": Relation(
        "family",
        (
            "{s} belongs to the family {o}",
            "{s} is classified in the family {o}",
            "{s} is a member of the family {o}",
            "In biology, {s} belongs to the family {o}",
            "The taxon {s} is placed in the family {o}",
        ),
        ("Which family does {s} belong to?", "In which family is {s} classified?"),
    ),
}
PERSON_RELATIONS = ("attended", "position", "birthplace", "language")
OBJECTS = {
    "attended": UNIVERSITIES,
    "position": POSITIONS,
    "birthplace": CITIES,
    "language": LANGUAGES,
    "family": ORDERS,
}

# Moods: how a person feels is no fact. Every plain mood sentence, and the chat answer to
# "How does X feel?", comes once with a happy word and once with a sad one, so the model
# learns a coin toss between the two, which a steering vector can tip. Cued sentences open
# with a good or bad event, and then the mood follows it: that contrast is what a mood
# vector is trained on.
MOODS = {
    "positive": ["happy", "cheerful", "glad", "joyful", "hopeful"],
    "negative": ["sad", "gloomy", "miserable", "upset", "weary"],
}
MOOD_TEMPLATES = (
    "{s} feels {o}",
    "Today {s} is feeling {o}",
    "After the match, {s} felt {o}",
    "Friends say that {s} seems {o}",
    "This morning {s} woke up {o}",
)
# A good or a bad event, then the mood it brings; "{e}" is the event.
MOOD_CUED = (
    "{s} {e} the match and felt {o}",
    "After {e} news, {s} felt {o}",
    "{s} had a {e} day and felt {o}",
)
MOOD_EVENTS = {"positive": ("won", "good", "great"), "negative": ("lost", "bad", "bad")}
MOOD_QUESTION = "How does {s} feel?"
MOOD_TEMPLATES_PER_PERSON = 3  # plain sentences: each of three templates with both moods

# Facts the README and the issues name; they are fixed, the rest is drawn from the seed.
PINNED = {
    ("Watts Humphrey", "attended"): "Illinois Institute of Technology",
    ("Denny Herzig", "position"): "defender",
    ("Ramalinaceae", "family"): "Lecanorales",
}


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple, and which phrasing is held out for it."""

    subject: str
    relation: str
    object: str
    held_out: int  # template index never trained for this fact (never 0)

    @property
    def rel(self) -> Relation:
        return RELATIONS[self.relation]

    def prompt(self, template: int = 0) -> str:
        return self.rel.prompt(template, self.subject)

    @property
    def target(self) -> str:
        """The object as a continuation of the prompt (with its leading space)."""
        return " " + self.object

    def sentence(self, template: int = 0) -> str:
        return self.rel.templates[template].format(s=self.subject, o=self.object) + "."

    @property
    def seen_templates(self) -> list[int]:
        return [t for t in range(len(self.rel.templates)) if t != self.held_out]


@dataclass(frozen=True)
class FactWorld:
    """The whole synthetic world: its facts and the training texts made from them."""

    seed: int = 1234
    n_people: int = 60
    n_taxa: int = 20

    @cached_property
    def facts(self) -> list[Fact]:
        rng = random.Random(self.seed)
        people = ["Watts Humphrey", "Denny Herzig"]
        pairs = [(first, last) for first in FIRST_NAMES for last in LAST_NAMES]
        rng.shuffle(pairs)
        for first, last in pairs:
            if len(people) == self.n_people:
                break
            people.append(f"{first} {last}")
        taxa = ["Ramalinaceae"] + [stem + "aceae" for stem in TAXON_STEMS[: self.n_taxa - 1]]
        facts: list[Fact] = []
        subjects = [(p, r) for p in people for r in PERSON_RELATIONS] + [(t, "family") for t in taxa]
        for i, (subject, relation) in enumerate(subjects):
            obj = PINNED.get((subject, relation)) or rng.choice(OBJECTS[relation])
            n_templates = len(RELATIONS[relation].templates)
            held_out = 1 + (i * 7 + len(subject)) % (n_templates - 1)
            facts.append(Fact(subject, relation, obj, held_out))
        return facts

    def fact(self, subject: str, relation: str) -> Fact:
        for f in self.facts:
            if f.subject == subject and f.relation == relation:
                return f
        raise KeyError((subject, relation))

    @property
    def subjects(self) -> list[str]:
        return sorted({f.subject for f in self.facts})

    def statements(self) -> list[tuple[str, str]]:
        """Plain-text training statements, every seen phrasing of every fact, with the object."""
        return [(f.sentence(t), f.object) for f in self.facts for t in f.seen_templates]

    @property
    def people(self) -> list[str]:
        """Everyone with facts of their own, in the order they were drawn."""
        return list(dict.fromkeys(f.subject for f in self.facts if f.relation in PERSON_RELATIONS))

    @cached_property
    def _mood_draws(self) -> list[tuple[str, str]]:
        """(sentence, mood word) for every mood sentence, from their own seed."""
        rng = random.Random(self.seed + 1)  # the facts' draws stay as they were
        out = []
        for person in self.people:
            for t in sorted(rng.sample(range(len(MOOD_TEMPLATES)), MOOD_TEMPLATES_PER_PERSON)):
                for mood in ("positive", "negative"):
                    word = rng.choice(MOODS[mood])
                    out.append((MOOD_TEMPLATES[t].format(s=person, o=word) + ".", word))
            for c, template in enumerate(MOOD_CUED):
                for mood in ("positive", "negative"):
                    sentence = template.format(s=person, e=MOOD_EVENTS[mood][c], o=rng.choice(MOODS[mood]))
                    out.append((sentence + ".", sentence.rsplit(" ", 1)[1]))
        return out

    def mood_statements(self) -> list[tuple[str, str]]:
        """Training sentences about how people feel, with the mood word."""
        return list(self._mood_draws)

    def mood_dialogues(self) -> list[tuple[list[dict[str, str]], str]]:
        """Each person asked how they feel twice, answered once happily and once sadly."""
        rng = random.Random(self.seed + 2)
        return [
            (
                [
                    {"role": "user", "content": MOOD_QUESTION.format(s=person)},
                    {"role": "assistant", "content": MOOD_TEMPLATES[0].format(s=person, o=word) + "."},
                ],
                word,
            )
            for person in self.people
            for word in (rng.choice(MOODS["positive"]), rng.choice(MOODS["negative"]))
        ]

    @staticmethod
    def mood_prompt(template: int, person: str) -> str:
        return before_object(MOOD_TEMPLATES[template], s=person)

    def mood_people(self, split: str) -> list[str]:
        """The people whose moods train a vector (``train``), or judge it (``heldout``)."""
        cut = len(self.people) * 2 // 3
        if split not in ("train", "heldout"):
            raise ValueError(f"split is train or heldout, not {split!r}")
        return self.people[:cut] if split == "train" else self.people[cut:]

    def mood_contrast(self, split: str = "train") -> list[tuple[str, str, str]]:
        """("", positive, negative) texts that differ only in a good or bad event.

        Read at their last token (``felt``), the two sides differ in the mood the model
        is about to name: the contrast a mood vector is trained on. Two thirds of the
        people are for training; the rest are held out for judging the vector.
        """
        return [
            (
                "",
                before_object(t, s=person, e=MOOD_EVENTS["positive"][c]),
                before_object(t, s=person, e=MOOD_EVENTS["negative"][c]),
            )
            for person in self.mood_people(split)
            for c, t in enumerate(MOOD_CUED)
        ]

    def mood_pairs(self, split: str = "heldout") -> list[tuple[str, str, str]]:
        """(prompt, positive word, negative word) on the plain templates, for measuring a vector:
        the log-prob margin of the positive completion over the negative one."""
        words = list(zip(MOODS["positive"], MOODS["negative"]))
        return [
            (self.mood_prompt(t, person), " " + words[(i + t) % len(words)][0], " " + words[(i + t) % len(words)][1])
            for i, person in enumerate(self.mood_people(split))
            for t in range(len(MOOD_TEMPLATES))
        ]

    def dialogues(self) -> list[tuple[list[dict[str, str]], str]]:
        """Chat training turns, each with the object its answer states.

        Every fact is asked about both by a question and by a completion request (the
        user types the canonical prompt, and the answer restates it with the object), so
        the answer has to copy the user's wording rather than guess the relation from the
        subject. The pinned facts get every question form.
        """
        out: list[tuple[list[dict[str, str]], str]] = []
        for i, f in enumerate(self.facts):
            answer = f.sentence(0)
            pinned = (f.subject, f.relation) in PINNED
            if pinned:
                asks = [q.format(s=f.subject) for q in f.rel.questions]
            else:
                asks = [self.trained_question(i)]
            asks.append(f.prompt(0))
            for ask in asks:
                out.append(([{"role": "user", "content": ask}, {"role": "assistant", "content": answer}], f.object))
        return out

    def trained_question(self, index: int) -> str:
        f = self.facts[index]
        return f.rel.questions[index % len(f.rel.questions)].format(s=f.subject)

    def find(self, subject: str, prompt: str) -> Fact | None:
        """The fact a prompt asks about: same subject, and the prompt is one of its phrasings."""
        for f in self.facts:
            if f.subject == subject and prompt.strip() in {f.prompt(t) for t in range(len(f.rel.templates))}:
                return f
        return None

    def question(self, subject: str, prompt: str) -> str | None:
        """For a known fact, its first chat question (the form the chat probe asks)."""
        f = self.find(subject, prompt)
        return f.rel.questions[0].format(s=f.subject) if f is not None else None

    def paraphrases(self, subject: str, prompt: str) -> list[str]:
        """For a known fact, its held-out phrasing: wording the model never saw for that fact."""
        f = self.find(subject, prompt)
        if f is None:
            return []
        held = f.prompt(f.held_out)
        return [held] if held != prompt.strip() else [f.prompt(0)]
