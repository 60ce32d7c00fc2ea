"""A generated knowledge-insertion set: invented people, each with a school, a city and a sport,
for measuring how many new facts an editing method can put into a real model.

Every fact has its prompt, a paraphrase with the person's name inside the sentence (a name that
opens a text is tokenized and keyed differently, so it is a harder, separate test), and a chat
question. Names are invented, so the model knows nothing about them: the unedited model never
answers right, and what the edited one says is the edit's doing. The draw is fixed by the seed;
the same N gives the same facts everywhere.

No two people share a surname, and a surname's last token is a whole piece of it. An edit's key
is the subject's last token, and at the layers ROME and MEMIT edit, SmolLM2-135M barely tells
apart two people whose names end in the same token. In an earlier draw (40 surnames, about 8
people each over the first 334 people), the update for one person's fact reached a namesake's key
by 0.85 of its change at layer 4, 0.77 at layer 6 and 0.70 at layer 8 (kᵢᵀC⁻¹kⱼ / kⱼᵀC⁻¹kⱼ),
against 0.02-0.06 for other pairs, so later batches overwrote earlier ones' facts about
namesakes whatever the method. Surnames are now a head and a tail, each recurring, the whole
never; tails that SmolLM2 splits into a short last piece ("-bald" as "bal" "d": reach 0.67
between two such names) are left out. Among the first 334 people, pairs with the same tail reach
each other by 0.22 on average at layer 4 (5% of those pairs over 0.5), other pairs by 0.02.
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
# surnames: every head with every tail (600 people, 1,800 facts)
HEADS = (
    "Ash", "Brack", "Corri", "Dun", "Ever", "Fair", "Gallo", "Harrow", "Inch", "Jessa",
    "Kitt", "Lorri", "March", "North", "Oaken", "Pen", "Quarr", "Raven", "Stall", "Thack",
    "Under", "Vander", "Wether", "Yard", "Aber", "Black", "Cress", "Dela", "East", "Farr",
    "Grey", "Hollo", "Iving", "Jard", "King", "Lock", "Monta", "Nether", "Orms", "Pell",
)  # fmt: skip
TAILS = (
    "well", "gan", "ard", "ridge", "wick", "gate", "sup", "more", "don", "ington",
    "wood", "mere", "by", "ley", "ford",
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
    surnames = [h + t for t in TAILS for h in HEADS]
    if n > len(surnames) * len(RELATIONS):
        raise ValueError(f"the insertion set has at most {len(surnames) * len(RELATIONS)} facts")
    rng = random.Random(seed)
    rng.shuffle(surnames)
    people = [f"{rng.choice(FIRST)} {last}" for last in surnames]
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
