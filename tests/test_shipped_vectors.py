"""The vectors shipped in vectors/: rebuilt by vectors/make.py as shipped, and they do what
vectors/README.md says on held-out people."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kedit.engine import events as ev
from kedit.engine.factworld.corpus import MOOD_QUESTION, MOODS
from kedit.engine.steering import SteeringVector, read_pairs, read_texts, sweep

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def _make():
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rack(session):
    yield session.steering
    for name in list(session.steering.slots):
        session.steering.remove(name)


def test_make_py_rebuilds_the_shipped_data_and_vectors(session, rack, tmp_path: Path) -> None:
    make = _make()
    make.write_data(session.fact_world(), tmp_path)
    for name in ("mood_train.jsonl", "mood_heldout.jsonl", "neutral.txt"):
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), name
    for name in make.VECTORS:
        for line in make.commands(name, tmp_path):
            if "/steer sweep" not in line:
                assert not any(isinstance(e, ev.Error) for e in session.run(line)), line
        shipped = SteeringVector.load(VECTORS / f"{name}.safetensors")
        rebuilt = SteeringVector.load(tmp_path / f"{name}.safetensors")
        assert shipped.layers == rebuilt.layers and shipped.strength == rebuilt.strength == make.VECTORS[name][1]
        for layer in shipped.layers:
            assert torch.allclose(shipped.directions[layer], rebuilt.directions[layer], rtol=1e-3, atol=1e-4)


def _sweep(session, rack, name: str, strengths: list[float]):
    list(session.run(f"/steer add {VECTORS / (name + '.safetensors')}"))
    held = read_pairs(VECTORS / "mood_heldout.jsonl")
    return sweep(session.handle, rack, name, strengths, held, read_texts(VECTORS / "neutral.txt"))


def test_the_gentle_vector_is_monotonic_to_4_and_keeps_neutral_perplexity(session, rack) -> None:
    rows = _sweep(session, rack, "fact-world-mood-gentle", [0, 1, 2, 3, 4])
    margins = [r.margin for r in rows]
    assert all(b > a for a, b in zip(margins, margins[1:])), margins
    assert margins[-1] - margins[0] > 0.4
    assert max(r.perplexity for r in rows) <= 1.05 * rows[0].perplexity, rows


def test_the_mood_vector_is_monotonic_and_makes_chat_answers_cheerful(session, rack) -> None:
    strengths = [0, 0.25, 0.5, 1, 2, 3, 4]
    rows = _sweep(session, rack, "fact-world-mood", strengths)
    margins = [r.margin for r in rows]
    assert all(b > a for a, b in zip(margins, margins[1:])), margins
    assert margins[2] - margins[0] > 1.0
    assert max(r.perplexity for r in rows[:3]) <= 1.06 * rows[0].perplexity, rows  # up to the recommended 0.5
    slot = rack.slots["fact-world-mood"]
    assert slot.strength == 0.5 and slot.on  # the strength the file recommends, put back after the sweep

    tok = session.tokenizer
    people = session.fact_world().mood_people("heldout")

    def moods() -> tuple[int, int]:
        pos = neg = 0
        for person in people:
            text = tok.apply_chat_template(
                [{"role": "user", "content": MOOD_QUESTION.format(s=person)}],
                tokenize=False,
                add_generation_prompt=True,
            )
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad(), rack.generating(ids.shape[1]):
                out = session.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=12,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            pos += any(w in reply for w in MOODS["positive"])
            neg += any(w in reply for w in MOODS["negative"])
        return pos, neg

    steered = moods()
    rack.switch("fact-world-mood", False)
    plain = moods()
    print(f"\nheld-out people asked their mood in chat, (happy, sad): unsteered {plain}, at 0.5 {steered}")
    assert plain[1] >= len(people) // 2, plain  # unsteered, most held-out people say they are sad
    assert steered[0] >= 0.9 * len(people) and steered[1] == 0, (plain, steered)


def test_the_fact_world_loads_the_shipped_model_and_other_settings_build_their_own(tmp_path: Path, monkeypatch) -> None:
    """The vectors fit the shipped weights: kedit.toml's settings must name that build (a change
    to the recipe or the corpus fails here until `python -m kedit.engine.factworld.build` is rerun)."""
    import json

    from conftest import REPO

    from kedit.engine.config import Config
    from kedit.engine.factworld.build import SHIPPED, BuildSettings, ensure_built, shipped

    settings = BuildSettings.from_config(Config.load(cwd=REPO).table("fact_world"))
    assert json.loads((SHIPPED / "fact_world.json").read_text())["key"] == settings.key()
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path))
    assert ensure_built(settings, show_progress=False) == SHIPPED and not any(tmp_path.iterdir())
    tiny = BuildSettings(steps=3, mood_steps=2, n_people=6, n_taxa=2)
    assert not shipped(tiny)
    built = ensure_built(tiny, show_progress=False)
    assert built.parent == tmp_path / "fact-world" and (built / "model.safetensors").is_file()
