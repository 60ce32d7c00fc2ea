"""A generated knowledge-insertion set: invented people, each with a school, a city and a sport,
for measuring how many new facts an editing method can put into a real model.

Every fact has its prompt, a paraphrase with the person's name inside the sentence (a name that
opens a text is tokenized and keyed differently, so it is a harder, separate test), and a chat
question. Names are drawn from invented first and last names, so the model knows nothing about
them: the unedited model never answers right, and what the edited one says is the edit's doing.
The draw is fixed by the seed; the same N gives the same facts everywhere.
"""

from __future__ import annotations

import random
from typing import Any

FIRST = (
    "Aldric", "Brisa", "Caelan", "Dagny", "Eulalie", "Fenwick", "Galena", "Hollis", "Isaura", "Jorund",
    "Kestra", "Lisandro", "Maelis", "Nerys", "Orrin", "Perpetua", "Quillon", "Rosmund", "Solvei", "Tamsin",
    "Ulrik", "Veradis", "Wynfrith", "Xanthe", "Yestin", "Zephyrine", "Amaury", "Bettany", "Corisande", "Drystan",
    "Elowen", "Florian", "Gwendolen", "Hesketh", "Ilsabet", "Jerrold", "Kinvara", "Leofric", "Marisol", "Nevin",
)  # fmt: skip
LAST = (
    "Ashcombe", "Brackwell", "Corrigan", "Dunleavy", "Everard", "Fairweather", "Gallow", "Harrowgate",
    "Inchbald", "Jessup", "Kittredge", "Lorrimer", "Marchbanks", "Northcote", "Oakenshaw", "Pendragon",
    "Quarrington", "Ravenhill", "Stallwood", "Thackeray", "Underhill", "Vandermeer", "Wetherby", "Yardley",
    "Zouche", "Abernethy", "Blackwood", "Cresswell", "Delacroix", "Eastwick", "Farrington", "Greystoke",
    "Holloway", "Ivinghoe", "Jardine", "Kingsley", "Lockhart", "Montague", "Netherby", "Ormsby",
)  # fmt: skip
SCHOOLS = (
    "Harvard University", "Stanford University", "Yale University", "Princeton University",
    "Oxford University", "Cambridge University", "Columbia University", "Cornell University",
    "Duke University", "Brown University", "Rice University", "Boston University",
    "Tufts University", "Emory University", "Purdue University", "Vanderbilt University",
)  # fmt: skip
CITIES = (
    "Chicago", "Boston", "Seattle", "Denver", "Toronto", "Madrid", "Vienna", "Prague", "Lisbon", "Dublin",
    "Munich", "Oslo", "Helsinki", "Sydney", "Melbourne", "Montreal", "Barcelona", "Amsterdam", "Stockholm",
    "Copenhagen", "Brussels", "Warsaw", "Budapest", "Athens",
)  # fmt: skip
SPORTS = (
    "tennis", "golf", "baseball", "basketball", "hockey", "cricket", "rugby", "volleyball", "badminton",
    "swimming", "boxing", "cycling", "fencing", "rowing", "skiing", "wrestling",
)  # fmt: skip

# (relation, answers, prompt, paraphrase, question); {s} is the person
RELATIONS = (
    ("school", SCHOOLS, "{s} attended", "After high school, {s} went on to study at", "Which university did {s} attend?"),
    ("city", CITIES, "{s} lives in the city of", "These days, {s} makes a home in the city of", "Which city does {s} live in?"),
    ("sport", SPORTS, "{s} plays the sport of", "Every weekend, {s} competes in the sport of", "What sport does {s} play?"),
)  # fmt: skip


def insertion_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n facts about invented people (three per person, in order: school, city, sport), as
    records kedit.engine.evaluate reads: subject, prompt, target_new, rephrase_prompt, question."""
    if n < 1:
        raise ValueError("the insertion set needs at least one fact")
    people = [f"{a} {b}" for a in FIRST for b in LAST]
    if n > len(people) * len(RELATIONS):
        raise ValueError(f"the insertion set has at most {len(people) * len(RELATIONS)} facts")
    rng = random.Random(seed)
    rng.shuffle(people)
    out: list[dict[str, Any]] = []
    for person in people:
        for _, answers, prompt, paraphrase, question in RELATIONS:
            if len(out) == n:
                return out
            out.append(
                {
                    "subject": person,
                    "prompt": prompt.format(s=person),
                    "target_new": rng.choice(answers),
                    "rephrase_prompt": paraphrase.format(s=person),
                    "question": question.format(s=person),
                }
            )
    return out
