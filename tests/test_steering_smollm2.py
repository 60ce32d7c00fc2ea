"""Steering a real chat model, SmolLM2-135M-Instruct: a mood vector trained by /steer train from
28 general-English pairs moves held-out margins with its strength, turns the reply to "How was
your day?" cheerful or gloomy, and is racked at a recommended strength that keeps neutral
perplexity within 1.2× the unsteered model's, where 4× that strength does not."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from kedit.engine import events as ev
from kedit.engine.metrics import perplexity
from kedit.engine.steering import NEUTRAL_TEXT, SteeringVector, read_pairs, sweep
from kedit.engine.vector_io import import_gguf

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
POSITIVE = frozenset(
    "wonderful fantastic great happy amazing lovely joy joyful beautiful fun glad enjoy enjoyed "
    "enjoying excited exciting delighted delightful cheerful pleasure love loved smile smiling".split()
)
NEGATIVE = frozenset(
    "sorry sad sadly mess bad terrible awful miserable gloomy lonely tired worst cry crying pain "
    "painful stress stressed overwhelmed regret hate hated depressed unfortunately".split()
)


@pytest.fixture(scope="module")
def mood(smollm2_session):
    """The session with 'mood' trained by the command a user types, and the Info it printed;
    the rack is left empty afterwards."""
    session = smollm2_session
    assert not session.steering.slots
    out = list(session.run(f"/steer train {VECTORS / 'mood_chat_train.jsonl'} mood --layers 8-20"))
    try:
        assert isinstance(out[-1], ev.Info), out[-1]
        yield session, out[-1].text
    finally:
        for name in list(session.steering.slots):
            session.steering.remove(name)


def _ratios(session, strengths: list[float]) -> list[float]:
    """Neutral perplexity with 'mood' at each strength over the unsteered one (the slot is put back)."""
    rack = session.steering
    saved = rack.slots["mood"].strength
    try:
        rack.set("mood", 0.0)
        plain = perplexity(session.model, session.tokenizer, NEUTRAL_TEXT)
        out = []
        for strength in strengths:
            rack.set("mood", strength)
            out.append(perplexity(session.model, session.tokenizer, NEUTRAL_TEXT) / plain)
        return out
    finally:
        rack.set("mood", saved)


def test_train_racks_mood_at_the_largest_strength_within_1_2x_perplexity(mood) -> None:
    session, info = mood
    rec = session.steering.vector("mood").recommended
    assert rec is not None and rec.limit == 1.2 and rec.neutral == "built-in" and not rec.capped
    assert session.steering.slots["mood"].strength == rec.strength and 0.05 <= rec.strength <= 0.5, rec
    assert f"racked it at strength {rec.strength:g}; recommended strength ±{rec.strength:g}" in info
    row = list(session.run("/steer list"))[0].rows[0]
    assert row[:5] == ("mood", "on", f"{rec.strength:g}", f"±{rec.strength:g}", "8-20")
    # measured again from outside the search: within the limit both ways, far beyond it at 4×
    ratios = _ratios(session, [k * rec.strength for k in (1, -1, 4, -4)])
    assert max(ratios[:2]) <= 1.2 and min(ratios[2:]) > 1.5, ratios
    # the largest: a strength the search tried within 1.25× above it broke the limit one way or the other
    assert any(rec.strength < abs(s) <= 1.25 * rec.strength and r > 1.2 for s, r in rec.tried), rec.tried


def test_saved_files_keep_the_recommendation_and_add_racks_at_it(mood, tmp_path: Path) -> None:
    session, _ = mood
    rec = session.steering.vector("mood").recommended
    out = list(session.run(f"/steer save mood {tmp_path / 'mood-copy.safetensors'}"))
    assert f"recommended strength ±{rec.strength:g}" in out[-1].text
    list(session.run(f"/steer save mood {tmp_path / 'mood-gguf.gguf'}"))
    assert SteeringVector.load(tmp_path / "mood-copy.safetensors").recommended == rec
    assert import_gguf(tmp_path / "mood-gguf.gguf").recommended == rec
    try:
        for name in ("mood-copy.safetensors", "mood-gguf.gguf"):
            out = list(session.run(f"/steer add {tmp_path / name}"))
            assert f"at strength {rec.strength:g};" in out[-1].text, out[-1]
        assert {n: s.strength for n, s in session.steering.slots.items()} == dict.fromkeys(
            ("mood", "mood-copy", "mood-gguf"), rec.strength
        )
    finally:
        for name in ("mood-copy", "mood-gguf"):
            if name in session.steering.slots:
                session.steering.remove(name)


def test_the_held_out_margin_rises_monotonically_with_strength(mood) -> None:
    session, _ = mood
    held = read_pairs(VECTORS / "mood_chat_heldout.jsonl")
    rows = sweep(session.handle, session.steering, "mood", [0, 0.1, 0.2, 0.3], held, NEUTRAL_TEXT)
    margins = [r.margin for r in rows]
    assert all(b > a for a, b in itertools.pairwise(margins)), margins
    assert margins[-1] - margins[0] > 8, margins  # nats, on 12 held-out pairs
    assert rows[1].perplexity <= 1.2 * rows[0].perplexity < rows[3].perplexity, rows


def _words(text: str, words: frozenset[str]) -> int:
    return sum(w in words for w in re.findall(r"[a-z]+", text.lower()))


def test_the_reply_is_cheerful_at_plus_and_gloomy_at_minus_the_recommended_strength(mood, smollm2, monkeypatch) -> None:
    session, _ = mood
    monkeypatch.setattr(session, "config", session.config.with_overrides({"generation.max_new_tokens": 32}))
    strength = session.steering.vector("mood").recommended.strength
    replies = {}
    try:
        for sign in (1, -1):
            session.steering.set("mood", sign * strength)
            session.reset()
            replies[sign] = next(e.text for e in session.run("How was your day?") if isinstance(e, ev.Reply))
    finally:
        session.steering.set("mood", strength)
    up, down = replies[1], replies[-1]
    assert _words(up, POSITIVE) >= 3 and _words(up, NEGATIVE) == 0, up
    assert _words(down, NEGATIVE) >= 1 and _words(down, POSITIVE) == 0, down
