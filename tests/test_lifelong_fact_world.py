"""Sequential edits on the fact world with GRACE (100), WISE (30) and ROME (30, or
``KEDIT_ROME_EDITS``): the figures of issue 4, all measured after the last edit, then every edit
rolled back in random order. The edits skip their own probe: the figures are measured after the
last.

Each test prints its figures (pytest -s shows them). Edit-time medians are printed, not
asserted: timings belong to `kedit bench`.
"""

from __future__ import annotations

import os
import random
import statistics

import torch
from fact_cases import edit_cases, prompt_logits

from kedit.engine.metrics import mean_accuracy, teacher_forced, unchanged_share

N = 100


def _run(session, method: str, n: int = N) -> dict[str, float]:
    tok, model = session.tokenizer, session.model
    world = session.fact_world()
    cases = edit_cases(session, n, 7)
    edited = {f.subject for f, _ in cases}
    loc_facts = [f for f in world.facts if f.subject not in edited]
    loc_prompts, loc_targets = [f.prompt(0) for f in loc_facts], [f.target for f in loc_facts]
    held = [f.prompt(f.held_out) for f, _ in cases]
    before = teacher_forced(model, tok, loc_prompts, loc_targets)
    recall = mean_accuracy(teacher_forced(model, tok, held, [f.target for f, _ in cases]))
    probe_prompts = [f.prompt(0) for f, _ in cases[:10]] + loc_prompts[:10]
    original = prompt_logits(session, probe_prompts)
    edits = [session.edit(f.prompt(0), new, subject=f.subject, method=method, probe=False) for f, new in cases]
    assert all(e.probe is None for e in edits)  # measured below, after the last edit
    news = [" " + new for _, new in cases]
    figures = {
        "Rel": mean_accuracy(teacher_forced(model, tok, [f.prompt(0) for f, _ in cases], news)),
        "Gen": mean_accuracy(teacher_forced(model, tok, held, news)),
        "Loc": unchanged_share(before, teacher_forced(model, tok, loc_prompts, loc_targets)),
        "unedited recall, unseen phrasings": recall,
        "median edit s, first 10": statistics.median(e.seconds for e in edits[:10]),
        "median edit s, last 10": statistics.median(e.seconds for e in edits[-10:]),
    }
    print(f"\n{method.upper()}, {n} sequential edits:", {k: round(v, 3) for k, v in figures.items()})
    order = list(edits)
    random.Random(3).shuffle(order)
    for e in order:
        session.rollback(e.id)
    assert not session.edits
    assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, probe_prompts), original))
    return figures


def test_grace_hundred_sequential_edits(session) -> None:
    f = _run(session, "grace")
    assert f["Rel"] >= 0.95
    assert f["Loc"] >= 0.98


def test_wise_thirty_sequential_edits(session) -> None:
    """30, not 100: a WISE edit trains for over a second here, and 100 exceed the suite's budget.
    WISE misses issue 4's Gen (and, at 100 edits, Loc) on the fact world; the README gives the
    figures. Gen is printed, and the rest held."""
    f = _run(session, "wise", 30)
    assert f["Rel"] >= 0.9
    assert f["Loc"] >= 0.95


def test_rome_sequential_edits_roll_back_exactly(session) -> None:
    """ROME is not built for hundreds of edits: its figures are printed for comparison, and
    rolling every edit back in random order must still restore the model bit for bit. 30 edits
    here, for the suite's time (100 took two minutes); ``KEDIT_ROME_EDITS=100`` gives the
    README's figures."""
    _run(session, "rome", int(os.environ.get("KEDIT_ROME_EDITS", "30")))
