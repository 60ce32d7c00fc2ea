"""What the bench edits: made-up people and places, so no edit collides with a real fact."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kedit.engine.errors import KeditError

Progress = Callable[[str, int, int], None]


# -- what to edit ----------------------------------------------------------------------------

_FIRST = ["Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lukas"]
_LAST = ["Novak", "Okafor", "Petrov", "Quinlan", "Rossi", "Sato", "Tanaka", "Ulrich", "Varga", "Weber", "Xu", "Young"]
_RELATIONS = [
    ("{} attended", ["University of Michigan", "Stanford University", "Leiden University", "Kyoto University"]),
    ("{} was born in", ["Lisbon", "Nairobi", "Montreal", "Osaka", "Tallinn"]),
    ("{} works as a", ["carpenter", "violinist", "surgeon", "pilot", "botanist"]),
]


def request_words() -> list[str]:
    """Every word of the bench's own requests (a random model's tokenizer knows them)."""
    words = _FIRST + _LAST + ["is", "a", "."]
    for template, targets in _RELATIONS:
        words += template.replace("{}", "").split() + [w for t in targets for w in t.split()]
    return words


def bench_requests(session: Any, n: int) -> list[tuple[str, str, str]]:
    """n distinct (prompt, subject, target) edits: counterfactuals on the fact world, made-up
    people elsewhere."""
    out: list[tuple[str, str, str]] = []
    if session.handle.source.kind == "fact-world":
        facts = session.fact_world().facts
        for i, f in enumerate(facts[::3] + facts[1::3] + facts[2::3]):
            others = sorted({g.object for g in facts if g.relation == f.relation and g.object != f.object})
            if others:
                out.append((f.prompt(0), f.subject, others[i % len(others)]))
    else:
        people = [f"{a} {b}" for b in _LAST for a in _FIRST]
        for i, person in enumerate(people):
            template, targets = _RELATIONS[i % len(_RELATIONS)]
            out.append((template.format(person), person, targets[i % len(targets)]))
    if len(out) < n:
        raise KeditError(f"the bench has only {len(out)} distinct edits for this model; ask for fewer")
    return out[:n]
